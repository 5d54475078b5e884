"""Pack rollout files into a Megatron indexed dataset plus per-rollout rewards (``pack_rollouts``).

One streaming pass over the input: each record is validated, its ``(group, raw reward,
outcome)`` kept (~17 bytes; the group reward schemes need whole groups, so rewards are computed
at the end), and the kept rollouts are tokenized in chunks (optionally in a worker pool) and
written, in input order:

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
from megatron_rift.data.integrity import CHECKSUMS_KEY, record_checksums
from megatron_rift.data.reward_schemes import REWARD_SCHEMES, scheme_rewards
from megatron_rift.data.rollout_reader import (
    PAIRS_MODES,
    Location,
    Rollout,
    RolloutFields,
    expand_inputs,
    iter_documents,
)
from megatron_rift.data.shared_prefix import SHARED_PREFIX_SUFFIX, shared_prefix_lengths
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


class GroupScan:
    """Per input rollout, in input order: group (dense id, int64), raw reward (float64) and
    outcome (int8), collected while packing for the reward schemes and the statistics."""

    def __init__(self):
        self._ids: dict[bytes, int] = {}
        self._group, self._raw, self._outcome = array("q"), array("d"), array("b")

    def add(self, rollout: Rollout) -> None:
        self._group.append(self._ids.setdefault(rollout.group_key, len(self._ids)))
        self._raw.append(rollout.raw_reward)
        self._outcome.append(rollout.outcome)

    @property
    def num_groups(self) -> int:
        return len(self._ids)

    @property
    def group(self) -> np.ndarray:
        return np.frombuffer(self._group, dtype=np.int64)

    @property
    def raw(self) -> np.ndarray:
        return np.frombuffer(self._raw, dtype=np.float64)

    @property
    def outcome(self) -> np.ndarray:
        return np.frombuffer(self._outcome, dtype=np.int8)


class _Reader:
    """The input as chunks of ``((indices, locations), DocumentBatch)`` of the kept rollouts;
    fills ``scan`` with every rollout as it goes. Conversations are rendered here (jinja needs
    the full HF tokenizer); ``chat`` is the tokenizer's chat format once one was needed."""

    def __init__(self, config: PackConfig, tokenizer: RolloutTokenizer):
        self.config, self.tokenizer = config, tokenizer
        self.scan = GroupScan()
        self.chat: ChatFormat | None = tokenizer.chat_format() if config.chat_template else None
        self.removed_by_keep = 0

    def _chat_for(self, rollout: Rollout) -> ChatFormat:
        if self.chat is None:
            try:
                self.chat = self.tokenizer.chat_format()
            except RolloutDataError as exc:
                raise RolloutDataError(
                    f"{rollout.where}: this record holds a conversation in "
                    f"'{self.config.fields.messages}', which is rendered with the tokenizer's "
                    f"chat template, but {exc}"
                ) from None
        return self.chat

    def __iter__(self) -> Iterator[tuple[tuple[list[int], list[Location]], DocumentBatch]]:
        config = self.config
        positives_only = config.keep == "positive"
        # Pairs stay in one chunk: the writer decides about both members together.
        chunk_size = config.chunk_size + (config.chunk_size % 2 if config.pairs != "none" else 0)
        indices, locations, batch = [], [], DocumentBatch([], [], [])
        for index, rollout in enumerate(config.documents()):
            self.scan.add(rollout)
            if positives_only and rollout.outcome <= 0:
                self.removed_by_keep += 1
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
                chat = self._chat_for(rollout)
                try:
                    batch.chats.append(chat.plan(messages, config.train_on))
                except RolloutDataError as exc:
                    raise RolloutDataError(f"{rollout.where}: {exc}") from None
                if batch.is_chat is None:  # the first conversation of this chunk
                    batch.is_chat = [False] * len(batch.prompts)
                    batch.chat_spec = chat.worker_spec()
            if batch.is_chat is not None:
                batch.is_chat.append(messages is not None)
            if len(indices) == chunk_size:
                yield (indices, locations), batch
                indices, locations, batch = [], [], DocumentBatch([], [], [])
        if indices:
            yield (indices, locations), batch
        if not self.scan.group.size:
            raise RolloutDataError(f"no rollouts found in {', '.join(map(str, config.inputs))}.")


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

    out_dir = Path(config.output_prefix).resolve().parent
    created_dir = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{Path(config.output_prefix).name}.packing-", dir=out_dir)
    published = False
    try:
        tmp = {**output_paths(os.path.join(tmp_dir, "data")), "data": os.path.join(tmp_dir, "data")}
        summary = _pack_into(config, tokenizer, tmp)
        spans = config.output_prefix + LOSS_SPANS_SUFFIX
        final_shared_prefix = config.output_prefix + SHARED_PREFIX_SUFFIX
        for suffix in OUTPUT_SUFFIXES:  # the .json last: it marks a complete dataset
            # The loss spans and shared prefixes before it; no loss spans left from an older one.
            if suffix == ".json":
                if summary["loss_spans"]:
                    os.replace(tmp["data"] + LOSS_SPANS_SUFFIX, spans)
                elif os.path.exists(spans):
                    os.remove(spans)
                os.replace(tmp["data"] + SHARED_PREFIX_SUFFIX, final_shared_prefix)
            os.replace(tmp[suffix], final[suffix])
        published = True
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if created_dir and not published and not any(out_dir.iterdir()):
            out_dir.rmdir()
    return summary


def _write_shared_prefix(
    paths: dict[str, str], side: np.ndarray, lengths: np.ndarray, name: str
) -> dict:
    """``data.shared_prefix.npy`` (megatron_rift/data/shared_prefix.py) from the written ``.bin``;
    returns what ``PREFIX.json`` records about it."""
    offsets = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    tokens = np.memmap(paths[".bin"], dtype=TOKEN_DTYPE, mode="r")
    shared = shared_prefix_lengths(
        tokens,
        offsets,
        side["response_start"],
        side["response_end"],
        side["group"],
        side["outcome"],
    )
    del tokens
    np.save(paths["data"] + SHARED_PREFIX_SUFFIX, shared)
    return {
        "shared_prefix": name,  # the file, next to the prefix (like loss_spans)
        "negatives_with_shared_prefix": int(np.count_nonzero(shared)),
        "shared_prefix_tokens": int(shared.sum(dtype=np.int64)),
    }


def _pack_into(config: PackConfig, tokenizer: RolloutTokenizer, paths: dict[str, str]) -> dict:
    writer = DatasetWriter(
        paths[".bin"], config.max_seq_length, config.overlong, config.pairs != "none"
    )
    reader = _Reader(config, tokenizer)
    with (
        ChunkEncoder(tokenizer, config.workers) as encoder,
        tqdm(
            desc="packing (validate, tokenize, write)",
            unit=" rollouts",
            disable=None if config.progress else True,
        ) as bar,
    ):
        for (indices, locations), chunk in encoder.map(reader):
            writer.add_chunk(indices, locations, chunk)
            bar.update(len(indices))
    scan, chat = reader.scan, reader.chat
    written = np.frombuffer(writer.written, dtype=np.int64)
    if written.size == 0:
        raise RolloutDataError(
            f"no rollouts left to write: {scan.group.size} read, {reader.removed_by_keep} "
            f"removed by --keep {config.keep}, {writer.overlong_dropped} dropped as overlong."
        )
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset

    writer.finalize(paths[".idx"])
    rewards = scheme_rewards(
        config.reward_scheme,
        scan.raw,
        scan.outcome,
        scan.group,
        config.positive_reward,
        config.negative_reward,
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
        "removed_by_keep": reader.removed_by_keep,
        "pairs": None if config.pairs == "none" else config.pairs,
        "num_pairs": written.size // 2 if config.pairs != "none" else 0,
        "pairs_dropped": writer.pairs_dropped,
        "reward_mean": float(side["reward"].astype(np.float64).mean()),
    }
    # Read back what Megatron will read, before publishing anything.
    readback = IndexedDataset(os.path.join(os.path.dirname(paths[".bin"]), "data"), mmap=True)
    if len(readback) != written.size:
        raise RuntimeError(f"wrote {written.size} rollouts but the .idx holds {len(readback)}")
    shared_prefix_name = Path(config.output_prefix).name + SHARED_PREFIX_SUFFIX
    summary.update(_write_shared_prefix(paths, side, readback.sequence_lengths, shared_prefix_name))
    del readback
    # crc32 of every file and of this description: a damaged copy is refused, not trained on.
    spans_file = paths["data"] + LOSS_SPANS_SUFFIX if loss_spans else None
    summary[CHECKSUMS_KEY] = record_checksums(
        paths["data"],
        summary,
        spans_file,
        paths["data"] + SHARED_PREFIX_SUFFIX,
        bin_crc32=writer.bin_crc32,
    )
    with open(paths[".json"], "w") as handle:
        json.dump(summary, handle, indent=2)
        handle.write("\n")
    return summary
