"""Training data: the packed rollout dataset, the resumable global-batch sampler and the per-step
micro-batch iterator the pipeline schedule consumes.

Every rank of a data-parallel replica (all TP and PP ranks) reads the same micro-batches from the
memory-mapped dataset itself; this is cheaper than broadcasting them and keeps the ranks independent.
"""

from __future__ import annotations

import argparse
from typing import Iterator

import numpy as np

from megatron_rift.data.batching import GlobalBatchSampler, collate_rollouts
from megatron_rift.data.dataset import RewardDataset
from megatron_rift.training.validation import ConfigError

SEQ_LENGTH_MULTIPLE = 16  # FP8 GEMMs want token counts divisible by 16


def default_seq_length(dataset: RewardDataset) -> int:
    longest = int(np.max(dataset.lengths))
    return -(-longest // SEQ_LENGTH_MULTIPLE) * SEQ_LENGTH_MULTIPLE


def resolve_seq_length(args: argparse.Namespace) -> int:
    """--seq-length, or the longest rollout rounded up; ConfigError if a rollout does not fit.
    Reads only the dataset index, so every rank can run it before any process group exists."""
    dataset = RewardDataset(args.data_path)
    seq_length = args.seq_length or default_seq_length(dataset)
    longest = int(np.max(dataset.lengths))
    if longest > seq_length:
        where = int(np.argmax(dataset.lengths))
        raise ConfigError(
            f"--seq-length {seq_length} is shorter than rollout {where} of {args.data_path} "
            f"({longest} tokens); raise --seq-length to at least {longest} or re-pack with "
            f"--max-seq-length {seq_length}")
    return seq_length


class TrainingData:
    """Hands out one optimizer step's micro-batches at a time; its position is checkpointable.

    ``next_step()`` returns ``(micro_batches, global_tokens)``: an iterator over this rank's
    ``num_microbatches`` collated micro-batches (dicts of tensors from ``collate_rollouts``) and
    the number of non-padding tokens in the whole global batch (all data-parallel ranks).
    """

    def __init__(self, args: argparse.Namespace, seq_length: int, dp_rank: int, dp_size: int,
                 use_te: bool):
        self.dataset = RewardDataset(args.data_path)
        self.seq_length = seq_length
        self.micro_batch_size = args.micro_batch_size
        self.pack = args.sequence_packing
        # Packed rows need block-causal attention: an explicit mask for the local (SDPA) spec;
        # TE reads segment boundaries (THD format) instead, built in step.py.
        self.attention_mask = self.pack and not use_te
        self.sampler = GlobalBatchSampler(
            len(self.dataset), args.global_batch_size, dp_rank, dp_size, args.seed,
            shuffle=not args.no_shuffle, micro_batch_size=args.micro_batch_size)
        self._batches = iter(self.sampler)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.sampler)

    def position(self) -> tuple[int, int]:
        """(epoch, global batch within the epoch) of the next step."""
        return self.sampler.epoch, self.sampler.consumed_samples // self.sampler.global_batch_size

    def next_step(self) -> tuple[Iterator[dict], int]:
        epoch, batch = self.position()
        global_tokens = int(self.dataset.lengths[self.sampler.global_batch(epoch, batch)].sum())
        local = next(self._batches)  # int64 [num_microbatches, micro_batch_size]
        return self._collate_each(local), global_tokens

    def _collate_each(self, local: np.ndarray) -> Iterator[dict]:
        for micro in local:
            samples = [self.dataset[int(i)] for i in micro]
            yield collate_rollouts(samples, self.seq_length, self.dataset.pad_id, pack=self.pack,
                                   attention_mask=self.attention_mask)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._batches = iter(self.sampler)
