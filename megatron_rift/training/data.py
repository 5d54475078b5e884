"""Training data: the packed rollout dataset, the resumable global-batch sampler and the per-step
micro-batch iterator the pipeline schedule consumes.

Every rank of a data-parallel replica (all TP and PP ranks) reads the same micro-batches from the
memory-mapped dataset itself; this is cheaper than broadcasting them and keeps the ranks independent.
"""

from __future__ import annotations

import argparse
from typing import Iterator

import numpy as np
import torch

from megatron_rift.data.batching import GlobalBatchSampler, collate_rollouts
from megatron_rift.data.dataset import RewardDataset
from megatron_rift.data.errors import RolloutDataError
from megatron_rift.training.arguments import PREFERENCE_OBJECTIVES
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


def reference_logprobs_path(args: argparse.Namespace) -> str:
    from megatron_rift.data.preference import REF_SUFFIX

    return args.ref_logprobs or args.data_path + REF_SUFFIX


def preference_units(args: argparse.Namespace, dataset: RewardDataset):
    """The preference objective's units over ``dataset`` (None for token objectives), with the
    precomputed reference log-probs checked against the dataset. Raises ConfigError, so every
    rank stops with the same message before any collective."""
    if args.objective not in PREFERENCE_OBJECTIVES:
        return None
    from megatron_rift.data.preference import PreferenceUnits, ReferenceLogprobs

    try:
        reference = None
        if args.objective in ("dpo", "kto") and args.reference == "precomputed":
            reference = ReferenceLogprobs(reference_logprobs_path(args), dataset,
                                          need_kl=args.objective == "kto")
        return PreferenceUnits(dataset, args.objective, reference)
    except RolloutDataError as err:
        raise ConfigError(str(err)) from None


class TrainingData:
    """Hands out one optimizer step's micro-batches at a time; its position is checkpointable.

    ``next_step()`` returns ``(micro_batches, global_tokens)``: an iterator over this rank's
    ``num_microbatches`` collated micro-batches (dicts of tensors from ``collate_rollouts``) and
    the number of non-padding tokens in the whole global batch (all data-parallel ranks).

    Preference objectives sample units (pairs, or a KTO sample with its mismatched partner):
    each micro-batch holds ``micro_batch_size`` units, ``rows_per_micro_batch`` sequences, plus
    ``roles`` [n] and ``ref_logprobs`` [n] for the n sequences in collate order.
    """

    def __init__(self, args: argparse.Namespace, seq_length: int, dp_rank: int, dp_size: int,
                 use_te: bool, dataset: RewardDataset | None = None, units=None):
        # ``dataset`` and ``units`` may come from the trainer's pre-flight check (opened and
        # verified once); otherwise they are opened here.
        self.dataset = dataset if dataset is not None else RewardDataset(args.data_path)
        self.seq_length = seq_length
        self.micro_batch_size = args.micro_batch_size
        self.pack = args.sequence_packing
        # Packed rows need block-causal attention: an explicit mask for the local (SDPA) spec;
        # TE reads segment boundaries (THD format) instead, built in step.py.
        self.attention_mask = self.pack and not use_te
        self.units = units if units is not None else preference_units(args, self.dataset)
        self.rows_per_micro_batch = args.micro_batch_size * (1 if self.units is None else 2)
        num_units = len(self.dataset) if self.units is None else len(self.units)
        self.sampler = GlobalBatchSampler(
            num_units, args.global_batch_size, dp_rank, dp_size, args.seed,
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
        drawn = self.sampler.global_batch(epoch, batch)
        global_tokens = (int(self.dataset.lengths[drawn].sum()) if self.units is None
                         else self.units.unit_tokens(drawn))
        local = next(self._batches)  # int64 [num_microbatches, micro_batch_size]
        return self._collate_each(local), global_tokens

    def _collate_each(self, local: np.ndarray) -> Iterator[dict]:
        for micro in local:
            if self.units is None:
                samples = [self.dataset[int(i)] for i in micro]
            else:
                samples = [s for unit in micro for s in self.units.samples(int(unit))]
            batch = collate_rollouts(samples, self.seq_length, self.dataset.pad_id, pack=self.pack,
                                     attention_mask=self.attention_mask)
            if self.units is not None:
                batch["roles"] = torch.tensor([s["role"] for s in samples], dtype=torch.int64)
                batch["ref_logprobs"] = torch.tensor([s["ref_logprob"] for s in samples],
                                                     dtype=torch.float32)
            yield batch

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._batches = iter(self.sampler)
