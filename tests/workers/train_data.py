"""Tiny packed rollout datasets for the trainer tests, built through the real packing pipeline
(word-level tokenizer -> JSONL rollouts -> ``pack_rollouts``). Nothing is downloaded."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = [f"w{i}" for i in range(60)]


def build_rollout_dataset(folder: str | Path, num_problems: int = 12, rollouts_per_problem: int = 4,
                          seed: int = 0, max_words: int = 20) -> str:
    """Write rollouts with mixed rewards (+1 correct / -0.2 wrong after packing) and pack them.

    Returns the dataset PREFIX. Prompt+response stay under ``max_words + 1`` tokens.
    """
    from megatron_rift.data.packing import PackConfig, pack_rollouts
    from megatron_rift.data.tiny_tokenizers import build_wordlevel_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_wordlevel_tokenizer(folder / "tokenizer", WORDS)
    rng = random.Random(seed)
    rows = []
    for problem in range(num_problems):
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(3, 8)))
        for k in range(rollouts_per_problem):
            response = " ".join(rng.choices(WORDS, k=rng.randint(2, max_words - 9)))
            rows.append({"prompt_id": problem, "prompt": prompt, "response": response,
                         "correct": bool((problem + k) % 3 == 0)})
    source = folder / "rollouts.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefix = str(folder / "data")
    pack_rollouts(PackConfig(inputs=[str(source)], output_prefix=prefix, tokenizer=str(tokenizer),
                             reward_scheme="constant", positive_reward=1.0, negative_reward=-0.2,
                             progress=False))
    return prefix


if __name__ == "__main__":
    import sys

    print(build_rollout_dataset(sys.argv[1]))
