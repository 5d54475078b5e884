"""Worker (torchrun, 2 ranks): MoE conversion with expert parallelism. The HF -> Megatron CLI at EP=2
with --verify (each rank fills only its own experts); the EP=2 checkpoint verified at TP=2 (experts
resharded on load); a Mixtral checkpoint converted at EP=1 verified at EP=2 and at TP=2; and the
CLI's refusal of an EP that does not divide the experts."""

import argparse
from pathlib import Path

from megatron.core import parallel_state

from megatron_rift.convert.distributed import ensure_parallel_state
from megatron_rift.convert.verify import verify_parity
from megatron_rift.model import GPTArchitecture
from tests.torchrun_utils import write_rank_result
from tests.workers.convert_parallel_worker import load_cli, run_cli


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qwen3-moe-hf", required=True)  # converted here at EP=2
    ap.add_argument("--mixtral-hf", required=True)
    ap.add_argument("--mixtral-checkpoint", required=True)  # of --mixtral-hf, at EP=1 beforehand
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cli, ep2 = load_cli(), str(Path(args.out) / "ep2")
    result = {}
    result["ep3_status"], _ = run_cli(
        cli,
        ["--hf-path", args.qwen3_moe_hf, "--output", ep2 + "_bad"]
        + ["--expert-model-parallel-size", "3"],
    )
    result["ep3_written"] = Path(ep2 + "_bad").exists()
    result["ep2_status"], result["ep2_cli_diff"] = run_cli(
        cli,
        ["--hf-path", args.qwen3_moe_hf, "--output", ep2, "--target-dtype", "fp32"]
        + ["--expert-model-parallel-size", "2", "--verify"],
    )
    mixtral = GPTArchitecture.load(args.mixtral_checkpoint)
    result["mixtral_at_ep2"] = verify_parity(
        args.mixtral_checkpoint, args.mixtral_hf, mixtral
    ).max_abs_logit_diff

    parallel_state.destroy_model_parallel()  # same processes, now two tensor-parallel ranks
    qwen3_moe = GPTArchitecture.load(ep2)
    ensure_parallel_state(qwen3_moe, 2, 1, 1)
    result["ep2_checkpoint_at_tp2"] = verify_parity(
        ep2, args.qwen3_moe_hf, qwen3_moe
    ).max_abs_logit_diff
    result["mixtral_at_tp2"] = verify_parity(
        args.mixtral_checkpoint, args.mixtral_hf, mixtral
    ).max_abs_logit_diff
    write_rank_result(result)


if __name__ == "__main__":  # required: dist_checkpointing.save re-imports the entry script
    main()
