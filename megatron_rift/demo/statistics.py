"""Paired differences between the demo's methods with bootstrap confidence intervals.

Two methods are compared on the same problems of the same seeds: per seed s and problem i the
difference ``d[s, i] = score_a[s, i] - score_b[s, i]`` (Mean@k of that problem, in points). The
estimate is the mean over seeds of each seed's mean difference over its problems (every seed counts
the same, as the table's mean over seeds does). Its 95% interval is a percentile bootstrap that
resamples problems with replacement *within each seed*; because the statistic is built from the
paired differences, both methods always see the same resample. An interval that contains 0 is a
tie: the run cannot tell the two apart.
"""

from __future__ import annotations

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000


def paired_difference(
    differences: list[np.ndarray],
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> dict:
    """``{"change", "low", "high", "verdict", "problems"}`` for per-seed paired differences.

    Args:
        differences: one float array [problems of that seed] per seed (points, a - b).
        resamples: bootstrap resamples; seed: of the resampling generator (deterministic).
    Returns ``verdict`` "better" (interval above 0), "worse" (below) or "tie" (contains 0).
    """
    arrays = [np.asarray(d, dtype=np.float64) for d in differences if len(d)]
    if not arrays:
        raise ValueError("no paired problems to compare")
    rng = np.random.default_rng(seed)
    estimate = float(np.mean([a.mean() for a in arrays]))
    boot = np.zeros(resamples)
    for a in arrays:
        picks = rng.integers(0, a.size, size=(resamples, a.size))
        boot += a[picks].mean(axis=1)
    boot /= len(arrays)
    tail = 100 * (1 - confidence) / 2
    low, high = (float(v) for v in np.percentile(boot, [tail, 100 - tail]))
    verdict = "better" if low > 0 else "worse" if high < 0 else "tie"
    return {
        "change": round(estimate, 2),
        "low": round(low, 2),
        "high": round(high, 2),
        "verdict": verdict,
        "problems": int(sum(a.size for a in arrays)),
    }


def paired_scores(
    per_seed: list[dict], method: str, reference: str, split: str
) -> list[np.ndarray] | None:
    """Per seed, ``method``'s minus ``reference``'s per-problem Mean@k (points) on ``split``, over
    the problems both were scored on; None when a seed lacks either."""
    differences = []
    for run in per_seed:
        scores = run.get("per_problem", {})
        a = scores.get(method, {}).get(split)
        b = scores.get(reference, {}).get(split)
        if not a or not b:
            return None
        common = sorted(set(a) & set(b))
        differences.append(np.array([100 * (a[p] - b[p]) for p in common]))
    return differences


def comparisons(per_seed: list[dict], references: tuple[str, ...], splits: tuple[str, ...]) -> dict:
    """``{method: {split: {"vs_" + reference: paired_difference(...)}}}`` for every method and
    reference that every seed scored (a method is not compared with itself)."""
    methods = [m for m in per_seed[0].get("per_problem", {}) if m != "base"] if per_seed else []
    out: dict = {}
    for method in methods:
        for split in splits:
            for reference in references:
                if reference == method:
                    continue
                differences = paired_scores(per_seed, method, reference, split)
                if differences is None or not any(len(d) for d in differences):
                    continue
                entry = out.setdefault(method, {}).setdefault(split, {})
                entry[f"vs_{reference}"] = paired_difference(differences)
    return out
