"""Training data: the packed rollout dataset, the resumable global-batch sampler and the per-step
micro-batch iterator the pipeline schedule consumes.

Every rank of a data-parallel replica (all TP and PP ranks) reads the same micro-batches from the
memory-mapped dataset itself; this is cheaper than broadcasting them and keeps the ranks independent.
What a sampled unit is (a rollout, a pair, a sample with its mismatched partner) comes from the
objective's :class:`~megatron_rift.objectives.Unit`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from megatron_rift.data.batching import GlobalBatchSampler, collate_rollouts
from megatron_rift.data.dataset import RewardDataset, fit_seq_length
from megatron_rift.data.errors import RolloutDataError
from megatron_rift.data.preference import (
    REF_SUFFIX,
    MismatchedUnits,
    PairUnits,
    ReferenceLogprobs,
)
from megatron_rift.objectives import Objective, Unit
from megatron_rift.training.config import DataConfig, ObjectiveConfig, ScheduleConfig
from megatron_rift.training.preflight import ConfigError

UNIT_CLASSES = {Unit.PAIR: PairUnits, Unit.MISMATCHED: MismatchedUnits}


def resolve_seq_length(data: DataConfig, dataset: RewardDataset) -> int:
    """--seq-length, or the longest rollout rounded up; ConfigError if a rollout does not fit.
    Reads only the dataset index, so every rank can run it before any process group exists."""
    try:
        return fit_seq_length(dataset, data.seq_length)
    except RolloutDataError as err:
        raise ConfigError(str(err)) from None


def open_units(objective: Objective, settings: ObjectiveConfig, dataset: RewardDataset):
    """The objective's units over ``dataset`` (None for rollouts), with precomputed reference
    log-probs checked against the dataset. Raises ConfigError, so every rank stops with the same
    message before any collective."""
    if objective.unit is Unit.ROLLOUT:
        return None
    try:
        reference = None
        if objective.reference and settings.reference == "precomputed":
            path = settings.ref_logprobs or dataset.prefix + REF_SUFFIX
            reference = ReferenceLogprobs(path, dataset, need_kl=objective.unit is Unit.MISMATCHED)
        return UNIT_CLASSES[objective.unit](dataset, reference, objective.name)
    except RolloutDataError as err:
        raise ConfigError(str(err)) from None


class TrainingData:
    """Hands out one optimizer step's micro-batches at a time; its position is checkpointable.

    ``next_step()`` returns ``(micro_batches, global_tokens)``: an iterator over this rank's
    ``num_microbatches`` collated micro-batches (dicts of tensors from ``collate_rollouts``) and
    the number of non-padding tokens in the whole global batch (all data-parallel ranks).

    With ``units`` (pairs, or a KTO sample with its mismatched partner) each micro-batch holds
    ``micro_batch_size`` units, ``rows_per_micro_batch`` sequences, plus ``roles`` [n] and
    ``ref_logprobs`` [n] for the n sequences in collate order.
    """

    def __init__(
        self,
        dataset: RewardDataset,
        units,
        data: DataConfig,
        schedule: ScheduleConfig,
        seq_length: int,
        dp_rank: int,
        dp_size: int,
        use_te: bool,
    ):
        self.dataset, self.units = dataset, units
        self.seq_length = seq_length
        self.micro_batch_size = schedule.micro_batch_size
        self.pack = data.sequence_packing
        # Packed rows need block-causal attention: an explicit mask for the local (SDPA) spec;
        # TE reads segment boundaries (THD format) instead, built in step.py.
        self.attention_mask = self.pack and not use_te
        self.rows_per_micro_batch = schedule.micro_batch_size * (1 if units is None else 2)
        num_units = len(dataset) if units is None else len(units)
        self.sampler = GlobalBatchSampler(
            num_units,
            schedule.global_batch_size,
            dp_rank,
            dp_size,
            schedule.seed,
            shuffle=data.shuffle,
            micro_batch_size=schedule.micro_batch_size,
        )
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
        global_tokens = (
            int(self.dataset.lengths[drawn].sum())
            if self.units is None
            else self.units.unit_tokens(drawn)
        )
        local = next(self._batches)  # int64 [num_microbatches, micro_batch_size]
        return self._collate_each(local), global_tokens

    def _collate_each(self, local: np.ndarray) -> Iterator[dict]:
        for micro in local:
            if self.units is None:
                samples = [self.dataset[int(i)] for i in micro]
            else:
                samples = [s for unit in micro for s in self.units.samples(int(unit))]
            batch = collate_rollouts(
                samples,
                self.seq_length,
                self.dataset.pad_id,
                pack=self.pack,
                attention_mask=self.attention_mask,
            )
            if self.units is not None:
                batch["roles"] = torch.tensor([s["role"] for s in samples], dtype=torch.int64)
                batch["ref_logprobs"] = torch.tensor(
                    [s["ref_logprob"] for s in samples], dtype=torch.float32
                )
            yield batch

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._batches = iter(self.sampler)
