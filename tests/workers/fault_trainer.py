"""The trainer with faults injected from outside (like tests/workers/killing_trainer.py):

    python -m tests.workers.fault_trainer --fault F [--fault F ...] <trainer flags...>

* ``enospc-at-save:N``: while checkpoint N is written, the checkpoint writer of the last rank
  fails with ``OSError(ENOSPC)`` (dist_checkpointing's ``_write_item``, in the forked writer
  processes), as a full disk would make it;
* ``nan-at-step:N``: the per-token cross-entropy of every micro-batch of step N is multiplied by
  NaN on every rank (so the loss and the gradients are NaN);
* ``kill-rank:R@step:N``: rank R SIGKILLs itself in the first forward pass of step N, while the
  other ranks are inside that step's collectives.

The production code knows nothing of this: the wrappers replace
``megatron_rift.training.checkpoint_state.save_checkpoint``, ``loop.make_forward_step``,
``loop.load_start_state`` and megatron-core's ``filesystem_async._write_item`` before
``megatron_rift.train.main`` runs.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import signal
import sys

_state = {"step": 0, "saving": None}


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _track_steps() -> None:
    """_state["step"]: the step whose micro-batches are being computed."""
    from megatron_rift.training import loop

    load_start_state, train_step = loop.load_start_state, loop.train_step

    @functools.wraps(load_start_state)
    def load_start(*args, **kwargs):
        _state["step"] = load_start_state(*args, **kwargs)
        return _state["step"]

    @functools.wraps(train_step)
    def step(*args, **kwargs):
        _state["step"] += 1
        return train_step(*args, **kwargs)

    loop.load_start_state, loop.train_step = load_start, step


def _install_enospc(iteration: int) -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_rift.training import checkpoint_state

    if not hasattr(filesystem_async, "_write_item"):
        raise RuntimeError("fault_trainer: megatron-core's filesystem_async has no _write_item")
    save, write_item = checkpoint_state.save_checkpoint, filesystem_async._write_item
    last_rank = int(os.environ.get("WORLD_SIZE", "1")) - 1

    @functools.wraps(save)
    def save_checkpoint(*args, **kwargs):
        _state["saving"] = kwargs.get("iteration", args[1] if len(args) > 1 else None)
        try:
            return save(*args, **kwargs)
        finally:
            _state["saving"] = None

    @functools.wraps(write_item)
    def failing_write_item(*args, **kwargs):
        if str(_state["saving"]) == str(iteration) and _rank() == last_rank:
            stream = next((a for a in args if hasattr(a, "write") and hasattr(a, "name")), None)
            name = getattr(stream, "name", "checkpoint file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
        return write_item(*args, **kwargs)

    checkpoint_state.save_checkpoint = save_checkpoint
    filesystem_async._write_item = failing_write_item


def _wrap_forward(fault) -> None:
    """``fault(output)`` runs on the per-token CE of each micro-batch (before the loss)."""
    from megatron_rift.training import loop

    make_forward_step = loop.make_forward_step

    @functools.wraps(make_forward_step)
    def make(*args, **kwargs):
        forward_step = make_forward_step(*args, **kwargs)

        def wrapped(data_iterator, model):
            output, loss_func = forward_step(data_iterator, model)
            return fault(output), loss_func

        return wrapped

    loop.make_forward_step = make


def _install_nan(steps: set[int]) -> None:
    _wrap_forward(lambda output: output * float("nan") if _state["step"] in steps else output)


def _install_kill(rank: int, step: int) -> None:
    def fault(output):
        if _state["step"] == step and _rank() == rank:
            os.kill(os.getpid(), signal.SIGKILL)
        return output

    # Killed after its own forward, before the backward's and the loss's collectives: the other
    # rank waits in them.
    _wrap_forward(fault)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--fault", action="append", required=True)
    ours, trainer_argv = parser.parse_known_args(argv)
    _track_steps()
    nan_steps = set()
    for fault in ours.fault:
        kind, _, where = fault.partition(":")
        if kind == "enospc-at-save":
            _install_enospc(int(where))
        elif kind == "nan-at-step":
            nan_steps.add(int(where))
        elif kind == "kill-rank":
            rank, _, step = where.partition("@step:")
            _install_kill(int(rank), int(step))
        else:
            parser.error(f"unknown --fault {fault!r}")
    if nan_steps:
        _install_nan(nan_steps)
    from megatron_rift import train

    return train.main(trainer_argv)


# The guard matters: dist_checkpointing's save starts a spawn-context process that re-imports
# __main__; without it that child would start training again and the save would hang.
if __name__ == "__main__":
    sys.exit(main())
