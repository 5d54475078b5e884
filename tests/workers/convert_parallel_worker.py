"""Worker (torchrun, 2 ranks): the HF -> Megatron CLI at TP=2 and at PP=2 with --verify, and parity at
TP=2 / PP=2 of a checkpoint converted at TP=1 (whose padded vocabulary differs: resharding on load)."""

import argparse
import contextlib
import importlib.util
import io
import re
from pathlib import Path

from megatron.core import parallel_state

from megatron_rift.convert.distributed import ensure_parallel_state
from megatron_rift.convert.verify import verify_parity
from megatron_rift.model import GPTArchitecture
from tests.torchrun_utils import REPO, write_rank_result


def load_cli():
    path = REPO / "tools" / "convert_hf_to_megatron.py"
    spec = importlib.util.spec_from_file_location("convert_hf_to_megatron", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(cli, argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.main(argv)
    text = out.getvalue()
    print(text, end="", flush=True)
    found = re.search(r"max_abs_logit_diff=(\S+)", text)
    return status, float(found.group(1)) if found else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp-hf", required=True)  # converted at TP=2
    ap.add_argument("--pp-hf", required=True)  # converted at PP=2
    ap.add_argument("--tp1-checkpoint", required=True)  # of --pp-hf, converted at TP=1 beforehand
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cli = load_cli()
    result = {}
    result["tp2_status"], result["tp2_cli_diff"] = run_cli(
        cli,
        [
            "--hf-path",
            args.tp_hf,
            "--output",
            str(Path(args.out) / "tp2"),
            "--target-dtype",
            "fp32",
            "--tensor-model-parallel-size",
            "2",
            "--verify",
        ],
    )
    arch = GPTArchitecture.load(args.tp1_checkpoint)
    result["tp1_checkpoint_at_tp2"] = verify_parity(
        args.tp1_checkpoint, args.pp_hf, arch
    ).max_abs_logit_diff

    parallel_state.destroy_model_parallel()  # same processes, now two pipeline stages
    result["pp2_status"], result["pp2_cli_diff"] = run_cli(
        cli,
        [
            "--hf-path",
            args.pp_hf,
            "--output",
            str(Path(args.out) / "pp2"),
            "--target-dtype",
            "fp32",
            "--pipeline-model-parallel-size",
            "2",
            "--verify",
        ],
    )
    ensure_parallel_state(arch, 1, 2)
    result["tp1_checkpoint_at_pp2"] = verify_parity(
        args.tp1_checkpoint, args.pp_hf, arch
    ).max_abs_logit_diff
    write_rank_result(result)


if __name__ == "__main__":  # required: dist_checkpointing.save re-imports the entry script
    main()
