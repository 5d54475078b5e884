"""Several entry points run one after another in one torchrun launch:

    python -m tests.workers.one_launch RUNS.json   (under torchrun)

``RUNS.json`` is a list of ``[entry, *argv]`` items; ``entry`` is ``module:function`` (e.g.
``megatron_rift.train:main``, ``tools.compute_ref_logprobs:main``), called with ``argv``. Each runs
to completion before the next starts, so one launch pays the interpreter's and Megatron's import
once for several short runs (the same training run with and without a flag, say).

The one change, from outside: the torch.distributed process group outlives an entry, because a
second ``init_process_group`` on torchrun's store hangs. Each entry still builds and tears down
Megatron's parallel state (``init_distributed`` only skips the process group that exists), so
entries may use different TP/PP layouts of the same world. Exits with the first non-zero status.
"""

from __future__ import annotations

import importlib
import json
import sys


def _keep_process_group():
    """Make ``destroy_distributed`` (where the entries find it) leave the process group alone;
    returns the real one."""
    from megatron.core import parallel_state

    from megatron_rift import parallel
    from megatron_rift.training import loop

    real = parallel.destroy_distributed

    def destroy_model_parallel_only() -> None:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()

    for module in (parallel, loop):  # loop bound the name at import; tools import it lazily
        module.destroy_distributed = destroy_model_parallel_only
    return real


def _entry(name: str):
    module_name, function = name.split(":")
    module = importlib.import_module(module_name)
    return module, getattr(module, function)


def main(path: str) -> int:
    runs = json.loads(open(path).read())
    entries = [_entry(name) for name, *_ in runs]  # Megatron's imports before any process group
    destroy_everything = _keep_process_group()
    from megatron_rift import parallel

    try:
        for (module, function), (_, *argv) in zip(entries, runs):
            if hasattr(module, "destroy_distributed"):  # a worker that imported it by name
                module.destroy_distributed = parallel.destroy_distributed
            code = function(argv)
            if code:
                return code
    finally:
        destroy_everything()
    return 0


if __name__ == "__main__":  # dist_checkpointing's spawned helper re-imports __main__
    sys.exit(main(sys.argv[1]))
