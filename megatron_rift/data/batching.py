"""Batching for the trainer: a resumable data-parallel sampler and a collate to Megatron tensors.

Typical use on one data-parallel rank::

    ds = RewardDataset(prefix)
    sampler = GlobalBatchSampler(len(ds), global_batch_size, dp_rank, dp_size, seed,
                                 micro_batch_size=mbs)
    sampler.load_state_dict(saved)             # when resuming
    for local_batch in sampler:                # int64 [num_micro_batches, mbs], forever
        for micro in local_batch:
            batch = collate_rollouts([ds[i] for i in micro], seq_length, ds.pad_id)
            ...                                # loss from batch["token_rewards"], batch["loss_mask"]
        saved = sampler.state_dict()           # counts the batch just handed out
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch


class GlobalBatchSampler:
    """Deterministic shuffled global batches, sharded across data-parallel ranks.

    The unit is the global batch: epoch ``e`` orders all samples with a permutation seeded by
    ``(seed, e)`` (identical on every rank, independent of ``dp_size``), cuts it into
    ``num_samples // global_batch_size`` global batches, and **drops the last incomplete one**
    (at most ``global_batch_size - 1`` samples; a different set every epoch, since the order is
    reshuffled). Rank ``r`` gets the ``r``-th contiguous slice of ``global_batch_size // dp_size``
    samples of each global batch, split into micro-batches of ``micro_batch_size``. Within an
    epoch every sample appears at most once across ranks, and exactly once when
    ``num_samples`` is a multiple of ``global_batch_size``.

    State (``state_dict()``): ``epoch`` and ``consumed_samples`` (global samples handed out in
    that epoch, a multiple of ``global_batch_size``), plus the settings that must not change on
    resume. Because batches do not depend on ``dp_size``, a run may resume with another DP size.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool = True,
        micro_batch_size: int | None = None,
    ):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, dp_size={dp_size})")
        if global_batch_size % dp_size:
            raise ValueError(
                f"global_batch_size {global_batch_size} is not a multiple of dp_size {dp_size}"
            )
        self.local_batch_size = global_batch_size // dp_size
        self.micro_batch_size = micro_batch_size or self.local_batch_size
        if self.local_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size / dp_size = {self.local_batch_size} is not a "
                f"multiple of micro_batch_size {self.micro_batch_size}"
            )
        if num_samples < global_batch_size:
            raise ValueError(
                f"{num_samples} samples cannot fill one global batch of "
                f"{global_batch_size}; lower the global batch size"
            )
        self.num_samples, self.global_batch_size = int(num_samples), int(global_batch_size)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = int(seed), shuffle
        self.batches_per_epoch = self.num_samples // self.global_batch_size
        self.epoch = 0
        self.consumed_samples = 0
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    def __len__(self) -> int:
        """Global batches per epoch."""
        return self.batches_per_epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """int64 [num_samples]: the sample order of ``epoch`` (same on all ranks)."""
        if self._order_epoch != epoch:
            if self.shuffle:
                rng = np.random.default_rng(np.random.SeedSequence([self.seed, int(epoch)]))
                self._order = rng.permutation(self.num_samples)
            else:
                self._order = np.arange(self.num_samples, dtype=np.int64)
            self._order_epoch = epoch
        return self._order

    def global_batch(self, epoch: int, batch: int) -> np.ndarray:
        """int64 [global_batch_size]: all ranks' samples of global batch ``batch`` of ``epoch``."""
        if not 0 <= batch < self.batches_per_epoch:
            raise IndexError(f"batch {batch} not in [0, {self.batches_per_epoch})")
        start = batch * self.global_batch_size
        return self.epoch_order(epoch)[start : start + self.global_batch_size]

    def local_batch(self, epoch: int, batch: int) -> np.ndarray:
        """int64 [num_micro_batches, micro_batch_size]: this rank's share of a global batch."""
        start = self.dp_rank * self.local_batch_size
        mine = self.global_batch(epoch, batch)[start : start + self.local_batch_size]
        return mine.reshape(-1, self.micro_batch_size)

    def __iter__(self) -> Iterator[np.ndarray]:
        """Endless local batches from the current state; the state advances as each is yielded."""
        while True:
            batch = self.consumed_samples // self.global_batch_size
            local = self.local_batch(self.epoch, batch)
            self.consumed_samples += self.global_batch_size
            if self.consumed_samples // self.global_batch_size == self.batches_per_epoch:
                self.epoch, self.consumed_samples = self.epoch + 1, 0
            yield local

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "consumed_samples": self.consumed_samples,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "global_batch_size": self.global_batch_size,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_samples", "global_batch_size", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume: sampler {key} was {state[key]}, now "
                    f"{getattr(self, key)}; resuming would change the data order"
                )
        if state["consumed_samples"] % self.global_batch_size:
            raise ValueError(
                f"consumed_samples {state['consumed_samples']} is not a multiple of "
                f"global_batch_size {self.global_batch_size}"
            )
        self.epoch, self.consumed_samples = int(state["epoch"]), int(state["consumed_samples"])


def _place(lengths: Sequence[int], seq_length: int, pack: bool) -> list[tuple[int, int]]:
    """(row, offset) per sample: one row each, or first-fit in the given order when packing."""
    if not pack:
        return [(j, 0) for j in range(len(lengths))]
    free: list[int] = []  # free space left in each row
    places = []
    for length in lengths:
        row = next((r for r, space in enumerate(free) if space >= length), len(free))
        if row == len(free):
            free.append(seq_length)
        places.append((row, seq_length - free[row]))
        free[row] -= length
    return places


def collate_rollouts(
    samples: Sequence[dict],
    seq_length: int,
    pad_id: int,
    pack: bool = False,
    num_rows: int | None = None,
    attention_mask: bool = False,
) -> dict[str, torch.Tensor]:
    """Build a Megatron GPT micro-batch from ``RewardDataset`` items.

    Args:
        samples: n dicts with ``tokens`` [L], ``loss_mask`` [L] (1 on response tokens incl. EOS),
            ``reward``, optional ``index`` (dataset index). Every L must be <= seq_length.
        pack: place several samples per row (first-fit, in order) instead of one per row.
        num_rows: fixed number of rows b (padding rows added); error if the samples need more.
            Default: n unpacked, as many as first-fit needs when packed.
        attention_mask: also build the [b, 1, s, s] block-causal mask.

    Returns (b rows, s = seq_length), torch tensors:
        tokens [b, s] int64: input ids, pad_id on padding.
        labels [b, s] int64: labels[:, t] = tokens[:, t + 1]; the last column is pad_id.
        loss_mask [b, s] float32: 1 where labels[:, t] is a response token (incl. EOS) of the same
            sample as tokens[:, t]; 0 on prompt, padding and across sample boundaries.
        position_ids [b, s] int64: restart at 0 for each sample; 0 on padding.
        token_rewards [b, s] float32: reward of the sample a label belongs to where loss_mask is 1,
            else 0. Use this in the loss: it is right packed and unpacked.
        segment_ids [b, s] int64: j = which of ``samples`` occupies the position; -1 on padding.
        sample_rewards [n] float32, sample_ids [n] int64 (``index`` or -1),
        sample_rows [n] / sample_offsets [n] int64: where sample j was placed.
        shared_prefix [b, s] bool (only when every sample has ``shared_prefix``): True where
            labels[:, t] is one of the first ``shared_prefix`` response tokens of its sample (what
            a negative shares with a positive of its group; ``--negative-mode divergent``).
        rewards [b] float32: reward per row (unpacked only: a packed row has several).
        attention_mask [b, 1, s, s] bool (only if asked): True = masked out (Megatron's
            convention); position q sees k iff k <= q and both hold the same sample (padding
            counts as one segment, so no row is fully masked and attention never yields NaN).

    Attention when packing: without ``attention_mask`` the model's causal mask lets a sample
    attend to the samples before it in the row. Pass the mask to GPTModel (local/SDPA spec), or
    use Transformer Engine's THD path. Megatron's GPTModel with RoPE does not read
    ``position_ids``; RoPE scores depend only on relative positions, so with the block-causal mask
    a packed sample sees exactly what it would see alone.
    """
    lengths = _checked_lengths(samples, seq_length)
    places = _place(lengths, seq_length, pack)
    rows = _row_count(places, len(samples), seq_length, num_rows)
    tokens, segment, position, is_response = _lay_out(samples, places, rows, seq_length, pad_id)
    labels, loss_mask = _next_token_targets(tokens, segment, is_response, pad_id)
    sample_rewards = np.array([float(s["reward"]) for s in samples], dtype=np.float32)
    token_rewards = _token_rewards(loss_mask, segment, sample_rewards)

    batch = {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask.astype(np.float32)),
        "position_ids": torch.from_numpy(position),
        "token_rewards": torch.from_numpy(token_rewards.astype(np.float32)),
        "segment_ids": torch.from_numpy(segment),
        "sample_rewards": torch.from_numpy(sample_rewards),
        "sample_ids": torch.tensor([int(s.get("index", -1)) for s in samples], dtype=torch.int64),
        "sample_rows": torch.tensor([row for row, _ in places], dtype=torch.int64),
        "sample_offsets": torch.tensor([offset for _, offset in places], dtype=torch.int64),
    }
    if not pack:
        batch["rewards"] = torch.from_numpy(_row_rewards(sample_rewards, rows))
    if attention_mask:
        batch["attention_mask"] = block_causal_attention_mask(batch["segment_ids"])
    if samples and all("shared_prefix" in sample for sample in samples):
        batch["shared_prefix"] = torch.from_numpy(_shared_prefix_mask(samples, places, loss_mask))
    return batch


def _checked_lengths(samples: Sequence[dict], seq_length: int) -> list[int]:
    """Tokens per sample; a sample longer than a row is an error naming its dataset index."""
    lengths = [len(sample["tokens"]) for sample in samples]
    for j, length in enumerate(lengths):
        if length > seq_length:
            raise ValueError(
                f"sample {j} (dataset index {samples[j].get('index', '?')}) has "
                f"{length} tokens > seq_length {seq_length}; pack the rollouts "
                f"with --max-seq-length {seq_length}"
            )
    return lengths


def _row_count(places: list[tuple[int, int]], n: int, seq_length: int, num_rows: int | None) -> int:
    """Rows b of the batch: ``num_rows`` when given (error if the placement needs more), else
    the rows the placement uses."""
    needed = max((row for row, _ in places), default=-1) + 1
    rows = needed if num_rows is None else num_rows
    if rows < needed:
        raise ValueError(
            f"{n} samples need {needed} rows of {seq_length} tokens, more than num_rows={num_rows}"
        )
    return rows


def _lay_out(
    samples: Sequence[dict], places: list[tuple[int, int]], rows: int, seq_length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Copy each sample to its (row, offset). Returns [b, s] arrays: tokens int64 (pad_id on
    padding), segment int64 (sample j, -1 on padding), position int64 (from 0 per sample, 0 on
    padding), is_response bool (the sample's loss_mask)."""
    tokens = np.full((rows, seq_length), pad_id, dtype=np.int64)
    segment = np.full((rows, seq_length), -1, dtype=np.int64)
    position = np.zeros((rows, seq_length), dtype=np.int64)
    is_response = np.zeros((rows, seq_length), dtype=bool)
    for j, (row, offset) in enumerate(places):
        length = len(samples[j]["tokens"])
        span = slice(offset, offset + length)
        tokens[row, span] = samples[j]["tokens"]
        segment[row, span] = j
        position[row, span] = np.arange(length)
        is_response[row, span] = np.asarray(samples[j]["loss_mask"], dtype=bool)
    return tokens, segment, position, is_response


def _next_token_targets(
    tokens: np.ndarray, segment: np.ndarray, is_response: np.ndarray, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """[b, s] labels int64 (tokens shifted left, pad_id in the last column) and loss_mask bool
    (the label is a response token of the same sample as the input token)."""
    labels = np.full_like(tokens, pad_id)
    labels[:, :-1] = tokens[:, 1:]
    loss_mask = np.zeros(tokens.shape, dtype=bool)
    # Across a sample boundary in a packed row the label belongs to the next sample: no loss.
    loss_mask[:, :-1] = is_response[:, 1:] & (segment[:, 1:] == segment[:, :-1])
    return labels, loss_mask


def _token_rewards(
    loss_mask: np.ndarray, segment: np.ndarray, sample_rewards: np.ndarray
) -> np.ndarray:
    """float [b, s]: the reward of the sample at each position where loss_mask is 1, else 0."""
    if not sample_rewards.size:  # nothing to index; every position is padding
        return np.zeros(loss_mask.shape)
    return np.where(loss_mask, sample_rewards[np.maximum(segment, 0)], 0.0)


def _row_rewards(sample_rewards: np.ndarray, rows: int) -> np.ndarray:
    """float32 [b]: sample j's reward on row j (unpacked layout), 0 on padding rows."""
    rewards = np.zeros(rows, dtype=np.float32)
    rewards[: sample_rewards.size] = sample_rewards
    return rewards


def _shared_prefix_mask(
    samples: Sequence[dict], places: list[tuple[int, int]], loss_mask: np.ndarray
) -> np.ndarray:
    """bool [b, s]: the label positions of each sample's first ``shared_prefix`` response tokens
    (the label at t is token t + 1, so token ``response_start`` is the label at its t - 1)."""
    shared = np.zeros(loss_mask.shape, dtype=bool)
    for sample, (row, offset) in zip(samples, places):
        first = offset + int(sample["response_start"]) - 1
        shared[row, first : first + int(sample["shared_prefix"])] = True
    return shared & loss_mask


def block_causal_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] segment ids -> [b, 1, s, s] bool, True = masked out (Megatron's convention).

    q attends to k iff k <= q and segment_ids[q] == segment_ids[k].
    """
    s = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return ~(same & causal).unsqueeze(1)
