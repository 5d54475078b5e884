"""``RewardDataset``: read a packed rollout dataset (``PREFIX.bin/.idx/.rewards.npy/.json``).

Tokens come from Megatron's memory-mapped ``IndexedDataset``; rewards, response spans and groups
from ``PREFIX.rewards.npy`` (and earlier trained assistant turns from ``PREFIX.loss_spans.npy``)
opened with ``mmap_mode="r"``. Nothing is loaded eagerly beyond the
index, so every data-parallel rank can open the same files cheaply.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from megatron_rift.data.errors import RolloutDataError
from megatron_rift.data.format import (
    FORMAT_NAME,
    SIDE_DTYPE,
    SIDE_DTYPE_V1,
    SPAN_DTYPE,
    output_paths,
)
from megatron_rift.data.shared_prefix import SHARED_PREFIX_DTYPE, SHARED_PREFIX_SUFFIX


class RewardDataset(torch.utils.data.Dataset):
    """One item per rollout.

    ``ds[i]`` is a dict:

    * ``tokens``: int32 numpy [L] (read-only view of the memory map): prompt + response + EOS
      (a truncated overlong rollout has no EOS), or a conversation's chat-template tokens;
    * ``loss_mask``: uint8 numpy [L], 1 on the trained tokens: ``[response_start,
      response_end)`` (the response with its EOS or end-of-turn) and, under
      ``--train-on all-assistant``, the earlier assistant turns; 0 elsewhere;
    * ``reward``: float, the training reward (after the packing reward scheme);
    * ``group``: int, problem id; ``response_start``, ``response_end``: int; ``index``: int, = i;
    * ``shared_prefix``: int, the response tokens this rollout shares with a positive rollout of
      its group (0 for positives; ``--negative-mode divergent``); only for datasets packed with it.

    Attributes: ``lengths`` (int32 [N], tokens per rollout), ``rewards`` (float32 [N]),
    ``groups`` (int32 [N]), ``response_ends`` (int32 [N]), ``loss_tokens`` (int64 [N], trained
    tokens per rollout), ``info`` (the ``PREFIX.json`` dict), ``pad_id``, ``eos_id``,
    ``vocab_size``.
    """

    def __init__(self, prefix: str, mmap: bool = True):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = str(prefix)
        paths = output_paths(self.prefix)
        missing = [p for p in paths.values() if not os.path.isfile(p)]
        if missing:
            raise RolloutDataError(
                f"packed dataset {self.prefix} is incomplete: missing {', '.join(missing)}. "
                "Re-run tools/pack_rollouts.py for this --output-prefix."
            )
        with open(paths[".json"]) as handle:
            self.info = json.load(handle)
        if self.info.get("format") != FORMAT_NAME:
            raise RolloutDataError(
                f"{paths['.json']} is not a {FORMAT_NAME} description "
                "(written by tools/pack_rollouts.py)."
            )
        self.tokens = IndexedDataset(self.prefix, mmap=mmap)
        self.side = np.load(paths[".rewards.npy"], mmap_mode="r")
        self.spans = None  # earlier trained spans (SPAN_DTYPE rows, sorted by document)
        if self.info.get("loss_spans"):
            spans_path = os.path.join(os.path.dirname(self.prefix), self.info["loss_spans"])
            if not os.path.isfile(spans_path):
                raise RolloutDataError(
                    f"packed dataset {self.prefix} is incomplete: missing {spans_path}. "
                    "Re-run tools/pack_rollouts.py for this --output-prefix."
                )
            self.spans = np.load(spans_path, mmap_mode="r")
        # Per document, response tokens shared with a positive of its group (--negative-mode
        # divergent); None for datasets packed before it existed.
        self.shared_prefix = None
        if self.info.get("shared_prefix"):
            path = self.prefix + SHARED_PREFIX_SUFFIX  # this prefix's, also in a renamed copy
            if not os.path.isfile(path):
                raise RolloutDataError(
                    f"packed dataset {self.prefix} is incomplete: missing {path}. "
                    "Re-run tools/pack_rollouts.py for this --output-prefix."
                )
            self.shared_prefix = np.load(path, mmap_mode="r")
        self._check(paths)
        tokenizer = self.info["tokenizer"]
        self.pad_id, self.eos_id = int(tokenizer["pad_id"]), int(tokenizer["eos_id"])
        self.vocab_size = int(tokenizer["vocab_size"])

    def _check(self, paths: dict) -> None:
        side_file = paths[".rewards.npy"]
        if self.side.dtype not in (SIDE_DTYPE, SIDE_DTYPE_V1) or self.side.ndim != 1:
            raise RolloutDataError(
                f"{side_file} has dtype {self.side.dtype}, shape "
                f"{self.side.shape}; expected 1-D {SIDE_DTYPE}. Re-pack."
            )
        documents = len(self.tokens.document_indices) - 1
        if not (len(self.tokens) == documents == self.side.shape[0] == self.info.get("rollouts")):
            raise RolloutDataError(
                f"packed dataset {self.prefix} does not match itself: {paths['.idx']} holds "
                f"{len(self.tokens)} sequences in {documents} documents, {side_file} "
                f"{self.side.shape[0]} rows, {paths['.json']} says {self.info.get('rollouts')} "
                "rollouts. The files come from different runs; re-pack."
            )
        start, end = np.asarray(self.side["response_start"]), self.response_ends
        if np.any(start < 1) or np.any(end <= start) or np.any(end > self.lengths):
            bad = int(np.flatnonzero((start < 1) | (end <= start) | (end > self.lengths))[0])
            raise RolloutDataError(
                f"{side_file}: rollout {bad} has response_start {start[bad]}, response_end "
                f"{end[bad]}, not 1 <= start < end <= {self.lengths[bad]} (its length); the side "
                f"file does not belong to {paths['.idx']}. Re-pack."
            )
        if self.spans is not None:
            spans = self.spans
            document = np.asarray(spans["document"])
            if (
                spans.dtype != SPAN_DTYPE
                or np.any(np.diff(document) < 0)
                or np.any((document < 0) | (document >= len(self)))
                or np.any(spans["start"] >= spans["end"])
                or np.any(spans["end"] > start[document])
            ):
                raise RolloutDataError(
                    f"{self.info['loss_spans']} does not belong to {paths['.idx']} (spans out of "
                    "order or outside the prompts of their documents). Re-pack."
                )

        if self.shared_prefix is not None:
            shared = self.shared_prefix
            if (
                shared.dtype != SHARED_PREFIX_DTYPE
                or shared.shape != (len(self),)
                or np.any(shared < 0)
                or np.any(shared > end - start)
            ):
                raise RolloutDataError(
                    f"{self.prefix}{SHARED_PREFIX_SUFFIX} does not belong to {paths['.idx']} (not one "
                    "shared prefix per document within its response). Re-pack."
                )

    @property
    def lengths(self) -> np.ndarray:
        return self.tokens.sequence_lengths

    @property
    def response_ends(self) -> np.ndarray:
        if "response_end" in self.side.dtype.names:
            return np.asarray(self.side["response_end"])
        return np.asarray(self.lengths, dtype=np.int32)  # format version 1: to the end

    @property
    def loss_tokens(self) -> np.ndarray:
        """int64 [N]: tokens under each rollout's loss mask."""
        counts = self.response_ends.astype(np.int64) - self.side["response_start"].astype(np.int64)
        if self.spans is not None and self.spans.size:
            lengths = (self.spans["end"] - self.spans["start"]).astype(np.int64)
            np.add.at(counts, np.asarray(self.spans["document"]), lengths)
        return counts

    @property
    def rewards(self) -> np.ndarray:
        return self.side["reward"]

    @property
    def groups(self) -> np.ndarray:
        return self.side["group"]

    def __len__(self) -> int:
        return self.side.shape[0]

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"rollout {index} out of range for {len(self)} rollouts")
        index %= len(self)
        tokens = self.tokens[index]
        row = self.side[index]
        start = int(row["response_start"])
        end = int(row["response_end"]) if "response_end" in row.dtype.names else tokens.shape[0]
        loss_mask = np.zeros(tokens.shape[0], dtype=np.uint8)
        loss_mask[start:end] = 1
        if self.spans is not None:
            first, stop = np.searchsorted(self.spans["document"], (index, index + 1))
            for span in self.spans[first:stop]:
                loss_mask[span["start"] : span["end"]] = 1
        item = {
            "tokens": tokens,
            "loss_mask": loss_mask,
            "reward": float(row["reward"]),
            "group": int(row["group"]),
            "response_start": start,
            "response_end": end,
            "index": index,
        }
        if self.shared_prefix is not None:
            item["shared_prefix"] = int(self.shared_prefix[index])
        return item


SEQ_LENGTH_MULTIPLE = 16  # FP8 GEMMs want token counts divisible by 16


def fit_seq_length(dataset: RewardDataset, seq_length: int | None = None) -> int:
    """``seq_length``, or the longest document rounded up to a multiple of 16; RolloutDataError
    when a document does not fit. Reads only the index."""
    longest = int(np.max(dataset.lengths))
    fitted = seq_length or -(-longest // SEQ_LENGTH_MULTIPLE) * SEQ_LENGTH_MULTIPLE
    if longest > fitted:
        where = int(np.argmax(dataset.lengths))
        raise RolloutDataError(
            f"--seq-length {fitted} is shorter than rollout {where} of {dataset.prefix} "
            f"({longest} tokens); raise --seq-length to at least {longest} or re-pack with "
            f"--max-seq-length {fitted}"
        )
    return fitted
