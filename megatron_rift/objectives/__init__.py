"""Training objectives: one :class:`Objective` record each, in one registry (torch-free).

``get_objective(name)`` is how the trainer, the data path, the preflight, the reference tool and the
demo learn what an objective needs; ``register`` adds one (see docs/architecture.md).
"""

from megatron_rift.objectives.registry import (
    DFT,
    DPO,
    KTO,
    NAIVE,
    NEGATIVE_MODES,
    REFERENCE_MODES,
    RFT,
    RIFT,
    SFT,
    SIMPO,
    get_objective,
    objective_names,
    objectives,
    register,
    unregister,
)
from megatron_rift.objectives.spec import Objective, PreflightRule, Unit

__all__ = [
    "DFT",
    "DPO",
    "KTO",
    "NAIVE",
    "NEGATIVE_MODES",
    "REFERENCE_MODES",
    "RFT",
    "RIFT",
    "SFT",
    "SIMPO",
    "Objective",
    "PreflightRule",
    "Unit",
    "get_objective",
    "objective_names",
    "objectives",
    "register",
    "unregister",
]
