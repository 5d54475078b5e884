#!/usr/bin/env python
"""Time and peak memory of both converters on a random model shaped like Qwen2.5-0.5B.

The HF checkpoint is written here with safetensors (bf16 on disk, one file, tied embeddings, as
the real one ships); each conversion then runs as a fresh subprocess of the real command-line tool
and its peak RSS comes from ``os.wait4`` (the child's ``ru_maxrss``). This parent process imports
no torch and holds no tensors: Linux carries a parent's RSS at fork into the child's ru_maxrss, so
checkpoint creation and comparison run in subprocesses too. Target: peak RSS <= 2.5x the
checkpoint's size on disk.

    python benchmarks/convert.py [--verify] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Qwen2.5-0.5B's config.json values (hidden 896, 24 layers, 14 heads / 2 kv heads, ...).
QWEN25_05B = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
    tie_word_embeddings=True,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
    bos_token_id=151643,
    eos_token_id=151643,
    use_sliding_window=False,
)


def write_random_hf_checkpoint(folder: Path, seed: int = 0) -> int:
    """Random bf16 weights with Qwen2.5-0.5B's names and shapes; returns the bytes on disk."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**QWEN25_05B)
    config.dtype = torch.bfloat16
    with torch.device("meta"):  # names and shapes only, no memory
        shapes = {
            n: p.shape for n, p in AutoModelForCausalLM.from_config(config).named_parameters()
        }
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in shapes.items():
        if "norm" in name:
            weights[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            weights[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
    folder.mkdir(parents=True)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(folder))
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def run_measured(cmd: list[str]) -> dict:
    """Run ``cmd``; wall seconds, peak RSS (GiB) of the child, exit status and the last output lines."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
    )
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    tail = [
        line
        for line in output.splitlines()
        if "max_abs_logit_diff" in line or "error" in line.lower()
    ]
    return {
        "seconds": round(wall, 1),
        "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3),  # ru_maxrss is KiB
        "exit": proc.returncode,
        "notes": tail[-3:],
    }


def compare_folders(a: Path, b: Path) -> bool:
    """Every tensor equal, read one at a time."""
    import torch
    from safetensors import safe_open

    with (
        safe_open(str(a / "model.safetensors"), "pt") as fa,
        safe_open(str(b / "model.safetensors"), "pt") as fb,
    ):
        if sorted(fa.keys()) != sorted(fb.keys()):
            return False
        return all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--workdir", default=None, help="default: a temporary folder, removed at the end"
    )
    ap.add_argument(
        "--verify", action="store_true", help="also time both conversions with --verify"
    )
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json-out", default=None)
    ap.add_argument(
        "--make-checkpoint", default=None, help=argparse.SUPPRESS
    )  # internal: run in a child
    ap.add_argument(
        "--compare", nargs=2, default=None, help=argparse.SUPPRESS
    )  # internal: run in a child
    args = ap.parse_args()
    if args.make_checkpoint:
        print(write_random_hf_checkpoint(Path(args.make_checkpoint)))
        return
    if args.compare:
        print(compare_folders(Path(args.compare[0]), Path(args.compare[1])))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="convert_bench_"))
    py, me = sys.executable, str(Path(__file__).resolve())
    try:
        hf, meg, back = work / "hf", work / "megatron", work / "hf_back"
        subprocess.run([py, me, "--make-checkpoint", str(hf)], check=True, cwd=REPO)
        disk = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
        rows = {
            "import only (baseline)": run_measured(
                [
                    py,
                    "-c",
                    "import megatron_rift.convert.hf_to_megatron, megatron_rift.convert.megatron_to_hf",
                ]
            )
        }
        rows["HF -> Megatron (bf16, TP=1)"] = run_measured(
            [py, "tools/convert_hf_to_megatron.py", "--hf-path", str(hf), "--output", str(meg)]
        )
        rows["Megatron -> HF (bf16)"] = run_measured(
            [
                py,
                "tools/convert_megatron_to_hf.py",
                "--megatron-path",
                str(meg),
                "--output",
                str(back),
            ]
        )
        if args.verify:
            for verify_dtype in ("fp32", "bf16"):
                rows[f"HF -> Megatron --verify --verify-dtype {verify_dtype}"] = run_measured(
                    [
                        py,
                        "tools/convert_hf_to_megatron.py",
                        "--hf-path",
                        str(hf),
                        "--output",
                        str(work / f"verify_{verify_dtype}"),
                        "--verify",
                        "--verify-dtype",
                        verify_dtype,
                    ]
                )
            rows["Megatron -> HF --verify"] = run_measured(
                [
                    py,
                    "tools/convert_megatron_to_hf.py",
                    "--megatron-path",
                    str(meg),
                    "--output",
                    str(work / "verify_back"),
                    "--verify",
                ]
            )
        compared = subprocess.run(
            [py, me, "--compare", str(hf), str(back)], capture_output=True, text=True, cwd=REPO
        )
        identical = compared.stdout.strip().endswith("True")
        report = {
            "checkpoint_on_disk_gib": round(disk / 2**30, 3),
            "round_trip_bit_identical": identical,
            "cpu_count": os.cpu_count(),
            "rows": rows,
        }
        print(f"checkpoint on disk: {disk / 2**30:.3f} GiB; round trip bit-identical: {identical}")
        print("| step | wall s | peak RSS GiB | RSS / disk | exit |")
        print("|---|---|---|---|---|")
        for name, r in rows.items():
            ratio = r["peak_rss_gib"] / (disk / 2**30)
            print(f"| {name} | {r['seconds']} | {r['peak_rss_gib']} | {ratio:.2f}x | {r['exit']} |")
            for note in r["notes"]:
                print(f"    {note}")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
