"""The base's competence on the post-training problems, reported before any fine-tuning.

A comparison of self-training methods can only mean something where the base is partly competent:
if nearly every rollout is wrong, every method trains on negatives and the table compares noise
(the naive loss then collapses); if nearly every rollout is right, there is nothing to learn; and
only problems with both right and wrong rollouts (mixed) tell RIFT from RFT. The band is a rule of
thumb, not a measurement: 10-90% of rollouts right and at least 20% of problems mixed.
"""

from __future__ import annotations

CORRECT_BAND = (0.10, 0.90)
MIN_MIXED = 0.20

_TOO_WEAK = (
    "the base solves too little for self-training to work with: pretrain it longer "
    "(--base-epochs) or larger (--num-layers, --hidden-size), give it more pretraining problems "
    "(more 'train' records with a 'solution' in --problems; --base-problems for the built-in "
    "task), or use easier problems"
)
_TOO_STRONG = (
    "the base already solves nearly everything, so there is little to learn: use harder "
    "problems, or a shorter or smaller base"
)
_FEW_MIXED = (
    "few problems have both right and wrong rollouts, and only those separate the methods "
    "that use negatives from RFT: sample more per problem (--samples-per-problem), or use "
    "problems with a spread of difficulties"
)


def competence_report(stats: dict, seed: int) -> dict:
    """``{"seed", "correct_fraction", "mixed_fraction", "warnings", "message"}`` from the packed
    rollouts' statistics (``PREFIX.json``: ``positive_fraction``, ``mixed_fraction``)."""
    correct = float(stats.get("positive_fraction", 0.0))
    mixed = float(stats.get("mixed_fraction", 0.0))
    warnings = []
    if correct < CORRECT_BAND[0]:
        warnings.append(_TOO_WEAK)
    elif correct > CORRECT_BAND[1]:
        warnings.append(_TOO_STRONG)
    if mixed < MIN_MIXED:
        warnings.append(_FEW_MIXED)
    negatives = int(stats.get("negative", 0))
    shared = int(stats.get("negatives_with_shared_prefix", 0))
    lines = [
        f"seed {seed}: the base got {100 * correct:.1f}% of its rollouts right; "
        f"{100 * mixed:.1f}% of the problems are mixed (some right, some wrong); "
        f"{shared} of {negatives} wrong rollouts share a prefix with a right one "
        f"({int(stats.get('shared_prefix_tokens', 0))} tokens: what rift-divergent spares)"
    ]
    lines += [
        f"  WARNING: outside the band where a comparison means something "
        f"({100 * CORRECT_BAND[0]:.0f}-{100 * CORRECT_BAND[1]:.0f}% right, >= "
        f"{100 * MIN_MIXED:.0f}% mixed): {w}"
        for w in warnings
    ]
    return {
        "seed": seed,
        "correct_fraction": round(correct, 4),
        "mixed_fraction": round(mixed, 4),
        "negatives_with_shared_prefix": shared,
        "shared_prefix_tokens": int(stats.get("shared_prefix_tokens", 0)),
        "warnings": warnings,
        "message": "\n".join(lines),
    }
