"""Pack rollout files into a Megatron indexed dataset plus per-rollout rewards (``pack_rollouts``).

Two streaming passes over the input:

1. validate every record and keep only ``(group, raw reward, outcome)`` per rollout (~17 bytes),
   which is what the group reward schemes need (they need whole groups);
2. tokenize in chunks (optionally in a worker pool) and write, in input order:

* ``PREFIX.bin`` / ``PREFIX.idx``: Megatron ``IndexedDataset``, one document (one sequence) per
  rollout, int32 token ids ``prompt + response + EOS``, written with ``IndexedDatasetBuilder``;
* ``PREFIX.rewards.npy``: a structured array, one row per document, load with
  ``np.load(..., mmap_mode="r")``; fields in :data:`~megatron_rift.data.format.SIDE_DTYPE`;
* ``PREFIX.json``: format, arguments, tokenizer info and statistics (see ``docs/packing.md``).

All four are written under a hidden temporary folder next to the prefix and renamed into place
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

from megatron_rift.data.encoding import ChunkEncoder, EncodedChunk
from megatron_rift.data.errors import RolloutDataError
from megatron_rift.data.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    OUTPUT_SUFFIXES,
    SIDE_DTYPE,
    TOKEN_DTYPE,
    output_paths,
)
from megatron_rift.data.reward_schemes import REWARD_SCHEMES, scheme_rewards
from megatron_rift.data.rollout_reader import PAIRS_MODES, Location, RolloutFields, iter_documents
from megatron_rift.data.tokenizer import RolloutTokenizer, load_tokenizer

OVERLONG_MODES = ("error", "drop", "truncate")
KEEP_MODES = ("all", "positive")


@dataclass
class PackConfig:
    """Arguments of :func:`pack_rollouts` (the CLI flags of ``tools/pack_rollouts.py``)."""

    inputs: Sequence[str]
    output_prefix: str
    tokenizer: str
    chat_template: bool = False
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

    def documents(self):
        return iter_documents(self.inputs, self.fields, self.pairs)


@dataclass
class GroupScan:
    """Pass 1 result, one entry per input rollout: group int64 [N], raw float64 [N], outcome int8 [N]."""

    group: np.ndarray
    raw: np.ndarray
    outcome: np.ndarray
    num_groups: int


def scan_groups(config: PackConfig) -> GroupScan:
    """Pass 1: validate every record; keep (group, raw reward, outcome) per document."""
    group_ids: dict[bytes, int] = {}
    group, raw, outcome = array("q"), array("d"), array("b")
    paths, progress = config.inputs, config.progress
    for rollout in tqdm(
        config.documents(),
        desc="pass 1/2 (validate, group)",
        unit=" rollouts",
        disable=None if progress else True,
    ):
        group.append(group_ids.setdefault(rollout.group_key, len(group_ids)))
        raw.append(rollout.raw_reward)
        outcome.append(rollout.outcome)
    if not group:
        raise RolloutDataError(f"no rollouts found in {', '.join(map(str, paths))}.")
    return GroupScan(
        np.frombuffer(group, dtype=np.int64),
        np.frombuffer(raw, dtype=np.float64),
        np.frombuffer(outcome, dtype=np.int8),
        len(group_ids),
    )


def _chunks(
    config: PackConfig, keep: np.ndarray
) -> Iterator[tuple[tuple[list[int], list[Location]], list[str], list[str]]]:
    """Pass 2 reader: kept rollouts in chunks of ``(indices, locations), prompts, responses``."""
    indices, locations, prompts, responses = [], [], [], []
    count = 0
    # Pairs stay in one chunk: the writer decides about both members together.
    chunk_size = config.chunk_size + (config.chunk_size % 2 if config.pairs != "none" else 0)
    for index, rollout in enumerate(config.documents()):
        count = index + 1
        if index >= keep.size:
            break
        if not keep[index]:
            continue
        indices.append(index)
        locations.append(rollout.where)
        prompts.append(rollout.prompt)
        responses.append(rollout.response)
        if len(indices) == chunk_size:
            yield (indices, locations), prompts, responses
            indices, locations, prompts, responses = [], [], [], []
    if count != keep.size:
        raise RolloutDataError(
            f"the input changed while packing ({keep.size} rollouts in pass 1, "
            f"{count} in pass 2); do not modify input files during packing."
        )
    if indices:
        yield (indices, locations), prompts, responses


class _DatasetWriter:
    """Pass 2 writer: documents into ``IndexedDatasetBuilder``, overlong policy, token counts."""

    def __init__(self, bin_path: str, config: PackConfig):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.builder = IndexedDatasetBuilder(bin_path, dtype=TOKEN_DTYPE.type)
        self.config = config
        self.written = array("q")  # input index of each written rollout
        self.response_start = array("i")
        self.prompt_tokens = self.response_tokens = 0
        self.overlong = self.overlong_dropped = self.overlong_truncated = 0
        self.pairs_dropped = 0

    def add_chunk(self, indices: list[int], locations: list[Location], chunk: EncodedChunk) -> None:
        offsets = chunk.offsets
        kept = [self._fit(j, locations[j], chunk) for j in range(len(indices))]
        if self.config.pairs != "none":  # a pair is written whole or not at all
            for j in range(0, len(kept), 2):
                if kept[j] is None or kept[j + 1] is None:
                    self.overlong_dropped += (kept[j] is not None) + (kept[j + 1] is not None)
                    self.pairs_dropped += 1
                    kept[j] = kept[j + 1] = None
        for j, index in enumerate(indices):
            if kept[j] is None:
                continue
            length, prompt_length = kept[j]
            start = int(offsets[j])
            self.builder.add_document(chunk.tokens[start : start + length], [length])
            self.written.append(index)
            self.response_start.append(prompt_length)
            self.prompt_tokens += prompt_length
            self.response_tokens += length - prompt_length

    def _fit(self, j: int, where: Location, chunk: EncodedChunk) -> tuple[int, int] | None:
        """(length to write, prompt length) of document j under the overlong policy, or None."""
        max_len = self.config.max_seq_length
        length, prompt_length = int(chunk.rollout_lengths[j]), int(chunk.prompt_lengths[j])
        if prompt_length == 0:
            raise RolloutDataError(
                f"{where}: the prompt encodes to 0 tokens, so the first response token "
                "would have nothing to be predicted from. Give a non-empty prompt, or use "
                "--chat-template or a tokenizer that adds BOS."
            )
        if max_len is None or length <= max_len:
            return length, prompt_length
        self.overlong += 1
        if self.config.overlong == "error":
            raise RolloutDataError(
                f"{where}: rollout has {length} tokens (prompt {prompt_length}, "
                f"response+EOS {length - prompt_length}) > --max-seq-length {max_len}. "
                "Pass --overlong drop or --overlong truncate, or raise --max-seq-length."
            )
        if self.config.overlong == "drop" or prompt_length >= max_len:
            self.overlong_dropped += 1  # truncation would leave no response token
            return None
        # Cut the response's tail; its EOS goes with it (the response did not end there).
        self.overlong_truncated += 1
        return max_len, prompt_length

    def finalize(self, idx_path: str) -> None:
        self.builder.finalize(idx_path)


def _statistics(scan: GroupScan, written: np.ndarray) -> dict:
    """Table 1 / table 4 statistics of the written rollouts, and of the input."""

    def of(selection: np.ndarray) -> dict:
        groups, outcome = scan.group[selection], scan.outcome[selection]
        positive = outcome > 0
        has_pos = np.zeros(scan.num_groups, bool)
        has_neg = np.zeros(scan.num_groups, bool)
        has_pos[groups[positive]] = True
        has_neg[groups[~positive]] = True
        problems = int(np.unique(groups).size)
        rollouts = int(selection.size)
        mixed = int(np.sum(has_pos & has_neg))
        return {
            "problems": problems,
            "rollouts": rollouts,
            "positive": int(positive.sum()),
            "negative": int(rollouts - positive.sum()),
            "zero_reward": int(np.sum(outcome == 0)),
            "positive_fraction": float(positive.sum() / rollouts) if rollouts else 0.0,
            "mixed_problems": mixed,
            "mixed_fraction": mixed / problems if problems else 0.0,
        }

    stats = of(written)
    everything = of(np.arange(scan.group.size))
    stats.update({f"input_{key}": value for key, value in everything.items()})
    return stats


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
    if config.chat_template and not tokenizer.has_chat_template:
        tokenizer.render_chat_prompt("")  # raises the explanatory error
    scan = scan_groups(config)
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
        tmp = output_paths(os.path.join(tmp_dir, "data"))
        summary = _pack_into(config, tokenizer, scan, rewards, keep, tmp)
        for suffix in OUTPUT_SUFFIXES:  # the .json last: it marks a complete dataset
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
    scan: GroupScan,
    rewards: np.ndarray,
    keep: np.ndarray,
    paths: dict[str, str],
) -> dict:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset

    writer = _DatasetWriter(paths[".bin"], config)
    with (
        ChunkEncoder(tokenizer, config.chat_template, config.workers) as encoder,
        tqdm(
            total=int(keep.sum()),
            desc="pass 2/2 (tokenize, write)",
            unit=" rollouts",
            disable=None if config.progress else True,
        ) as bar,
    ):
        for (indices, locations), chunk in encoder.map(_chunks(config, keep)):
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
    side["group"] = scan.group[written]
    side["outcome"] = scan.outcome[written]
    np.save(paths[".rewards.npy"], side)

    summary = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "token_dtype": TOKEN_DTYPE.name,
        "token_dtype_code": DType.code_from_dtype(TOKEN_DTYPE.type),
        "side_file_fields": list(SIDE_DTYPE.names),
        "tokenizer": tokenizer.info(),
        "arguments": _config_record(config),
        **_statistics(scan, written),
        "prompt_tokens": writer.prompt_tokens,
        "response_tokens": writer.response_tokens,
        "total_tokens": writer.prompt_tokens + writer.response_tokens,
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
