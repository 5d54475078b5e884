"""Adding an objective touches one place: this file registers a throwaway objective (SFT's loss
times a constant) and trains it through ``python -m megatron_rift.train --plugin`` with no other
file changed; the registry also refuses clashes and its entries are what the trainer consumes."""

from __future__ import annotations

import math
import sys

# Imported by the trainer as its --plugin (no pytest there), or collected by pytest: only the
# trainer registers at import, so the objective does not leak into other tests' registry.
AS_PLUGIN = "pytest" not in sys.modules

import pytest  # noqa: E402

from megatron_rift.objectives import (  # noqa: E402
    Objective,
    Unit,
    get_objective,
    objectives,
    register,
    unregister,
)
from tests.workers.train_runs import (  # noqa: E402
    prepared_assets,
    read_metrics,
    run_trainer,
    tiny_run_args,
)

SCALE = 3.0
NAME = "scaled_sft_for_test"


def scaled_sft_loss(per_token_ce, batch, settings, data_parallel_group=None):
    """The contract of :class:`Objective`: SFT's loss sum times SCALE, same tokens counted."""
    from megatron_rift.losses import sft_loss

    loss_sum, count, metrics = sft_loss(per_token_ce, batch, settings, data_parallel_group)
    return SCALE * loss_sum, count, metrics


def scaled_sft() -> Objective:
    return Objective(
        NAME,
        "SFT times a constant (a test of the registry)",
        f"{__name__}:scaled_sft_loss",
        1e-5,
        uses_rewards=False,
        metrics=get_objective("sft").metrics,
    )


if AS_PLUGIN:
    register(scaled_sft())


@pytest.fixture
def registered():
    """The objective registered in this process for one test, then removed again."""
    objective = register(scaled_sft())
    yield objective
    unregister(objective.name)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return prepared_assets(tmp_path_factory.getbasetemp())


@pytest.mark.timeout(600)
def test_a_plugin_objective_trains_through_the_trainer(assets, tmp_path):
    """Step 1's loss is computed before any update, from the same weights and batch: the plugin's
    loss and gradient norm must be SCALE x SFT's, and its metrics (the same CE) must agree."""
    runs = {}
    for objective in ("sft", NAME):
        metrics = tmp_path / f"{objective}.jsonl"
        _, output = run_trainer(
            tmp_path / objective,
            1,
            [
                *tiny_run_args(assets["data"], assets["release"], objective, steps=2),
                *["--plugin", __name__, "--log-file", str(metrics)],
            ],
        )
        assert f"objective {objective}" in output
        runs[objective] = read_metrics(metrics)
    sft, scaled = runs["sft"][1], runs[NAME][1]
    assert math.isclose(scaled["loss"], SCALE * sft["loss"], rel_tol=1e-6)
    assert scaled["ce"] == sft["ce"] and scaled["loss_tokens"] == sft["loss_tokens"]
    # The gradient flows through the plugin's loss: its norm (before clipping) scales too. (The
    # weights after the step do not tell: Adam's update is invariant to the loss's scale.)
    assert math.isclose(scaled["grad_norm"], SCALE * sft["grad_norm"], rel_tol=1e-5)


def test_registry_refuses_a_second_objective_of_the_same_name(registered):
    with pytest.raises(ValueError, match="already registered"):
        register(Objective(NAME, "again", f"{__name__}:scaled_sft_loss", 1e-5))
    with pytest.raises(KeyError, match="unknown objective 'ppo'; choose one of sft, dft"):
        get_objective("ppo")


def test_every_entry_loads_its_loss_and_pairs_units_with_references(registered):
    for objective in objectives():
        assert callable(objective.load_loss()), objective.name
        assert objective.default_lr > 0
        if objective.unit is not Unit.ROLLOUT:
            assert objective.default_beta is not None, objective.name
        if objective.reference:  # a reference needs sequences to score: a unit of two
            assert objective.unit.sequences == 2, objective.name
    broken = Objective("broken_for_test", "no such loss", "megatron_rift.losses:nope", 1e-5)
    with pytest.raises(ValueError, match="cannot load its loss 'megatron_rift.losses:nope'"):
        broken.load_loss()
