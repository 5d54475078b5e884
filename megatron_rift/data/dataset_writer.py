"""Pass 2 of packing: tokenized chunks into Megatron's ``IndexedDatasetBuilder``, the overlong
policy, trained spans and token counts; then the statistics ``PREFIX.json`` records."""

from __future__ import annotations

import zlib
from array import array

import numpy as np

from megatron_rift.data.encoding import EncodedChunk
from megatron_rift.data.errors import RolloutDataError
from megatron_rift.data.format import SPAN_DTYPE, TOKEN_DTYPE
from megatron_rift.data.rollout_reader import Location


class DatasetWriter:
    """Writes documents in order; keeps per written document its input index, response start and
    end, and the earlier trained spans (``--train-on all-assistant``)."""

    def __init__(self, bin_path: str, max_seq_length: int | None, overlong: str, pairs: bool):
        self.bin_path, self._builder = bin_path, None
        self.max_seq_length, self.overlong_mode, self.pairs = max_seq_length, overlong, pairs
        self.written = array("q")  # input index of each written rollout
        self.response_start = array("i")
        self.response_end = array("i")
        self.spans = array("i")  # (document, start, end) triples
        self.prompt_tokens = self.response_tokens = self.loss_tokens = 0
        self.overlong = self.overlong_dropped = self.overlong_truncated = 0
        self.pairs_dropped = 0
        self.bin_crc32 = 0  # of every byte written to the .bin, so it is not read back for it

    @property
    def builder(self):
        # Created with the first document: a bad record early in the input fails before the
        # ~5 s import of Megatron-Core (torch).
        if self._builder is None:
            from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

            self._builder = IndexedDatasetBuilder(self.bin_path, dtype=TOKEN_DTYPE.type)
        return self._builder

    def add_chunk(self, indices: list[int], locations: list[Location], chunk: EncodedChunk) -> None:
        offsets, ends = chunk.offsets, chunk.ends
        kept = [self._fit(j, locations[j], chunk, int(ends[j])) for j in range(len(indices))]
        if self.pairs:  # a pair is written whole or not at all
            for j in range(0, len(kept), 2):
                if kept[j] is None or kept[j + 1] is None:
                    self.overlong_dropped += (kept[j] is not None) + (kept[j + 1] is not None)
                    self.pairs_dropped += 1
                    kept[j] = kept[j + 1] = None
        extra: dict[int, list] = {}
        for j, start, end in chunk.extra_spans:
            extra.setdefault(j, []).append((start, end))
        pieces, lengths = [], []
        for j, index in enumerate(indices):
            if kept[j] is None:
                continue
            length, prompt_length, response_end = kept[j]
            start = int(offsets[j])
            document = len(self.written)
            pieces.append(chunk.tokens[start : start + length])
            lengths.append(length)
            self.written.append(index)
            self.response_start.append(prompt_length)
            self.response_end.append(response_end)
            self.prompt_tokens += prompt_length
            self.response_tokens += length - prompt_length
            self.loss_tokens += response_end - prompt_length
            for span_start, span_end in extra.get(j, ()):  # all before the response: they fit
                self.spans.extend((document, span_start, span_end))
                self.loss_tokens += span_end - span_start
        if lengths:
            whole = len(lengths) == len(indices) and sum(lengths) == chunk.tokens.size
            self.bin_crc32 = add_documents(
                self.builder,
                chunk.tokens if whole else np.concatenate(pieces),
                lengths,
                self.bin_crc32,
            )

    def _fit(
        self, j: int, where: Location, chunk: EncodedChunk, response_end: int
    ) -> tuple[int, int, int] | None:
        """(length to write, prompt length, response end) of document j under the overlong
        policy, or None when it is dropped."""
        if chunk.errors and j in chunk.errors:
            raise RolloutDataError(f"{where}: {chunk.errors[j]}")
        max_len = self.max_seq_length
        length, prompt_length = int(chunk.rollout_lengths[j]), int(chunk.prompt_lengths[j])
        if prompt_length == 0:
            raise RolloutDataError(
                f"{where}: the prompt encodes to 0 tokens, so the first response token "
                "would have nothing to be predicted from. Give a non-empty prompt, or use "
                "--chat-template or a tokenizer that adds BOS."
            )
        if max_len is None or length <= max_len:
            return length, prompt_length, response_end
        self.overlong += 1
        if self.overlong_mode == "error":
            after = f", after it {length - response_end}" if response_end < length else ""
            raise RolloutDataError(
                f"{where}: rollout has {length} tokens (prompt {prompt_length}, "
                f"response+EOS {response_end - prompt_length}{after}) > --max-seq-length "
                f"{max_len}. Pass --overlong drop or --overlong truncate, or raise "
                "--max-seq-length."
            )
        if self.overlong_mode == "drop" or prompt_length >= max_len:
            self.overlong_dropped += 1  # truncation would leave no response token
            return None
        # Cut the response's tail; its EOS (end-of-turn) goes with it (it did not end there).
        self.overlong_truncated += 1
        return max_len, prompt_length, min(response_end, max_len)

    def finalize(self, idx_path: str) -> None:
        self.builder.finalize(idx_path)

    def span_rows(self) -> np.ndarray:
        """The earlier trained spans as :data:`SPAN_DTYPE` rows, sorted by document."""
        flat = np.frombuffer(self.spans, dtype=np.int32).reshape(-1, 3)
        rows = np.zeros(flat.shape[0], dtype=SPAN_DTYPE)
        rows["document"], rows["start"], rows["end"] = flat[:, 0], flat[:, 1], flat[:, 2]
        return rows


def add_documents(builder, tokens: np.ndarray, lengths: list[int], crc32: int = 0) -> int:
    """``builder.add_document(doc, [len(doc)])`` for consecutive one-sequence documents ``tokens``
    (the documents concatenated, ``lengths`` tokens each), in one write: the per-call cost of
    Megatron's ``IndexedDatasetBuilder.add_document`` was a tenth of packing's CPU time. Writes
    the same ``.bin`` bytes and index (tests/test_pack_rollouts.py compares the two); relies on
    the builder's ``data_file`` / ``sequence_lengths`` / ``document_indices``, unchanged from
    megatron-core 0.16.1 to 0.19.2. Returns ``crc32`` extended over the bytes written."""
    if builder.multimodal:
        raise ValueError("add_documents writes text datasets only")
    data = np.ascontiguousarray(tokens, dtype=builder.dtype).tobytes()
    builder.data_file.write(data)
    first = len(builder.sequence_lengths)
    builder.sequence_lengths.extend(lengths)
    builder.document_indices.extend(range(first + 1, first + 1 + len(lengths)))
    return zlib.crc32(data, crc32)


def statistics(
    group: np.ndarray, outcome: np.ndarray, num_groups: int, written: np.ndarray
) -> dict:
    """Table 1 / table 4 statistics of the written rollouts, and of the input."""

    def of(selection: np.ndarray) -> dict:
        groups, outcomes = group[selection], outcome[selection]
        positive = outcomes > 0
        has_pos = np.zeros(num_groups, bool)
        has_neg = np.zeros(num_groups, bool)
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
            "zero_reward": int(np.sum(outcomes == 0)),
            "positive_fraction": float(positive.sum() / rollouts) if rollouts else 0.0,
            "mixed_problems": mixed,
            "mixed_fraction": mixed / problems if problems else 0.0,
        }

    stats = of(written)
    everything = of(np.arange(group.size))
    stats.update({f"input_{key}": value for key, value in everything.items()})
    return stats
