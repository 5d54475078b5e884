"""Every objective trained for a few steps on a model shaped like Qwen2.5-0.5B with Transformer
Engine layers in bf16 (TP=1, one GPU), and FP8 on against off; one JSON of results.

Called by scripts/gpu_check.sh (which skips without a GPU). ``--tiny`` shrinks the model and runs
with local layers in fp32, a smoke test of this script on a CPU machine.

    python benchmarks/gpu_objectives.py OUT_DIR [--tiny] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Qwen2.5-0.5B's shape (its vocabulary: the data's tokenizer is smaller, the model pads to this).
QWEN_05B = [
    "--num-layers",
    "24",
    "--hidden-size",
    "896",
    "--num-attention-heads",
    "14",
    "--num-query-groups",
    "2",
    "--ffn-hidden-size",
    "4864",
    "--vocab-size",
    "151936",
    "--add-qkv-bias",
    "--max-position-embeddings",
    "4096",
]
TINY = [
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
    "--num-attention-heads",
    "4",
    "--num-query-groups",
    "2",
    "--ffn-hidden-size",
    "128",
    "--vocab-size",
    "512",
]


def _run(cmd: list[str], log: Path, timeout: float) -> tuple[int, float]:
    started = time.perf_counter()
    with open(log, "w") as handle:
        try:
            code = subprocess.run(
                cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=str(REPO), timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, round(time.perf_counter() - started, 1)


def _losses(metrics: Path) -> list[float]:
    if not metrics.is_file():
        return []
    return [json.loads(line)["loss"] for line in metrics.read_text().splitlines() if line.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=120, help="seconds per training run")
    args = parser.parse_args()
    from megatron_rift.objectives import Unit, objectives
    from tests.workers.train_data import build_pairs_dataset, build_rollout_dataset

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "rollouts": build_rollout_dataset(out / "data_rollouts"),
        "pairs": build_pairs_dataset(out / "data_pairs"),
    }
    shape = TINY if args.tiny else QWEN_05B
    precision = [] if args.tiny else ["--bf16", "--transformer-impl", "transformer_engine"]
    common = [
        "--seq-length",
        "64",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "8",
        "--train-iters",
        str(args.steps),
        "--lr",
        "1e-5",
        "--seed",
        "3",
        *precision,
    ]
    py = sys.executable
    # A starting checkpoint (one SFT step from scratch): fine-tuning and reference log-probs use it.
    base = out / "base"
    code, seconds = _run(
        [
            py,
            "-m",
            "megatron_rift.train",
            "--data-path",
            data["rollouts"],
            "--objective",
            "sft",
            *shape,
            *common,
            "--train-iters",
            "1",
            "--save",
            str(base),
        ],
        out / "base.log",
        args.timeout,
    )
    results = {
        "shape": "tiny" if args.tiny else "Qwen2.5-0.5B",
        "base": {"exit": code, "seconds": seconds},
    }
    for prefix in data.values():
        _run(
            [
                py,
                "tools/compute_ref_logprobs.py",
                "--load",
                str(base),
                "--data-path",
                prefix,
                "--micro-batch-size",
                "4",
                "--no-progress",
                "--overwrite",
                *(precision[:1] if precision else []),
            ],
            out / f"ref_{Path(prefix).name}.log",
            args.timeout,
        )
    runs = {}
    for objective in objectives():
        prefix = data["pairs"] if objective.unit is Unit.PAIR else data["rollouts"]
        metrics = out / f"{objective.name}.jsonl"
        code, seconds = _run(
            [
                py,
                "-m",
                "megatron_rift.train",
                "--data-path",
                prefix,
                "--objective",
                objective.name,
                "--pretrained-checkpoint",
                str(base),
                *common,
                "--log-file",
                str(metrics),
            ],
            out / f"{objective.name}.log",
            args.timeout,
        )
        losses = _losses(metrics)
        runs[objective.name] = {
            "exit": code,
            "seconds": seconds,
            "losses": losses,
            "finite": bool(losses) and all(x == x for x in losses),
        }
        results["objectives"] = runs  # written after each run: a timeout keeps what finished
        (out / "objectives.json").write_text(json.dumps(results, indent=2) + "\n")
    if not args.tiny:  # FP8 (hybrid, delayed scaling) against bf16 on the same run
        fp8 = {}
        for name, extra in (("bf16", []), ("fp8", ["--fp8-format", "hybrid"])):
            metrics = out / f"fp8_{name}.jsonl"
            code, _ = _run(
                [
                    py,
                    "-m",
                    "megatron_rift.train",
                    "--data-path",
                    data["rollouts"],
                    "--objective",
                    "rift",
                    "--pretrained-checkpoint",
                    str(base),
                    *common,
                    *extra,
                    "--log-file",
                    str(metrics),
                ],
                out / f"fp8_{name}.log",
                args.timeout,
            )
            fp8[name] = {"exit": code, "losses": _losses(metrics)}
        pairs = list(zip(fp8["bf16"]["losses"], fp8["fp8"]["losses"]))
        fp8["max_relative_difference"] = (
            max(abs(a - b) / abs(a) for a, b in pairs) if pairs else None
        )
        results["fp8_vs_bf16"] = fp8
    (out / "objectives.json").write_text(json.dumps(results, indent=2) + "\n")
    failed = [n for n, r in runs.items() if r["exit"] != 0 or not r["finite"]]
    print(json.dumps({"objectives_failed": failed}))
    return 1 if failed or results["base"]["exit"] != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
