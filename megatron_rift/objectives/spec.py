"""What an objective is: one :class:`Objective` record per training objective, like Megatron-Core's
``ModuleSpec`` for a layer. The trainer, the data path, the preflight, the reference tool and the
demo read these fields; none of them compares objective names.

This module and the registry import neither torch nor Megatron (the preflight runs before either is
imported); the loss function is named by its import path and loaded only when a step needs it.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
from collections.abc import Callable


class Unit(str, enum.Enum):
    """What one entry of ``--global-batch-size`` / ``--micro-batch-size`` is for an objective."""

    ROLLOUT = "rollout"  # one packed rollout (prompt + response, its reward)
    PAIR = "pair"  # a (chosen, rejected) pair of a pairs dataset (tools/pack_rollouts.py --pairs)
    # A sample with a non-zero reward and its mismatched sample (the same prompt with another
    # problem's response), from which KTO estimates its reference point.
    MISMATCHED = "mismatched"

    @property
    def sequences(self) -> int:
        """Sequences a unit puts into a micro-batch."""
        return 1 if self is Unit.ROLLOUT else 2


# A preflight rule: ``rule(objective, dataset_info, settings)`` returns a message (what is wrong and
# what to do) or None. ``dataset_info`` is the packed dataset's PREFIX.json, ``settings`` the run's
# objective flags (``training.config.ObjectiveConfig``: ``negative_mode``, ``beta``, ...).
PreflightRule = Callable[["Objective", dict, object], "str | None"]


@dataclasses.dataclass(frozen=True)
class Objective:
    """One training objective.

    The loss contract: ``loss(per_token_ce, batch, settings, data_parallel_group)`` takes
    GPTModel's per-token cross-entropy [b, s] of one micro-batch, the collated batch (``loss_mask``,
    ``rewards`` [b] or per-token [b, s], ``segment_ids``; ``roles`` and ``ref_logprobs`` for
    pair/mismatched units), a :class:`megatron_rift.losses.LossSettings` and the data-parallel
    process group, and returns ``(loss_sum, count, metrics)``: the loss *sum*, what it is averaged
    over (tokens, pairs or samples) and ``{name: tensor([sum, count])}`` for the log. Megatron's
    schedule divides by the count summed over micro-batches and data-parallel ranks
    (``calculate_per_token_loss``), as in Megatron-LM's ``pretrain_gpt.py``.
    """

    name: str
    summary: str  # one line, shown by --help and the docs
    loss: str  # "package.module:function" with the contract above
    default_lr: float  # the paper's rate where it gives one (section 4.1)
    unit: Unit = Unit.ROLLOUT
    # Needs the reference model's log pi_ref(y|x) per sequence: precomputed once by
    # tools/compute_ref_logprobs.py, or scored online by a frozen copy of the starting model.
    reference: bool = False
    default_beta: float | None = None  # inverse temperature of a preference objective
    uses_rewards: bool = True  # False: every response is a demonstration (sft, dft)
    positives_only: bool = False  # trains on r > 0 samples only (rft)
    metrics: tuple[str, ...] = ()  # names its loss reports besides "loss"
    rules: tuple[PreflightRule, ...] = ()  # preflight checks beyond those its unit implies
    in_demo: bool = False  # run by default in `megatron-rift demo`

    @property
    def counts(self) -> str:
        """What the loss is averaged over, in words."""
        return {Unit.ROLLOUT: "tokens", Unit.PAIR: "pairs", Unit.MISMATCHED: "samples"}[self.unit]

    def load_loss(self):
        """The loss function (imports it: torch and the loss module load here, not before)."""
        module, _, function = self.loss.partition(":")
        try:
            return getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError) as err:
            raise ValueError(
                f"objective {self.name!r}: cannot load its loss {self.loss!r} ({err})"
            ) from err
