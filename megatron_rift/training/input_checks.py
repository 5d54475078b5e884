"""Checks of what a run reads, for the preflight (standard library and numpy only): where its
weights come from when no checkpoint gives them, and the precomputed reference log-probs its
objective reads (docs/reliability.md)."""

from __future__ import annotations

from megatron_rift.checkpoint_layout import TRACKER_FILE
from megatron_rift.data.errors import RolloutDataError
from megatron_rift.data.format import REF_SUFFIX
from megatron_rift.data.integrity import check_reference_logprobs
from megatron_rift.model_source import SHAPE_FIELDS, ConfigError, fail
from megatron_rift.objectives import Objective, Unit
from megatron_rift.training.config import CheckpointConfig, ObjectiveConfig


def check_model_source(ckpt: CheckpointConfig, given: dict) -> None:
    """A run that starts from no checkpoint must say so: ``--from-scratch`` or the shape flags
    (an empty --load, a typo'd path in a job script, must not train a random model unnoticed)."""
    missing = [f"--{name.replace('_', '-')}" for name in SHAPE_FIELDS if name not in given]
    if not missing:
        return
    if ckpt.from_scratch:
        fail(f"--from-scratch needs the new model's shape: {', '.join(missing)} missing")
    where = (
        f"--load {ckpt.load} holds no checkpoint (no {TRACKER_FILE})"
        if ckpt.load
        else "no --load checkpoint"
    )
    fail(
        f"no model to start from: {where} and no --pretrained-checkpoint. Pass "
        "--pretrained-checkpoint (a converted model), fix the --load path, or train from "
        f"randomly initialized weights with --from-scratch and {', '.join(missing)}"
    )


def check_reference_files(
    objective: Objective, settings: ObjectiveConfig, data_path: str, info: dict
) -> None:
    """Precomputed reference log-probs exist and belong to this dataset (data/integrity.py)."""
    if not objective.reference or settings.reference != "precomputed":
        return
    path = settings.ref_logprobs or data_path + REF_SUFFIX
    try:
        check_reference_logprobs(
            path, data_path, int(info["rollouts"]), need_kl=objective.unit is Unit.MISMATCHED
        )
    except RolloutDataError as err:
        raise ConfigError(str(err)) from None
