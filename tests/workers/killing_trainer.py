"""The trainer with a crash injected from outside: SIGKILL global rank 0 at one point of the run.

    python -m tests.workers.killing_trainer --kill-at step:N|save:N <trainer flags...>

(under torchrun, like ``python -m megatron_rift.train``). ``step:N`` kills rank 0 right after the
metrics record of step N is written; ``save:N`` kills it while checkpoint N is written: after every
rank wrote its files, before the folder is published (through ``save_checkpoint``'s
``before_publish`` callback). The production code knows nothing of this: the kill is registered
by wrapping ``MetricsLogger.log_step`` and the ``save_checkpoint`` that
``megatron_rift.training.checkpoint_state`` calls, then ``megatron_rift.train.main`` runs as usual.
The wrappers take ``*args, **kwargs`` and find the record / iteration by name, so they survive
small signature changes of the wrapped functions.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import signal
import sys


def _global_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _kill_rank0() -> None:
    if _global_rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)


def _bound_arguments(func, args, kwargs) -> inspect.BoundArguments:
    return inspect.signature(func).bind(*args, **kwargs)


def _install_step_kill(step: int) -> None:
    from megatron_rift.training import logging as metrics_logging

    original = metrics_logging.MetricsLogger.log_step

    @functools.wraps(original)
    def log_step(*args, **kwargs):
        result = original(*args, **kwargs)
        record = _bound_arguments(original, args, kwargs).arguments.get("record")
        if record is None:  # renamed: the first dict argument with a "step"
            record = next(
                (a for a in (*args, *kwargs.values()) if isinstance(a, dict) and "step" in a), None
            )
        if record is None:
            raise RuntimeError("killing_trainer: cannot find the record in MetricsLogger.log_step")
        if int(record["step"]) == step:
            _kill_rank0()
        return result

    metrics_logging.MetricsLogger.log_step = log_step


def _install_save_kill(iteration: int) -> None:
    from megatron_rift.training import checkpoint_state

    original = checkpoint_state.save_checkpoint

    @functools.wraps(original)
    def save_checkpoint(*args, **kwargs):
        bound = _bound_arguments(original, args, kwargs)
        if (
            "iteration" not in bound.arguments
            or "before_publish" not in inspect.signature(original).parameters
        ):
            raise RuntimeError("killing_trainer: save_checkpoint has no iteration/before_publish")
        if str(bound.arguments["iteration"]) == str(iteration):
            previous = bound.arguments.get("before_publish")

            def before_publish(*cb_args, **cb_kwargs):
                if previous is not None:
                    previous(*cb_args, **cb_kwargs)
                _kill_rank0()

            bound.arguments["before_publish"] = before_publish
        return original(*bound.args, **bound.kwargs)

    checkpoint_state.save_checkpoint = save_checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument(
        "--kill-at", required=True, help="step:N or save:N (SIGKILL global rank 0 there)"
    )
    ours, trainer_argv = parser.parse_known_args(argv)
    point, _, number = ours.kill_at.partition(":")
    if point not in ("step", "save") or not number.isdigit():
        parser.error(f"--kill-at wants step:N or save:N, not {ours.kill_at!r}")
    (_install_step_kill if point == "step" else _install_save_kill)(int(number))

    from megatron_rift import train

    return train.main(trainer_argv)


# The guard matters: dist_checkpointing's save starts a spawn-context process that re-imports
# __main__; without it that child would start training again and the save would hang.
if __name__ == "__main__":
    sys.exit(main())
