"""Make dist_checkpointing's helper process die with the trainer.

megatron-core 0.16.1 (``dist_checkpointing/strategies/filesystem_async.py:51-56``) collects the
checkpoint writers' results through a queue served by a ``multiprocessing`` manager process,
started on the first save with the *spawn* context. Nothing ties that process to its parent: when
a trainer is killed (OOM killer, node failure, ``kill -9``) it lives on, holding the trainer's
stdout/stderr open, so whatever waits for the trainer's output (a pipe, a test harness, a log
collector) waits forever. :func:`install_results_queue` starts that manager ourselves, with a
Linux parent-death signal, and hands its queue to Megatron before the first save.

Imports stay light: the spawned manager process imports this module to run its initializer.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
import sys

_PR_SET_PDEATHSIG = 1
_manager = None


def _die_with_parent() -> None:
    """Runs in the manager process: ask the kernel for SIGKILL when the parent exits."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:
            pass  # no libc by that name: fall back to Megatron's behavior


def install_results_queue() -> None:
    """Provide Megatron's writer-results queue from a manager that dies with this process."""
    global _manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _manager is not None or getattr(filesystem_async, "_results_queue", None) is not None:
        return
    from multiprocessing.managers import SyncManager

    _manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    _manager.start(initializer=_die_with_parent)
    filesystem_async._results_queue = _manager.Queue()
