"""``python -m megatron_rift.train`` / ``megatron-rift train``: fine-tune with RIFT on Megatron-Core.

Launch one process per GPU (or CPU worker) with torchrun, e.g.::

    torchrun --nproc-per-node 8 -m megatron_rift.train --data-path data/rollouts \\
        --pretrained-checkpoint ckpt/qwen2.5-math-1.5b --load out --save out --objective rift --bf16

Flags are listed by ``--help`` and described in docs/training.md. Every rank validates the flags
before anything is initialized: a bad configuration exits with status 2 and one message per rank.
"""

from __future__ import annotations

import os
import sys

from megatron_rift.training.arguments import parse_args
from megatron_rift.training.validation import ConfigError, resolve_plan

CONFIG_ERROR_EXIT = 2


def _report(error: Exception) -> int:
    rank = os.environ.get("RANK", "0")
    print(f"megatron-rift train: error (rank {rank}): {error}", file=sys.stderr, flush=True)
    return CONFIG_ERROR_EXIT


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        plan = resolve_plan(args, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as error:
        return _report(error)
    # Heavy imports (torch, Megatron) only once the configuration is known to be good.
    from megatron_rift.training.loop import run_training

    try:
        run_training(args, plan)
    except ConfigError as error:  # found while opening the data or a checkpoint: same on all ranks
        return _report(error)
    return 0


# The guard matters: dist_checkpointing's save starts a spawn-context process that re-imports
# __main__; without it that child would start training again and the save would hang.
if __name__ == "__main__":
    sys.exit(main())
