"""The demo's methods: every registered objective, plus named variants of RIFT.

A method is an objective trained on one of the demo's datasets with some loss settings. Most are an
objective as registered (``rift``: constant rewards +1 / -0.2, token negatives). The variants are
what the evidence run compares besides:

* ``rift-divergent``: divergence-aware negatives (``--negative-mode divergent``);
* the paper's table 6 ablation (``--table6``): RIFT with constant negative rewards -0.5 and -0.8
  (``rift`` itself is -0.2), and with group-normalized rewards ``gaussian`` and ``gpg-mean``,
  each on the same rollouts re-packed with that scheme.

A variant is one entry of :data:`VARIANTS`; nothing else compares method names.
"""

from __future__ import annotations

import dataclasses

from megatron_rift.demo.config import training_data
from megatron_rift.objectives import RIFT, Objective, get_objective, objective_names


@dataclasses.dataclass(frozen=True)
class DemoMethod:
    name: str
    objective: str
    negative_mode: str = "token"
    reward_scheme: str = "constant"
    negative_reward: float | None = None  # None: the demo's --negative-reward (-0.2)

    @property
    def spec(self) -> Objective:
        return get_objective(self.objective)

    def dataset(self) -> str:
        """The demo dataset this method trains on: ``training_data`` of its objective, re-packed
        under another name when its rewards differ from the default constant ones."""
        source = training_data(self.spec)
        if source != "rollouts":
            return source
        if self.reward_scheme != "constant":
            return f"rollouts-{self.reward_scheme}"
        if self.negative_reward is not None:
            return f"rollouts-neg{abs(self.negative_reward):g}"
        return source


VARIANTS = {
    m.name: m
    for m in (
        DemoMethod("rift-divergent", RIFT.name, negative_mode="divergent"),
        DemoMethod("rift-neg0.5", RIFT.name, negative_reward=-0.5),
        DemoMethod("rift-neg0.8", RIFT.name, negative_reward=-0.8),
        DemoMethod("rift-gaussian", RIFT.name, reward_scheme="gaussian"),
        DemoMethod("rift-gpg-mean", RIFT.name, reward_scheme="gpg-mean"),
    )
}
# The paper's table 6 (constant -0.2 / -0.5 / -0.8 against group normalization), same seeds.
TABLE6 = (RIFT.name, "rift-neg0.5", "rift-neg0.8", "rift-gaussian", "rift-gpg-mean")


def method_names() -> tuple[str, ...]:
    return objective_names() + tuple(VARIANTS)


def demo_method(name: str) -> DemoMethod:
    """The method called ``name``: a variant, or a registered objective as it is."""
    if name in VARIANTS:
        return VARIANTS[name]
    get_objective(name)  # KeyError naming the known objectives
    return DemoMethod(name, name)


def naive_at(lr: float) -> DemoMethod:
    """The naive loss at another lr, to show its collapse (its loss curve goes in the plot)."""
    return DemoMethod(f"naive@{lr:g}", "naive")
