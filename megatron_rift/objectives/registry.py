"""The registry of training objectives: every objective is declared here, once.

Adding an objective is one :func:`register` call (here, or in a plugin module passed to the trainer
with ``--plugin``) plus its loss function and tests; see docs/architecture.md.
"""

from __future__ import annotations

from megatron_rift.objectives.spec import Objective, Unit

_REGISTRY: dict[str, Objective] = {}

# How RIFT scores a negative sample (megatron_rift.losses.rift_terms).
NEGATIVE_MODES = ("token", "sequence", "geometric", "divergent")
# Where a reference objective's log pi_ref comes from.
REFERENCE_MODES = ("precomputed", "online")


def register(objective: Objective) -> Objective:
    """Add ``objective``; its name must be new. Returns it, so a module can keep a handle."""
    if objective.name in _REGISTRY:
        raise ValueError(f"objective {objective.name!r} is already registered")
    if not objective.name or not objective.name.replace("-", "_").isidentifier():
        raise ValueError(f"objective name {objective.name!r}: use letters, digits, '_' or '-'")
    _REGISTRY[objective.name] = objective
    return objective


def unregister(name: str) -> Objective:
    """Remove a registered objective (tests and notebooks that register their own); returns it."""
    try:
        return _REGISTRY.pop(name)
    except KeyError:
        raise KeyError(f"objective {name!r} is not registered") from None


def get_objective(name: str) -> Objective:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown objective {name!r}; choose one of {', '.join(_REGISTRY)}"
        ) from None


def objective_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def objectives() -> tuple[Objective, ...]:
    return tuple(_REGISTRY.values())


def _needs_positive_rollouts(objective: Objective, info: dict, settings) -> str | None:
    if int(info.get("positive", 1)) == 0:
        return (
            f"--objective {objective.name} trains on positive rollouts only, and the dataset "
            "has none (PREFIX.json: positive = 0); use a dataset with correct rollouts or "
            "another objective"
        )
    return None


def _divergent_needs_shared_prefixes(objective: Objective, info: dict, settings) -> str | None:
    if getattr(settings, "negative_mode", None) == "divergent" and not info.get("shared_prefix"):
        return (
            f"--objective {objective.name} --negative-mode divergent needs each negative "
            "rollout's shared prefix with the positive rollouts of its group, and this dataset "
            "has none (its PREFIX.json names no 'shared_prefix' file: it was packed before "
            "tools/pack_rollouts.py computed them); re-pack the rollouts, or use another "
            "--negative-mode"
        )
    return None


_TOKEN_METRICS = (
    "ce",
    "positive_token_fraction",
    "negative_token_fraction",
    "p_positive",
    "p_negative",
)
_PAIR_METRICS = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")

# Paper section 4.1: 1e-5 for SFT and RFT, a more conservative 2e-6 for RIFT and DPO. KTO and
# SimPO (the paper's tables 9-10 use MS-Swift defaults) get DPO's rate.
SFT = register(
    Objective(
        "sft",
        "supervised fine-tuning: -log p on every response token",
        "megatron_rift.losses:sft_loss",
        1e-5,
        uses_rewards=False,
        metrics=_TOKEN_METRICS,
        in_demo=True,
    )
)
DFT = register(
    Objective(
        "dft",
        "dynamic fine-tuning: sg(p) * -log p (DFT paper, eq. 9)",
        "megatron_rift.losses:dft_loss",
        1e-5,
        uses_rewards=False,
        metrics=_TOKEN_METRICS,
        in_demo=True,
    )
)
RFT = register(
    Objective(
        "rft",
        "rejection-sampling fine-tuning: -log p on positive (r > 0) rollouts only",
        "megatron_rift.losses:rft_loss",
        1e-5,
        positives_only=True,
        metrics=_TOKEN_METRICS,
        rules=(_needs_positive_rollouts,),
        in_demo=True,
    )
)
RIFT = register(
    Objective(
        "rift",
        "reward-informed fine-tuning: -r log p on positives, the bounded -r p on negatives",
        "megatron_rift.losses:rift_loss",
        2e-6,
        metrics=_TOKEN_METRICS,
        rules=(_divergent_needs_shared_prefixes,),
        in_demo=True,
    )
)
NAIVE = register(
    Objective(
        "naive",
        "-r log p on every rollout (RIFT eq. 1; unbounded below, for the ablation)",
        "megatron_rift.losses:naive_loss",
        2e-6,
        metrics=_TOKEN_METRICS,
        in_demo=True,
    )
)
DPO = register(
    Objective(
        "dpo",
        "direct preference optimization on (chosen, rejected) pairs",
        "megatron_rift.losses:dpo_loss",
        2e-6,
        unit=Unit.PAIR,
        reference=True,
        default_beta=0.1,
        metrics=_PAIR_METRICS,
        in_demo=True,
    )
)
KTO = register(
    Objective(
        "kto",
        "Kahneman-Tversky optimization on desirable / undesirable samples",
        "megatron_rift.losses:kto_loss",
        2e-6,
        unit=Unit.MISMATCHED,
        reference=True,
        default_beta=0.1,
        metrics=("kl_estimate", "desirable_reward", "undesirable_reward"),
    )
)
SIMPO = register(
    Objective(
        "simpo",
        "SimPO: length-normalized, reference-free preference optimization on pairs",
        "megatron_rift.losses:simpo_loss",
        2e-6,
        unit=Unit.PAIR,
        default_beta=2.0,
        metrics=_PAIR_METRICS,
    )
)
