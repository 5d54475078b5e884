"""Tiny packed rollout datasets for the trainer tests, built through the real packing pipeline
(word-level tokenizer -> JSONL rollouts -> ``pack_rollouts``). Nothing is downloaded."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = [f"w{i}" for i in range(60)]


def _pack(folder: Path, name: str, rows: list[dict], **pack_options) -> str:
    """Write ``rows`` as JSONL under ``folder`` and pack them with the word-level tokenizer."""
    from megatron_rift.data.packing import PackConfig, pack_rollouts
    from tests.tiny_tokenizers import build_wordlevel_tokenizer

    tokenizer = build_wordlevel_tokenizer(folder / "tokenizer", WORDS)
    source = folder / f"{name}.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefix = str(folder / name)
    pack_rollouts(
        PackConfig(
            inputs=[str(source)],
            output_prefix=prefix,
            tokenizer=str(tokenizer),
            progress=False,
            **pack_options,
        )
    )
    return prefix


def _words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(low, high)))


def build_rollout_dataset(
    folder: str | Path,
    num_problems: int = 12,
    rollouts_per_problem: int = 4,
    seed: int = 0,
    max_words: int = 20,
) -> str:
    """Write rollouts with mixed rewards (+1 correct / -0.2 wrong after packing) and pack them.

    Returns the dataset PREFIX. Prompt+response stay under ``max_words + 1`` tokens.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for problem in range(num_problems):
        prompt = _words(rng, 3, 8)
        for k in range(rollouts_per_problem):
            rows.append(
                {
                    "prompt_id": problem,
                    "prompt": prompt,
                    "response": _words(rng, 2, max_words - 9),
                    "correct": bool((problem + k) % 3 == 0),
                }
            )
    return _pack(
        folder, "data", rows, reward_scheme="constant", positive_reward=1.0, negative_reward=-0.2
    )


def build_pairs_dataset(
    folder: str | Path,
    num_problems: int = 8,
    rollouts_per_problem: int = 4,
    seed: int = 1,
    max_words: int = 20,
) -> str:
    """A DPO/SimPO pairs dataset (``--pairs ground-truth``): each rollout paired with its
    problem's solution. Returns the PREFIX; documents 2i/2i+1 are pair i's chosen/rejected."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for problem in range(num_problems):
        prompt, solution = _words(rng, 3, 8), _words(rng, 2, max_words - 9)
        for k in range(rollouts_per_problem):
            rows.append(
                {
                    "prompt_id": problem,
                    "prompt": prompt,
                    "solution": solution,
                    "response": _words(rng, 2, max_words - 9),
                    "correct": bool((problem + k) % 3 == 0),
                }
            )
    return _pack(folder, "pairs", rows, pairs="ground-truth")


if __name__ == "__main__":
    import sys

    print(build_rollout_dataset(sys.argv[1]))
