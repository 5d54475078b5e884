"""Benchmark tools/pack_rollouts: rollouts per second and peak memory.

Synthetic rollouts (64-token prompts, 256-token responses, 8 per problem sharing its prompt;
``--distinct-prompts``: a prompt per rollout) are written as JSONL and
packed with a word-level HF tokenizer built on the fly (one token per word), with 1 and 2 worker
processes; the same at a quarter of the size shows whether peak memory depends on input size.
The chat case: 3-turn conversations in ``messages`` (a 16-word system prompt, then three
24-word user turns, each answered by a 96-word assistant turn), rendered with a ChatML template
on the same tokenizer, trained on the last assistant turn.
Each run is a fresh process (imports done before the clock starts) whose resident memory, and that
of its workers, is sampled every 50 ms. Besides wall time it reports the CPU seconds of packing
(main process + workers), which other jobs on a shared machine disturb much less.

    .venv/bin/python benchmarks/pack.py                 # 200k and 50k rollouts, 1 and 2 workers
    .venv/bin/python benchmarks/pack.py --sizes 20000 --workers 1
    .venv/bin/python benchmarks/pack.py --sizes --chat-sizes 50000 --workers 2   # chat only
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
VOCAB_WORDS = [f"w{i}" for i in range(8000)]

CHILD = """
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import megatron.core.datasets.indexed_dataset  # import cost is not packing cost
import transformers.models.auto.tokenization_auto  # (load_tokenizer imports it: ~1-2 s)
from megatron_rift.data import PackConfig, pack_rollouts
import resource
args = json.loads(sys.argv[1])
def cpu():  # this process + finished workers (the pool is shut down inside pack_rollouts)
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
start, cpu_start = time.perf_counter(), cpu()
summary = pack_rollouts(PackConfig(inputs=[args["input"]], output_prefix=args["prefix"],
                                   tokenizer=args["tokenizer"], workers=args["workers"],
                                   overwrite=True, progress=False, **args["options"]))
elapsed, cpu_seconds = time.perf_counter() - start, cpu() - cpu_start
print(json.dumps({"seconds": elapsed, "cpu_seconds": cpu_seconds, "rollouts": summary["rollouts"],
                  "tokens": summary["total_tokens"]}))
"""


def write_rollouts(
    path: Path,
    count: int,
    prompt_len: int,
    response_len: int,
    seed: int = 0,
    shared_prompts: bool = True,
):
    """``count`` rollouts, 8 per problem; with ``shared_prompts`` the 8 share their problem's
    prompt (as sampled rollouts do), otherwise every rollout has a prompt of its own."""
    rng = np.random.default_rng(seed)
    words = np.array(VOCAB_WORDS)
    with open(path, "w") as handle:
        for start in range(0, count, 4096):  # a multiple of 8: problems never straddle blocks
            n = min(4096, count - start)
            ids = rng.integers(0, len(words), size=(n, prompt_len + response_len))
            correct = rng.random(n) < 0.5
            for j in range(n):
                row = words[ids[j]]
                problem = (start + j) // 8
                prompt_row = words[ids[j - j % 8]] if shared_prompts else row
                handle.write(
                    json.dumps(
                        {
                            "prompt_id": problem,
                            "prompt": " ".join(prompt_row[:prompt_len]),
                            "response": " ".join(row[prompt_len:]),
                            "correct": bool(correct[j]),
                        }
                    )
                    + "\n"
                )


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_TURNS = ((16,), (24, 96), (24, 96), (24, 96))  # words: system, then (user, assistant) x 3


def write_conversations(path: Path, count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    words = np.array(VOCAB_WORDS)
    per_record = sum(sum(turn) for turn in CHAT_TURNS)
    with open(path, "w") as handle:
        for start in range(0, count, 4096):
            n = min(4096, count - start)
            ids = rng.integers(0, len(words), size=(n, per_record))
            correct = rng.random(n) < 0.5
            for j in range(n):
                row, at = words[ids[j]], 0
                messages = []
                for turn in CHAT_TURNS:
                    for role, length in zip(
                        ("system",) if len(turn) == 1 else ("user", "assistant"), turn
                    ):
                        messages.append({"role": role, "content": " ".join(row[at : at + length])})
                        at += length
                record = {"prompt_id": (start + j) // 8, "messages": messages}
                handle.write(json.dumps({**record, "correct": bool(correct[j])}) + "\n")


def run_one(
    input_path: Path,
    tokenizer: Path,
    prefix: Path,
    workers: int,
    rust_threads: bool = False,
    options: dict | None = None,
    repo: Path = REPO,
) -> dict:
    spec = json.dumps(
        {
            "input": str(input_path),
            "tokenizer": str(tokenizer),
            "prefix": str(prefix),
            "workers": workers,
            "options": options or {},
        }
    )
    # By default one core per worker: the Rust tokenizer's own thread pool is off.
    env = dict(
        os.environ, TOKENIZERS_PARALLELISM="true" if rust_threads else "false", OMP_NUM_THREADS="1"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, spec],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(repo),  # the child imports megatron_rift from here
        env=env,
    )
    watched = psutil.Process(proc.pid)
    peak_main = peak_total = 0
    while proc.poll() is None:
        try:
            main_rss = watched.memory_info().rss
            total = main_rss + sum(c.memory_info().rss for c in watched.children(recursive=True))
        except psutil.Error:
            continue
        peak_main, peak_total = max(peak_main, main_rss), max(peak_total, total)
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"packing failed:\n{err[-4000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(peak_main_mib=peak_main / 2**20, peak_total_mib=peak_total / 2**20)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[200_000, 50_000])
    parser.add_argument(
        "--chat-sizes", type=int, nargs="*", default=[50_000], help="3-turn conversations"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--distinct-prompts",
        action="store_true",
        help="give every rollout a prompt of its own (default: the 8 rollouts of a problem share "
        "it, as sampled rollouts do; the figures before 2026-12-07 used distinct prompts)",
    )
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--response-tokens", type=int, default=256)
    parser.add_argument(
        "--rust-threads",
        action="store_true",
        help="add a 1-worker run with the Rust tokenizer's thread pool on",
    )
    parser.add_argument("--workdir", default=None, help="default: a temporary folder")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="another checkout (e.g. `git worktree add`) whose packing is timed right before "
        "this one's on the same plain inputs",
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds of every run")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))  # run as a script: tests/ is importable from the repo root only
    from tests.tiny_tokenizers import build_wordlevel_tokenizer

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        tokenizer = build_wordlevel_tokenizer(tmp / "tokenizer", VOCAB_WORDS)
        chat_tokenizer = _chat_tokenizer(tmp / "chat_tokenizer", build_wordlevel_tokenizer)
        print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}")
        print(
            "| rollouts | input MiB | workers | wall s | rollouts/s | tokens/s | CPU s | "
            "rollouts per CPU-s | load avg | peak RSS main (MiB) | peak RSS main+workers (MiB) |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        cases = [(size, False) for size in args.sizes] + [(size, True) for size in args.chat_sizes]
        for size, chat in cases:
            data = tmp / f"{'chats' if chat else 'rollouts'}_{size}.jsonl"
            if chat:
                write_conversations(data, size)
            else:
                write_rollouts(
                    data,
                    size,
                    args.prompt_tokens,
                    args.response_tokens,
                    shared_prompts=not args.distinct_prompts,
                )
            runs = [(w, False) for w in args.workers] + [(1, True)] * (
                args.rust_threads and not chat
            )
            # The baseline checkout (plain rollouts only) runs right before this one, each time.
            repos = [REPO] if chat or args.baseline is None else [args.baseline, REPO]
            # Rounds alternate the runs: on a shared machine the other jobs only ever slow a run
            # down, so the best of a few rounds is the closest to an idle machine.
            rounds = itertools.product(range(args.repeat), runs, repos)
            for _, (workers, rust_threads), repo in rounds:
                r = run_one(
                    data,
                    chat_tokenizer if chat else tokenizer,
                    tmp / f"packed_{size}_{chat}_{workers}_{rust_threads}",
                    workers,
                    rust_threads,
                    repo=repo,
                )
                assert r["rollouts"] == size
                label = f"{workers} + Rust threads" if rust_threads else str(workers)
                label += " (3-turn chat)" if chat else ""
                label += " (baseline)" if repo != REPO else ""
                print(
                    f"| {size} | {data.stat().st_size / 2**20:.0f} | {label} | "
                    f"{r['seconds']:.1f} | {size / r['seconds']:.0f} | "
                    f"{r['tokens'] / r['seconds'] / 1e6:.2f}M | {r['cpu_seconds']:.1f} | "
                    f"{size / r['cpu_seconds']:.0f} | {os.getloadavg()[0]:.1f} | "
                    f"{r['peak_main_mib']:.0f} | "
                    f"{r['peak_total_mib']:.0f} |",
                    flush=True,
                )
            data.unlink()
        print(f"load average after: {os.getloadavg()[0]:.2f}")


def _chat_tokenizer(folder: Path, build_wordlevel_tokenizer) -> Path:
    """The word-level tokenizer with ChatML's special tokens and template."""
    from transformers import AutoTokenizer

    build_wordlevel_tokenizer(folder, VOCAB_WORDS + ["system", "user", "assistant"], CHATML)
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.save_pretrained(str(folder))
    return folder


if __name__ == "__main__":
    main()
