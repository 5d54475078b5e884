"""``megatron-rift`` console script: one subcommand per stage of the pipeline.

    megatron-rift train --data-path PREFIX ...     (see megatron_rift/train.py)
    megatron-rift demo [--seeds 3] ...             (see megatron_rift/demo/cli.py)

Each subcommand hands its remaining arguments to that stage's own parser, so
``megatron-rift train --help`` shows the trainer's flags.
"""

from __future__ import annotations

import argparse
import sys


def _train(argv: list[str]) -> int:
    from megatron_rift.train import main as train_main

    return train_main(argv)


def _demo(argv: list[str]) -> int:
    from megatron_rift.demo.cli import main as demo_main

    return demo_main(argv)


# Subcommand -> (handler taking the remaining argv, one-line help). Others add theirs here.
SUBCOMMANDS = {
    "train": (_train, "fine-tune a model with RIFT/SFT/DFT/RFT on Megatron-Core (under torchrun)"),
    "demo": (_demo, "the end-to-end CPU demo: RIFT against SFT/DFT/RFT/naive on a synthetic task"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="megatron-rift", description="Reward-Informed Fine-Tuning on Megatron-Core"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints usage / help, or the unknown-command error
        return 2
    handler = SUBCOMMANDS[argv[0]][0]
    return handler(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
