"""``python -m megatron_rift.train`` / ``megatron-rift train``: fine-tune with RIFT on Megatron-Core.

Launch one process per GPU (or CPU worker) with torchrun, e.g.::

    torchrun --nproc-per-node 8 -m megatron_rift.train --data-path data/rollouts \\
        --pretrained-checkpoint ckpt/qwen2.5-math-1.5b --load out --save out --objective rift --bf16

Flags are listed by ``--help`` and described in docs/training.md; ``--config FILE.json`` reads a
saved :class:`~megatron_rift.training.config.TrainConfig`. Every rank checks the configuration
before anything is initialized: a bad configuration exits with status 2 and one message per rank.
This is the only module that sees the command line; everything below it takes typed configs.
"""

from __future__ import annotations

import os
import sys

from megatron_rift.megatron_compat import quiet_known_messages
from megatron_rift.training.arguments import parse_train_config
from megatron_rift.training.preflight import ConfigError, preflight

CONFIG_ERROR_EXIT = 2


def _report(error: Exception) -> int:
    rank = os.environ.get("RANK", "0")
    print(f"megatron-rift train: error (rank {rank}): {error}", file=sys.stderr, flush=True)
    return CONFIG_ERROR_EXIT


def main(argv=None) -> int:
    quiet_known_messages()  # Megatron-Core's expected warnings (megatron_compat.KNOWN_WARNINGS)
    config = parse_train_config(argv)
    try:
        plan = preflight(config, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as error:
        return _report(error)
    # Heavy imports (torch, Megatron) only once the configuration is known to be good.
    from megatron_rift.megatron_compat import UnsupportedMegatronCore
    from megatron_rift.training.faults import FAULT_EXIT, FAULTS
    from megatron_rift.training.loop import run_training

    try:
        run_training(config, plan)
    except (ConfigError, UnsupportedMegatronCore) as error:  # the same verdict on every rank
        return _report(error)
    except FAULTS as error:  # a full disk, a NaN step, a lost rank (docs/reliability.md)
        _report(error)
        return FAULT_EXIT
    return 0


# The guard matters: dist_checkpointing's save starts a spawn-context process that re-imports
# __main__; without it that child would start training again and the save would hang.
if __name__ == "__main__":
    sys.exit(main())
