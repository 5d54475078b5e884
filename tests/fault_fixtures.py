"""Small packed datasets of every format variant, and what they hold, for the fault tests.

* ``plain``: format version 2, prompt/response rollouts (word-level tokenizer);
* ``chat_spans``: version 2 chat data packed with ``--train-on all-assistant`` (so it has
  ``PREFIX.loss_spans.npy``), Qwen2.5's template on a tiny BPE;
* ``v1``: ``plain`` rewritten in format version 1 (no ``response_end``, no checksums), as the
  packer wrote it before version 2.

:func:`dataset_content` reads a dataset through ``RewardDataset`` into plain lists: the
independent reference a damaged copy's content is compared with.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from megatron_rift.data.format import SIDE_DTYPE_V1, output_paths
from tests.chat_templates import build_chat_tokenizer
from tests.rollout_fixtures import corpus, write_jsonl
from tests.workers.train_data import build_rollout_dataset

CHATS = [
    [
        {"role": "user", "content": "name a colour"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "another one"},
        {"role": "assistant", "content": "blue green"},
    ],
    [
        {"role": "user", "content": "add two and three"},
        {"role": "assistant", "content": "five"},
    ],
]


def dataset_files(prefix: str) -> list[str]:
    """Every file of a packed dataset (the loss spans when it has them)."""
    files = list(output_paths(prefix).values())
    info = json.loads(Path(prefix + ".json").read_text())
    if info.get("loss_spans"):
        files.append(str(Path(prefix).parent / info["loss_spans"]))
    return files


def to_version1(prefix: str, out_prefix: str) -> str:
    """A copy of a plain version-2 dataset in format version 1."""
    for path in output_paths(prefix).values():
        shutil.copy(path, out_prefix + path[len(prefix) :])
    side = np.load(prefix + ".rewards.npy")
    old = np.zeros(side.shape[0], dtype=SIDE_DTYPE_V1)
    for name in SIDE_DTYPE_V1.names:
        old[name] = side[name]
    np.save(out_prefix + ".rewards.npy", old)
    info = json.loads(Path(prefix + ".json").read_text())
    for key in ("checksums", "loss_spans", "loss_tokens", "chat_template"):
        info.pop(key, None)
    info["version"] = 1
    info["side_file_fields"] = list(SIDE_DTYPE_V1.names)
    Path(out_prefix + ".json").write_text(json.dumps(info, indent=2))
    return out_prefix


def build_datasets(root: Path) -> dict[str, str]:
    """{variant: PREFIX} of the three variants under ``root``."""
    from megatron_rift.data.packing import PackConfig, pack_rollouts

    plain = build_rollout_dataset(root / "plain", num_problems=4, rollouts_per_problem=3)
    tokenizer = build_chat_tokenizer(root / "qwen", "qwen2.5", corpus(120))
    records = [{"messages": c, "reward": 1.0 - i} for i, c in enumerate(CHATS)]
    write_jsonl(root / "chats.jsonl", records)
    chat = str(root / "chat" / "chat")
    pack_rollouts(
        PackConfig(
            inputs=[str(root / "chats.jsonl")],
            output_prefix=chat,
            tokenizer=str(tokenizer),
            train_on="all-assistant",
            progress=False,
        )
    )
    (root / "v1").mkdir()
    return {"plain": plain, "chat_spans": chat, "v1": to_version1(plain, str(root / "v1" / "data"))}


def dataset_content(prefix: str) -> list[tuple]:
    """Per rollout: (tokens, loss mask, reward, group), read with RewardDataset."""
    from megatron_rift.data.dataset import RewardDataset

    dataset = RewardDataset(prefix)
    return [
        (
            item["tokens"].tolist(),
            item["loss_mask"].tolist(),
            item["reward"],
            item["group"],
        )
        for item in (dataset[i] for i in range(len(dataset)))
    ]
