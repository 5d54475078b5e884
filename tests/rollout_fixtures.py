"""Shared builders for the rollout-packing tests: tiny tokenizers and a hand-made rollout file."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from tests.tiny_tokenizers import build_bpe_tokenizer, train_sentencepiece

REPO = Path(__file__).resolve().parents[1]
PACK_CLI = REPO / "tools" / "pack_rollouts.py"

_WORDS = (
    "the cat sat on a mat then ran to find food while the dog barked at it so we add "
    "two and three to get five answer is box step first next total sum of numbers "
    "what name colour red blue green"
).split()


def corpus(lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14))) for _ in range(lines)]
    out += ["What is 2 + 3? The answer is 5.", "12 + 30 = 42, so \\boxed{42}.", "Name a colour."]
    return out


def build_tokenizers(folder: Path) -> tuple[Path, Path]:
    """(HF fast tokenizer folder with a chat template, SentencePiece .model)."""
    texts = corpus()
    hf = build_bpe_tokenizer(folder / "hf_tokenizer", texts, vocab_size=300)
    sp = train_sentencepiece(folder / "sp" / "tiny.model", texts, vocab_size=120)
    return hf, sp


# Groups on purpose: interleaved (grouping is by key, not by adjacency), by prompt_id (str and
# int) and by prompt text, all-negative (sigma = 0), a reward of exactly 0 without `correct`, and
# a record with both `reward` and `correct` (correct decides the sign).
HAND_MADE_ROLLOUTS = [
    {
        "prompt_id": "p1",
        "prompt": "the cat sat on a mat. what next?",
        "response": "then ran to find food",
        "correct": True,
    },
    {
        "prompt_id": "p2",
        "prompt": "add two and three",
        "response": "two and three to get five",
        "reward": 1.0,
    },
    {
        "prompt_id": "p1",
        "prompt": "the cat sat on a mat. what next?",
        "response": "the dog barked at it",
        "correct": False,
    },
    {"prompt": "What is 2 + 3?", "response": "The answer is 5.", "reward": 0.7},
    {"prompt_id": "p2", "prompt": "add two and three", "response": "five", "reward": 0.5},
    {"prompt": "What is 2 + 3?", "response": "so we add two and three", "reward": 0.0},
    {
        "prompt_id": "p1",
        "prompt": "the cat sat on a mat. what next?",
        "response": "sat on a mat",
        "correct": False,
    },
    {"prompt": "Name a colour.", "response": "red", "correct": False},
    {"prompt": "What is 2 + 3?", "response": "12 + 30 = 42, so \\boxed{42}.", "reward": -1.0},
    {
        "prompt_id": "p2",
        "prompt": "add two and three",
        "response": "the total sum of numbers is five",
        "reward": 2.0,
    },
    {"prompt": "Name a colour.", "response": "blue green", "correct": False},
    {
        "prompt_id": "p1",
        "prompt": "the cat sat on a mat. what next?",
        "response": "first step then next step",
        "correct": True,
    },
    {
        "prompt_id": 7,
        "prompt": "the answer is",
        "response": "box the answer",
        "reward": -0.5,
        "correct": True,
    },
]


def write_jsonl(path: Path, records) -> Path:
    with open(path, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return path


def run_cli(*args, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(PACK_CLI), "--no-progress", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(REPO),
    )
