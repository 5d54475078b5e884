"""The run-time faults that end a run with one message and exit status 1 on every rank
(docs/reliability.md); configuration errors exit with 2 (training/preflight.py)."""

from __future__ import annotations

from pathlib import Path

from megatron_rift.checkpoint_layout import iteration_dir_name, read_tracker
from megatron_rift.checkpointing import CheckpointSaveError
from megatron_rift.training.lost_rank import LostRankError
from megatron_rift.training.nonfinite import NonFiniteError

FAULTS = (CheckpointSaveError, NonFiniteError, LostRankError)
FAULT_EXIT = 1


def last_checkpoint(config) -> str | None:
    """The folder the tracker of --save (else --load) names, or None."""
    for root in (config.checkpoint.save, config.checkpoint.load):
        try:
            iteration = read_tracker(root)
        except ValueError:
            continue
        if iteration is not None:
            return str(Path(root) / iteration_dir_name(iteration))
    return None
