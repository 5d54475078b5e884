"""Reward schemes of the RIFT paper (section 5.1, table 6), applied when packing.

Inputs per rollout (from the first streaming pass): ``raw`` (the given reward, or 1/0 from
``correct``), ``outcome`` (+1 positive, -1 negative, 0 for a reward of exactly 0 with no
``correct``) and ``group`` (dense problem id). Group statistics use every rollout of the group in
the input, including ones later dropped by ``--keep positive`` or ``--overlong drop``.

* ``constant``: +positive_reward for positive rollouts, negative_reward for negative ones; a
  ``reward`` of exactly 0 with no ``correct`` field stays 0 (neither signal).
* ``raw``: the raw reward unchanged.
* ``gaussian``: (r - mu) / sigma per group, sigma the population std (ddof=0); a group whose raw
  rewards are all equal (sigma = 0) gives 0 to each of its rollouts.
* ``gpg-mean``: (N+/N) * (r - mu) per group.
* ``gpg-scaled``: (N+/N) * r per group.

Here r is the raw reward, N the group size and N+ the number of positive rollouts in the group.
"""

from __future__ import annotations

import numpy as np

REWARD_SCHEMES = ("constant", "raw", "gaussian", "gpg-mean", "gpg-scaled")


def scheme_rewards(
    scheme: str,
    raw: np.ndarray,
    outcome: np.ndarray,
    group: np.ndarray,
    positive_reward: float = 1.0,
    negative_reward: float = -0.2,
) -> np.ndarray:
    """Per-rollout training reward, float64 [N], for ``scheme``.

    Args:
        raw: float [N] raw rewards. outcome: int [N] in {-1, 0, +1}. group: int [N] dense ids
            in [0, num_groups).
    """
    raw = np.asarray(raw, dtype=np.float64)
    outcome = np.asarray(outcome)
    group = np.asarray(group, dtype=np.int64)
    if scheme == "constant":
        return np.where(
            outcome > 0, positive_reward, np.where(outcome < 0, negative_reward, 0.0)
        ).astype(np.float64)
    if scheme == "raw":
        return raw.copy()
    if scheme not in REWARD_SCHEMES:
        raise ValueError(f"unknown reward scheme {scheme!r}; choose one of {REWARD_SCHEMES}")
    if raw.size == 0:
        return raw.copy()

    num_groups = int(group.max()) + 1
    size = np.bincount(group, minlength=num_groups).astype(np.float64)
    present = size > 0
    safe_size = np.where(present, size, 1.0)
    mean = np.bincount(group, weights=raw, minlength=num_groups) / safe_size
    if scheme == "gaussian":
        centered = raw - mean[group]
        sigma = np.sqrt(np.bincount(group, weights=centered**2, minlength=num_groups) / safe_size)
        # Exact test for a constant group: a float std of equal values can be ~1e-17, not 0.
        low = np.full(num_groups, np.inf)
        high = np.full(num_groups, -np.inf)
        np.minimum.at(low, group, raw)
        np.maximum.at(high, group, raw)
        constant = (high <= low)[group]
        return np.where(constant, 0.0, centered / np.where(constant, 1.0, sigma[group]))

    alpha = (
        np.bincount(group, weights=(outcome > 0).astype(np.float64), minlength=num_groups)
        / safe_size
    )
    if scheme == "gpg-mean":
        return alpha[group] * (raw - mean[group])
    return alpha[group] * raw  # gpg-scaled
