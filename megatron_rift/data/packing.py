"""Pack rollout files into a Megatron indexed dataset plus per-rollout rewards (``pack_rollouts``).

Two streaming passes over the input:

1. validate every record and keep only ``(group, raw reward, outcome)`` per rollout (~17 bytes),
   which is what the group reward schemes need (they need whole groups);
2. tokenize in chunks (optionally in a worker pool) and write, in input order:

* ``PREFIX.bin`` / ``PREFIX.idx``: Megatron ``IndexedDataset``, one document (one sequence) per
  rollout, int32 token ids ``prompt + response + EOS`` (a conversation: exactly its chat
  template's tokens), written with ``IndexedDatasetBuilder``;
* ``PREFIX.rewards.npy``: a structured array, one row per document, load with
  ``np.load(..., mmap_mode="r")``; fields in :data:`~megatron_rift.data.format.SIDE_DTYPE`;
* ``PREFIX.loss_spans.npy`` (``--train-on all-assistant`` only): earlier trained assistant turns;
* ``PREFIX.json``: format, arguments, tokenizer and chat template info, statistics (see
  ``docs/packing.md``).

All are written under a hidden temporary folder next to the prefix and renamed into place
only after everything succeeded, so a failed run leaves no ``PREFIX.*`` files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from megatron_rift.data.chat import TRAIN_ON, ChatFormat, one_turn
from megatron_rift.data.dataset_writer import DatasetWriter, statistics
from megatron_rift.data.encoding import ChunkEncoder, DocumentBatch
from megatron_rift.data.errors import RolloutDataError
from megatron_rift.data.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LOSS_SPANS_SUFFIX,
    OUTPUT_SUFFIXES,
    SIDE_DTYPE,
    TOKEN_DTYPE,
    output_paths,
)
from megatron_rift.data.reward_schemes import REWARD_SCHEMES, scheme_rewards
from megatron_rift.data.rollout_reader import (
    PAIRS_MODES,
    Location,
    Rollout,
    RolloutFields,
    expand_inputs,
    iter_documents,
)
from megatron_rift.data.tokenizer import RolloutTokenizer, load_tokenizer

OVERLONG_MODES = ("error", "drop", "truncate")
KEEP_MODES = ("all", "positive")


@dataclass
class PackConfig:
    """Arguments of :func:`pack_rollouts` (the CLI flags of ``tools/pack_rollouts.py``)."""

    inputs: Sequence[str]
    output_prefix: str
    tokenizer: str
    # Prompt/response records as one-turn conversations in the tokenizer's chat template
    # (`messages` records always use it).
    chat_template: bool = False
    # Which assistant turns of a conversation are trained: the last (the rewarded response) or all.
    train_on: str = "last-assistant"
    max_seq_length: int | None = None
    overlong: str = "error"
    reward_scheme: str = "constant"
    positive_reward: float = 1.0
    negative_reward: float = -0.2
    keep: str = "all"
    fields: RolloutFields = field(default_factory=RolloutFields)
    # "ground-truth" / "given": a pairs dataset for dpo/simpo (documents 2i, 2i+1 = chosen,
    # rejected of pair i); see rollout_reader.iter_documents.
    pairs: str = "none"
    workers: int = 1
    overwrite: bool = False
    seed: int = 0  # recorded only: packing is deterministic (output order = input order)
    chunk_size: int = 1024
    progress: bool = True

    def validate(self) -> None:
        for name, value, allowed in (
            ("overlong", self.overlong, OVERLONG_MODES),
            ("reward_scheme", self.reward_scheme, REWARD_SCHEMES),
            ("keep", self.keep, KEEP_MODES),
            ("pairs", self.pairs, PAIRS_MODES),
            ("train_on", self.train_on, TRAIN_ON),
        ):
            if value not in allowed:
                raise RolloutDataError(
                    f"--{name.replace('_', '-')} {value!r}: choose one of {', '.join(allowed)}."
                )
        if self.max_seq_length is not None and self.max_seq_length < 2:
            raise RolloutDataError("--max-seq-length must be at least 2 (a prompt token and EOS).")
        if self.workers < 1 or self.chunk_size < 1:
            raise RolloutDataError("--workers and the chunk size must be at least 1.")
        if not self.inputs:
            raise RolloutDataError("no input files given (--input FILE [FILE ...]).")
        if self.pairs != "none" and self.keep != "all":
            raise RolloutDataError(
                "--pairs keeps both members of every pair; it cannot be "
                f"combined with --keep {self.keep}."
            )
        if self.pairs != "none" and self.train_on != "last-assistant":
            raise RolloutDataError(
                "--pairs compares two responses to one prompt; it needs --train-on last-assistant."
            )

    def documents(self) -> Iterator[Rollout]:
        return iter_documents(self.inputs, self.fields, self.pairs, self.train_on)


@dataclass
class GroupScan:
    """Pass 1 result, one entry per input rollout: group int64 [N], raw float64 [N], outcome int8 [N]."""

    group: np.ndarray
    raw: np.ndarray
    outcome: np.ndarray
    num_groups: int


def scan_groups(config: PackConfig, tokenizer: RolloutTokenizer) -> tuple[GroupScan, bool]:
    """Pass 1: validate every record; keep (group, raw reward, outcome) per document. Also says
    whether any document is a conversation (then the tokenizer needs a chat template)."""
    group_ids: dict[bytes, int] = {}
    group, raw, outcome = array("q"), array("d"), array("b")
    paths, progress = config.inputs, config.progress
    chat = config.chat_template
    for rollout in tqdm(
        config.documents(),
        desc="pass 1/2 (validate, group)",
        unit=" rollouts",
        disable=None if progress else True,
    ):
        if rollout.messages is not None and not chat:
            try:
                tokenizer.chat_format()
            except RolloutDataError as exc:
                raise RolloutDataError(
                    f"{rollout.where}: this record holds a conversation in "
                    f"'{config.fields.messages}', which is rendered with the tokenizer's chat "
                    f"template, but {exc}"
                ) from None
            chat = True
        group.append(group_ids.setdefault(rollout.group_key, len(group_ids)))
        raw.append(rollout.raw_reward)
        outcome.append(rollout.outcome)
    if not group:
        raise RolloutDataError(f"no rollouts found in {', '.join(map(str, paths))}.")
    scan = GroupScan(
        np.frombuffer(group, dtype=np.int64),
        np.frombuffer(raw, dtype=np.float64),
        np.frombuffer(outcome, dtype=np.int8),
        len(group_ids),
    )
    return scan, chat


def _chunks(
    config: PackConfig, keep: np.ndarray, chat: ChatFormat | None
) -> Iterator[tuple[tuple[list[int], list[Location]], DocumentBatch]]:
    """Pass 2 reader: kept rollouts in chunks of ``(indices, locations), DocumentBatch``;
    conversations are rendered here (jinja needs the full HF tokenizer)."""
    count = 0
    # Pairs stay in one chunk: the writer decides about both members together.
    chunk_size = config.chunk_size + (config.chunk_size % 2 if config.pairs != "none" else 0)

    def new_batch() -> DocumentBatch:  # is_chat None: the fast path, plain rollouts only
        return DocumentBatch([], [], [], None if chat is None else [])

    indices, locations, batch = [], [], new_batch()
    for index, rollout in enumerate(config.documents()):
        count = index + 1
        if index >= keep.size:
            break
        if not keep[index]:
            continue
        indices.append(index)
        locations.append(rollout.where)
        messages = rollout.messages
        if messages is None and config.chat_template:
            messages = one_turn(rollout.prompt, rollout.response)
        if messages is None:
            batch.prompts.append(rollout.prompt)
            batch.responses.append(rollout.response)
        else:
            try:
                batch.chats.append(chat.plan(messages, config.train_on))
            except RolloutDataError as exc:
                raise RolloutDataError(f"{rollout.where}: {exc}") from None
        if batch.is_chat is not None:
            batch.is_chat.append(messages is not None)
        if len(indices) == chunk_size:
            yield (indices, locations), batch
            indices, locations, batch = [], [], new_batch()
    if count != keep.size:
        raise RolloutDataError(
            f"the input changed while packing ({keep.size} rollouts in pass 1, "
            f"{count} in pass 2); do not modify input files during packing."
        )
    if indices:
        yield (indices, locations), batch


def _config_record(config: PackConfig) -> dict:
    record = dataclasses.asdict(config)
    record["inputs"] = [str(p) for p in config.inputs]
    record.pop("progress")
    return record


def pack_rollouts(config: PackConfig) -> dict:
    """Pack ``config.inputs`` into ``config.output_prefix``.*; return what ``PREFIX.json`` holds.

    Raises :class:`RolloutDataError` (nothing written) for bad input, options or tokenizer.
    """
    config.validate()
    final = output_paths(config.output_prefix)
    existing = [p for p in final.values() if os.path.exists(p)]
    if existing and not config.overwrite:
        raise RolloutDataError(
            f"{', '.join(existing)} already exist(s); pass --overwrite to "
            "replace the packed dataset, or choose another --output-prefix."
        )
    tokenizer = load_tokenizer(config.tokenizer)
    if config.chat_template:
        tokenizer.chat_format()  # raises the explanatory error for a tokenizer without one
    scan, uses_chat = scan_groups(config, tokenizer)
    chat = tokenizer.chat_format() if uses_chat else None
    rewards = scheme_rewards(
        config.reward_scheme,
        scan.raw,
        scan.outcome,
        scan.group,
        config.positive_reward,
        config.negative_reward,
    )
    keep = scan.outcome > 0 if config.keep == "positive" else np.ones(scan.group.size, bool)

    out_dir = Path(config.output_prefix).resolve().parent
    created_dir = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{Path(config.output_prefix).name}.packing-", dir=out_dir)
    published = False
    try:
        tmp = {**output_paths(os.path.join(tmp_dir, "data")), "data": os.path.join(tmp_dir, "data")}
        summary = _pack_into(config, tokenizer, chat, scan, rewards, keep, tmp)
        spans = config.output_prefix + LOSS_SPANS_SUFFIX
        for suffix in OUTPUT_SUFFIXES:  # the .json last: it marks a complete dataset
            if suffix == ".json":  # the loss spans before it; none left from an older dataset
                if summary["loss_spans"]:
                    os.replace(tmp["data"] + LOSS_SPANS_SUFFIX, spans)
                elif os.path.exists(spans):
                    os.remove(spans)
            os.replace(tmp[suffix], final[suffix])
        published = True
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if created_dir and not published and not any(out_dir.iterdir()):
            out_dir.rmdir()
    return summary


def _pack_into(
    config: PackConfig,
    tokenizer: RolloutTokenizer,
    chat: ChatFormat | None,
    scan: GroupScan,
    rewards: np.ndarray,
    keep: np.ndarray,
    paths: dict[str, str],
) -> dict:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset

    writer = DatasetWriter(
        paths[".bin"], config.max_seq_length, config.overlong, config.pairs != "none"
    )
    chat_spec = None if chat is None else chat.worker_spec()
    with (
        ChunkEncoder(tokenizer, chat_spec, config.workers) as encoder,
        tqdm(
            total=int(keep.sum()),
            desc="pass 2/2 (tokenize, write)",
            unit=" rollouts",
            disable=None if config.progress else True,
        ) as bar,
    ):
        for (indices, locations), chunk in encoder.map(_chunks(config, keep, chat)):
            writer.add_chunk(indices, locations, chunk)
            bar.update(len(indices))
    writer.finalize(paths[".idx"])
    written = np.frombuffer(writer.written, dtype=np.int64)
    if written.size == 0:
        raise RolloutDataError(
            f"no rollouts left to write: {scan.group.size} read, {int((~keep).sum())} removed by "
            f"--keep {config.keep}, {writer.overlong_dropped} dropped as overlong."
        )

    side = np.zeros(written.size, dtype=SIDE_DTYPE)
    side["reward"] = rewards[written]
    side["raw_reward"] = scan.raw[written]
    side["response_start"] = np.frombuffer(writer.response_start, dtype=np.int32)
    side["response_end"] = np.frombuffer(writer.response_end, dtype=np.int32)
    side["group"] = scan.group[written]
    side["outcome"] = scan.outcome[written]
    np.save(paths[".rewards.npy"], side)
    loss_spans = None
    if config.train_on == "all-assistant" and chat is not None:
        np.save(paths["data"] + LOSS_SPANS_SUFFIX, writer.span_rows())
        loss_spans = Path(config.output_prefix).name + LOSS_SPANS_SUFFIX

    summary = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "token_dtype": TOKEN_DTYPE.name,
        "token_dtype_code": DType.code_from_dtype(TOKEN_DTYPE.type),
        "side_file_fields": list(SIDE_DTYPE.names),
        "tokenizer": tokenizer.info(),
        # Which template (sha256) and end-of-turn the conversations were rendered with.
        "chat_template": None if chat is None else chat.info(config.train_on),
        "loss_spans": loss_spans,
        "arguments": _config_record(config),
        "input_files": expand_inputs(config.inputs),
        **statistics(scan.group, scan.outcome, scan.num_groups, written),
        "prompt_tokens": writer.prompt_tokens,
        "response_tokens": writer.response_tokens,
        "total_tokens": writer.prompt_tokens + writer.response_tokens,
        "loss_tokens": writer.loss_tokens,
        "overlong": writer.overlong,
        "overlong_dropped": writer.overlong_dropped,
        "overlong_truncated": writer.overlong_truncated,
        "removed_by_keep": int((~keep).sum()),
        "pairs": None if config.pairs == "none" else config.pairs,
        "num_pairs": written.size // 2 if config.pairs != "none" else 0,
        "pairs_dropped": writer.pairs_dropped,
        "reward_mean": float(side["reward"].astype(np.float64).mean()),
    }
    # Read back what Megatron will read, before publishing anything.
    readback = IndexedDataset(os.path.join(os.path.dirname(paths[".bin"]), "data"), mmap=True)
    if len(readback) != written.size:
        raise RuntimeError(f"wrote {written.size} rollouts but the .idx holds {len(readback)}")
    del readback
    with open(paths[".json"], "w") as handle:
        json.dump(summary, handle, indent=2)
        handle.write("\n")
    return summary
