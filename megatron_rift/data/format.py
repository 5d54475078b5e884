"""On-disk format of a packed rollout dataset: file suffixes, dtypes, format name and version.

A packed dataset is four files next to one prefix (written by :mod:`megatron_rift.data.packing`,
read by :mod:`megatron_rift.data.dataset` and :mod:`megatron_rift.data.preference`):

* ``PREFIX.bin`` / ``PREFIX.idx``: Megatron ``IndexedDataset``, :data:`TOKEN_DTYPE` token ids;
* ``PREFIX.rewards.npy``: one :data:`SIDE_DTYPE` row per document;
* ``PREFIX.json``: ``{"format": FORMAT_NAME, "version": FORMAT_VERSION, ...}``.

This module imports only numpy, so the writer, the reader and tokenizer workers share it without
pulling in torch or Megatron.
"""

from __future__ import annotations

import numpy as np

FORMAT_NAME = "megatron-rift-rollouts"
FORMAT_VERSION = 1
# Publication order too: the .json goes last because its presence marks a complete dataset.
OUTPUT_SUFFIXES = (".bin", ".idx", ".rewards.npy", ".json")

TOKEN_DTYPE = np.dtype(np.int32)
SIDE_DTYPE = np.dtype(
    [
        ("reward", "<f4"),  # training reward after the reward scheme
        ("raw_reward", "<f4"),  # the given reward (or 1/0 from `correct`)
        ("response_start", "<i4"),  # index of the first response token (= number of prompt tokens)
        ("group", "<i4"),  # problem id, dense over the input in first-appearance order
        ("outcome", "i1"),  # +1 positive, -1 negative, 0 reward exactly 0 (no `correct`)
    ]
)


def output_paths(prefix: str) -> dict[str, str]:
    """The four files of a packed dataset, by suffix: ``{".bin": PREFIX + ".bin", ...}``."""
    return {suffix: str(prefix) + suffix for suffix in OUTPUT_SUFFIXES}
