"""Divergence points of negative rollouts, for RIFT's ``--negative-mode divergent``.

A negative rollout often says what right answers also say before it goes wrong (a correct first
step, then one wrong digit). Per written document this module computes its **shared prefix**: the
length, in response tokens, of its longest common prefix with any *positive* rollout of the same
group (both compared over ``[response_start, response_end)``, the trained response with its EOS or
end-of-turn). Positive rollouts, and negatives of a group without a positive, get 0: the whole
response is pushed down, as in token mode. A negative that is a prefix of a positive's response up
to its EOS diverges at the EOS (stopping early is its mistake); one identical to a positive gets its
full length.

Computed once at packing time, after the ``.bin`` is written, by reading each *mixed* group's
response tokens back from the memory-mapped ``.bin`` (groups need not be contiguous in the input):
memory beyond the per-document metadata is one group's responses. Imports only numpy.
"""

from __future__ import annotations

import numpy as np

SHARED_PREFIX_SUFFIX = ".shared_prefix.npy"
SHARED_PREFIX_DTYPE = np.dtype("<i4")
HEAD_TOKENS = 32


def longest_shared_prefix(negatives: list[np.ndarray], positives: list[np.ndarray]) -> np.ndarray:
    """int64 [len(negatives)]: per negative token sequence, the longest common prefix with any of
    ``positives`` (0 when there is none). Token ids must be >= 0."""
    if not negatives or not positives:
        return np.zeros(len(negatives), dtype=np.int64)
    width = max(len(t) for t in (*negatives, *positives))
    # Different fill values, so padding never matches padding or a token.
    neg = np.full((len(negatives), width), -1, dtype=np.int64)
    pos = np.full((len(positives), width), -2, dtype=np.int64)
    for row, tokens in enumerate(negatives):
        neg[row, : len(tokens)] = tokens
    for row, tokens in enumerate(positives):
        pos[row, : len(tokens)] = tokens
    # Most negatives leave every positive early: compare a short head first, everything only
    # when some pair agrees on all of it.
    head = min(width, HEAD_TOKENS)
    common = _common_prefix(neg[:, :head], pos[:, :head])
    if head < width and (common == head).any():
        common = _common_prefix(neg, pos)
    return common.max(axis=1)


def _common_prefix(neg: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """int64 [n, p]: common prefix length of every (negative, positive) row pair."""
    equal = neg[:, None, :] == pos[None, :, :]  # [n, p, width]
    return np.cumprod(equal, axis=-1, dtype=np.int8).sum(axis=-1, dtype=np.int64)


def shared_prefix_lengths(
    tokens: np.ndarray,
    offsets: np.ndarray,
    response_start: np.ndarray,
    response_end: np.ndarray,
    group: np.ndarray,
    outcome: np.ndarray,
) -> np.ndarray:
    """:data:`SHARED_PREFIX_DTYPE` [N]: each written document's shared prefix (module docstring).

    Args:
        tokens: every document's token ids back to back (the ``.bin``, memory-mapped).
        offsets: int [N], where document i starts in ``tokens``.
        response_start, response_end: int [N], the trained response within each document.
        group: int [N] dense problem ids. outcome: int [N], > 0 for a positive rollout.
    """
    group = np.asarray(group, dtype=np.int64)
    positive = np.asarray(outcome) > 0
    shared = np.zeros(group.size, dtype=SHARED_PREFIX_DTYPE)
    if not group.size:
        return shared
    num_groups = int(group.max()) + 1
    has_positive = np.bincount(group[positive], minlength=num_groups) > 0
    has_other = np.bincount(group[~positive], minlength=num_groups) > 0
    mixed = has_positive & has_other
    documents = np.flatnonzero(mixed[group])
    if not documents.size:
        return shared
    documents = documents[np.argsort(group[documents], kind="stable")]
    bounds = np.flatnonzero(np.diff(group[documents])) + 1
    start = np.asarray(offsets, dtype=np.int64) + np.asarray(response_start, dtype=np.int64)
    end = np.asarray(offsets, dtype=np.int64) + np.asarray(response_end, dtype=np.int64)
    for members in np.split(documents, bounds):
        others = members[~positive[members]]
        responses = {int(i): tokens[start[i] : end[i]] for i in members}
        shared[others] = longest_shared_prefix(
            [responses[int(i)] for i in others],
            [responses[int(i)] for i in members[positive[members]]],
        )
    return shared
