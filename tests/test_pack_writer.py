"""The packer's bulk writes equal Megatron's own per-document ``add_document``, byte for byte."""

from __future__ import annotations

import zlib

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_rift.data.dataset_writer import add_documents
from megatron_rift.data.encoding import encode_rollouts
from megatron_rift.data.format import TOKEN_DTYPE


def test_add_documents_writes_what_add_document_writes(tmp_path):
    rng = np.random.default_rng(0)
    chunks = [rng.integers(1, 5, size=n) for n in (3, 1, 4)]  # documents per chunk
    lengths = [[int(x) * 7 + 1 for x in c] for c in chunks]
    tokens = [rng.integers(0, 2**31 - 1, size=sum(ls)).astype(np.int32) for ls in lengths]

    one = IndexedDatasetBuilder(str(tmp_path / "one.bin"), dtype=TOKEN_DTYPE.type)
    for toks, ls in zip(tokens, lengths):
        at = 0
        for length in ls:
            one.add_document(toks[at : at + length], [length])
            at += length
    one.finalize(str(tmp_path / "one.idx"))

    bulk = IndexedDatasetBuilder(str(tmp_path / "bulk.bin"), dtype=TOKEN_DTYPE.type)
    crc = 0
    for toks, ls in zip(tokens, lengths):
        crc = add_documents(bulk, toks, ls, crc)
    bulk.finalize(str(tmp_path / "bulk.idx"))
    assert crc == zlib.crc32((tmp_path / "bulk.bin").read_bytes())  # the packer records it

    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"bulk{suffix}").read_bytes() == (tmp_path / f"one{suffix}").read_bytes()
    read = IndexedDataset(str(tmp_path / "bulk"))
    flat = np.concatenate(tokens)
    assert len(read) == sum(map(len, lengths)) and len(read.document_indices) == len(read) + 1
    assert np.array_equal(np.concatenate([read[i] for i in range(len(read))]), flat)


class _CountingEncoder:
    """Encodes each character as its code point; counts the texts it was asked to encode."""

    def __init__(self):
        self.texts = 0

    def encode_batch(self, texts, add_special_tokens=False):
        self.texts += len(texts)
        return [([1] if add_special_tokens else []) + [ord(c) for c in t] for t in texts]


def test_a_prompt_shared_by_rollouts_is_encoded_once_with_the_same_tokens():
    prompts = ["ab", "ab", "c", "ab", "c"]
    responses = ["x", "yy", "z", "w", "vv"]
    encoder = _CountingEncoder()
    chunk = encode_rollouts(encoder, 0, prompts, responses)
    assert encoder.texts == 2 + len(responses)  # two distinct prompts, every response
    expected = [[1, *map(ord, p), *map(ord, r), 0] for p, r in zip(prompts, responses)]
    assert chunk.tokens.tolist() == [t for doc in expected for t in doc]
    assert chunk.prompt_lengths.tolist() == [len(p) + 1 for p in prompts]
