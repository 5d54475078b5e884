"""On-disk format of a packed rollout dataset: file suffixes, dtypes, format name and version.

A packed dataset is four files next to one prefix (written by :mod:`megatron_rift.data.packing`,
read by :mod:`megatron_rift.data.dataset` and :mod:`megatron_rift.data.preference`):

* ``PREFIX.bin`` / ``PREFIX.idx``: Megatron ``IndexedDataset``, :data:`TOKEN_DTYPE` token ids;
* ``PREFIX.rewards.npy``: one :data:`SIDE_DTYPE` row per document;
* ``PREFIX.json``: ``{"format": FORMAT_NAME, "version": FORMAT_VERSION, ...}``;

and a fifth when earlier assistant turns are trained too (``--train-on all-assistant``):
``PREFIX.loss_spans.npy``, :data:`SPAN_DTYPE` rows sorted by document (``PREFIX.json`` names it
under ``loss_spans``). A document's loss mask is ``[response_start, response_end)`` plus its spans.

This module imports only numpy, so the writer, the reader and tokenizer workers share it without
pulling in torch or Megatron.
"""

from __future__ import annotations

import numpy as np

FORMAT_NAME = "megatron-rift-rollouts"
FORMAT_VERSION = 2  # 2: response_end in the side file, optional loss spans (chat data)
# Publication order too: the .json goes last because its presence marks a complete dataset.
OUTPUT_SUFFIXES = (".bin", ".idx", ".rewards.npy", ".json")
LOSS_SPANS_SUFFIX = ".loss_spans.npy"

TOKEN_DTYPE = np.dtype(np.int32)
SIDE_DTYPE = np.dtype(
    [
        ("reward", "<f4"),  # training reward after the reward scheme
        ("raw_reward", "<f4"),  # the given reward (or 1/0 from `correct`)
        ("response_start", "<i4"),  # index of the first response token (= number of prompt tokens)
        # end (exclusive) of the response's trained tokens, EOS or the chat template's end-of-turn
        # included; what follows (the template's text after the end-of-turn) is not trained
        ("response_end", "<i4"),
        ("group", "<i4"),  # problem id, dense over the input in first-appearance order
        ("outcome", "i1"),  # +1 positive, -1 negative, 0 reward exactly 0 (no `correct`)
    ]
)
# Format version 1 (no response_end: the response ran to the document's end); still readable.
SIDE_DTYPE_V1 = np.dtype(
    [(name, SIDE_DTYPE[name]) for name in SIDE_DTYPE.names if name != "response_end"]
)
SPAN_DTYPE = np.dtype([("document", "<i4"), ("start", "<i4"), ("end", "<i4")])

# Precomputed reference log-probs next to a dataset (tools/compute_ref_logprobs.py):
# PREFIX.ref_logprobs.npy (one REF_DTYPE row per document) and PREFIX.ref_logprobs.json.
REF_SUFFIX = ".ref_logprobs"
REF_FORMAT = "megatron-rift-ref-logprobs"
REF_DTYPE = np.dtype(
    [
        ("logprob", "<f8"),  # log pi_ref(response | prompt), summed over response tokens (+EOS)
        ("num_tokens", "<i4"),  # response tokens scored
        ("kl_logprob", "<f8"),  # the same for the document's KTO mismatched sample (NaN if skipped)
        ("kl_num_tokens", "<i4"),
    ]
)


def output_paths(prefix: str) -> dict[str, str]:
    """The four files of a packed dataset, by suffix: ``{".bin": PREFIX + ".bin", ...}``."""
    return {suffix: str(prefix) + suffix for suffix in OUTPUT_SUFFIXES}
