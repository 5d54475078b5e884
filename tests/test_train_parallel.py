"""The trainer under tensor, pipeline and data parallelism gives the single-process losses.

All runs start from the same "converted" checkpoint, so any difference is the parallel
machinery's. Runs: ``python -m megatron_rift.train`` under torchrun (gloo, CPU), compared through
their metrics.jsonl files. Tolerance: 1e-5 relative (reductions happen in another order).
"""

import json
import math

import pytest

from tests.workers.train_runs import (
    cached_run,
    prepared_assets,
    read_metrics,
    reference_run,
    run_trainer,
    tiny_rift_args,
)

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

STEPS = 6  # one epoch of the tiny dataset


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.getbasetemp()


@pytest.fixture(scope="module")
def assets(base):
    return prepared_assets(base)


@pytest.fixture(scope="module")
def reference(base):
    return reference_run(base)


def assert_same_losses(actual: dict, expected: dict, steps, rel: float = 1e-5):
    for step in steps:
        a, e = actual[step]["loss"], expected[step]["loss"]
        assert math.isfinite(a), f"step {step}: loss {a}"
        assert abs(a - e) <= rel * abs(e), f"step {step}: loss {a} vs reference {e}"


def test_reference_run_logs_every_step_with_the_documented_fields(reference, assets):
    assert sorted(reference) == list(range(1, STEPS + 1))
    for record in reference.values():
        for key in (
            "step",
            "loss",
            "lr",
            "grad_norm",
            "tokens",
            "tokens_per_s",
            "loss_tokens",
            "ce",
            "p_positive",
            "p_negative",
        ):
            assert key in record, key
        assert record["tokens_per_s"] > 0 and record["grad_norm"] > 0
    # One epoch visits every rollout once: token counts add up to the packer's statistics.
    info = json.loads(open(assets["data"] + ".json").read())
    assert sum(r["tokens"] for r in reference.values()) == info["total_tokens"]
    assert sum(r["loss_tokens"] for r in reference.values()) == info["response_tokens"]
    # Cosine decay from 1e-3 to 0 over 6 steps, no warmup (5% of 6 rounds to 0); Megatron's
    # scheduler sets step k's lr after k-1 increments.
    for step, record in reference.items():
        expected = 0.5 * 1e-3 * (1 + math.cos(math.pi * (step - 1) / STEPS))
        assert record["lr"] == pytest.approx(expected, rel=1e-9)
    # The model learns: the loss of the last step is below the first.
    assert reference[STEPS]["loss"] < reference[1]["loss"]


def test_tensor_parallel_2_matches_single_process(base, assets, reference):
    tp2 = cached_run(
        base,
        "tp2",
        2,
        [
            *tiny_rift_args(assets),
            "--tensor-model-parallel-size",
            "2",
            "--save",
            str(base / "ckpt_tp2"),
            "--save-interval",
            "3",
        ],
    )
    assert_same_losses(tp2, reference, range(1, STEPS + 1))


def test_pipeline_parallel_2_matches_single_process(base, assets, reference):
    pp2 = cached_run(
        base, "pp2", 2, [*tiny_rift_args(assets), "--pipeline-model-parallel-size", "2"]
    )
    assert_same_losses(pp2, reference, range(1, STEPS + 1))


def test_data_parallel_2_with_distributed_optimizer_matches_single_process(base, assets, reference):
    dp2 = cached_run(
        base, "dp2_distopt", 2, [*tiny_rift_args(assets), "--use-distributed-optimizer"]
    )
    assert_same_losses(dp2, reference, range(1, STEPS + 1))
    assert all(dp2[s]["tokens"] == reference[s]["tokens"] for s in dp2)


def test_sequence_packing_matches_one_rollout_per_row(base, assets, reference):
    """Block-causal attention over packed rows sees what each rollout sees alone."""
    packed = cached_run(base, "packed", 1, [*tiny_rift_args(assets), "--sequence-packing"])
    assert_same_losses(packed, reference, range(1, STEPS + 1))


def test_checkpoint_saved_at_tp2_resumes_at_tp1(base, assets):
    tp2_args = [
        *tiny_rift_args(assets),
        "--tensor-model-parallel-size",
        "2",
        "--save",
        str(base / "ckpt_tp2"),
        "--save-interval",
        "3",
    ]
    tp2 = cached_run(base, "tp2", 2, tp2_args)
    run_dir = base / "train_runs" / "tp1_from_tp2"
    run_trainer(
        run_dir,
        1,
        [
            *tiny_rift_args(assets),
            "--load",
            str(base / "ckpt_tp2"),
            "--ckpt-step",
            "3",
            "--log-file",
            str(run_dir / "metrics.jsonl"),
        ],
    )
    resumed = read_metrics(run_dir / "metrics.jsonl")
    assert sorted(resumed) == [4, 5, 6]  # continued after step 3, not from scratch
    assert_same_losses(resumed, tp2, [4, 5, 6])
