"""Sequence and context parallelism, activation recompute, virtual pipeline stages and
communication overlap give the single-process losses; their bad combinations stop every rank with
one message.

All runs start from one 4-layer "converted" checkpoint (two layers per pipeline stage, so PP=2 can
interleave two virtual stages of one layer), 5 steps. Two launches (tests/workers/one_launch.py):
one process runs the reference, both recompute granularities, rift in the sequence and geometric
negative modes, the reference tool and dpo; two processes run TP=2 with and without
--sequence-parallel, PP=2 x VPP=2, DP=2 with the distributed optimizer and both overlap flags, and
CP=2 for rift in each negative mode, the reference tool and dpo. Tolerance 1e-5 relative, on the
loss and (where a flag must not change the gradients) the gradient norm.
"""

import json
import math
import time

import pytest

from megatron_rift.training.arguments import parse_train_config
from megatron_rift.training.preflight import ConfigError, preflight
from tests.torchrun_utils import run_torchrun
from tests.workers.train_runs import (
    prepared_assets,
    read_metrics,
    run_trainer,
    start_ranks_without_launcher,
    tiny_run_args,
    wait_ranks,
)

STEPS = 5
TOLERANCE = 1e-5
TRAIN = "megatron_rift.train:main"
TOOL = "tools.compute_ref_logprobs:main"
CP2 = ["--context-parallel-size", "2"]
NEGATIVE_MODES = ("token", "sequence", "geometric")
RECOMPUTE = {
    "full": [
        "--recompute-granularity",
        "full",
        "--recompute-method",
        "uniform",
        "--recompute-num-layers",
        "1",
    ],
    "selective": ["--recompute-granularity", "selective"],
}
TWO_RANK_LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", "2"],
    "tp2_sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "pp2_vpp2": [
        "--pipeline-model-parallel-size",
        "2",
        "--num-layers-per-virtual-pipeline-stage",
        "1",
    ],
    # Buckets of 10k elements: the tiny model's gradients reduce in several overlapped buckets.
    "dp2_overlap": [
        "--use-distributed-optimizer",
        "--overlap-grad-reduce",
        "--overlap-param-gather",
        "--ddp-bucket-size",
        "10000",
    ],
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return prepared_assets(tmp_path_factory.getbasetemp())


def run_args(assets) -> list[str]:
    return tiny_run_args(assets["data"], assets["release_4layers"], steps=STEPS)


def dpo_args(assets, ref) -> list[str]:
    """DPO on the pairs dataset with reference log-probs precomputed by the tool into ``ref``."""
    return [
        *tiny_run_args(assets["pairs"], assets["release_4layers"], "dpo", steps=STEPS, seed=3),
        *["--ref-logprobs", str(ref)],
    ]


def tool_args(assets, out) -> list[str]:
    return [
        *["--load", assets["release_4layers"], "--data-path", assets["pairs"]],
        *["--output", str(out), "--seq-length", "32", "--micro-batch-size", "3"],
        *["--skip-kl-samples", "--no-progress"],
    ]


def one_launch(run_dir, nproc: int, runs: dict[str, list[str]]) -> dict[str, dict]:
    """Run each {name: flags} in one launch (flags starting with the tool's entry run the
    reference tool, the others train); {name: metrics} of the training runs."""
    run_dir.mkdir(parents=True, exist_ok=True)
    items = [
        flags if flags[0] == TOOL else [TRAIN, *flags, "--log-file", str(run_dir / f"{name}.jsonl")]
        for name, flags in runs.items()
    ]
    (run_dir / "runs.json").write_text(json.dumps(items))
    run_torchrun(
        "-m",
        ["tests.workers.one_launch", str(run_dir / "runs.json")],
        nproc=nproc,
        timeout=420,
        result_dir=run_dir,
    )
    return {
        name: read_metrics(run_dir / f"{name}.jsonl")
        for name, flags in runs.items()
        if flags[0] != TOOL
    }


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    work = tmp_path_factory.mktemp("layouts")
    base = run_args(assets)
    ref1, ref2 = work / "ref_cp1", work / "ref_cp2"
    single = one_launch(
        work / "one_rank",
        1,
        {
            "reference": base,
            **{f"recompute_{k}": [*base, *v] for k, v in RECOMPUTE.items()},
            **{f"rift_{m}": [*base, "--negative-mode", m] for m in NEGATIVE_MODES[1:]},
            "ref_tool": [TOOL, *tool_args(assets, ref1)],
            "dpo": dpo_args(assets, ref1),
        },
    )
    single["rift_token"] = single["reference"]
    two = one_launch(
        work / "two_ranks",
        2,
        {
            **{name: [*base, *flags] for name, flags in TWO_RANK_LAYOUTS.items()},
            **{f"cp2_rift_{m}": [*base, *CP2, "--negative-mode", m] for m in NEGATIVE_MODES},
            "cp2_ref_tool": [TOOL, *tool_args(assets, ref2), *CP2],
            "cp2_dpo": [*dpo_args(assets, ref2), *CP2],
        },
    )
    return {**single, **two}


def assert_same(actual: dict, expected: dict, keys=("loss",)) -> None:
    assert sorted(actual) == sorted(expected)
    for step in expected:
        for key in keys:
            a, e = actual[step][key], expected[step][key]
            assert math.isfinite(a), f"step {step}: {key} {a}"
            assert abs(a - e) <= TOLERANCE * abs(e), f"step {step}: {key} {a} vs {e}"


@pytest.mark.distributed
@pytest.mark.parametrize("granularity", list(RECOMPUTE))
def test_recompute_gives_the_losses_and_gradients_of_no_recompute(runs, granularity):
    assert sorted(runs["reference"]) == list(range(1, STEPS + 1))
    assert_same(runs[f"recompute_{granularity}"], runs["reference"], keys=("loss", "grad_norm"))
    # The run learned something: the test compares moving losses, not one repeated value.
    assert len({round(r["loss"], 6) for r in runs["reference"].values()}) == STEPS


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(TWO_RANK_LAYOUTS))
def test_layout_gives_the_single_process_losses(runs, layout):
    assert_same(runs[layout], runs["reference"])


@pytest.mark.distributed
@pytest.mark.parametrize("mode", NEGATIVE_MODES)
def test_context_parallel_2_gives_the_single_process_rift_losses(runs, mode):
    """Megatron's 2·CP split; the sequence modes sum each sample's log-prob over the CP ranks."""
    assert_same(runs[f"cp2_rift_{mode}"], runs[f"rift_{mode}"], keys=("loss", "grad_norm"))
    assert [r["loss_tokens"] for r in runs[f"cp2_rift_{mode}"].values()] == [
        r["loss_tokens"] for r in runs[f"rift_{mode}"].values()
    ]


@pytest.mark.distributed
def test_context_parallel_2_gives_the_single_process_dpo_losses(runs):
    """Reference log-probs scored by the tool at CP=2 and trained on at CP=2 = both at CP=1."""
    assert_same(runs["cp2_dpo"], runs["dpo"], keys=("loss", "grad_norm"))
    # Step 1: the policy is the reference, so the loss is log 2 (the tool's log-probs are exact).
    assert runs["cp2_dpo"][1]["loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.distributed
def test_sequence_parallel_gives_the_losses_of_tensor_parallel_alone(runs):
    assert_same(runs["tp2_sp"], runs["tp2"], keys=("loss", "grad_norm"))


def bad_combinations() -> list[tuple[str, list[str], str]]:
    """(name, flags added to a valid 2-rank run, the message every rank must print)."""
    return [
        ("sp_without_tp", ["--sequence-parallel"], "--sequence-parallel splits activations"),
        (
            "cp_split",
            ["--context-parallel-size", "2", "--seq-length", "30"],
            "does not split into 2 x context-parallel-size = 4",
        ),
        (
            "vpp_layers",
            ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"],
            "--num-layers-per-virtual-pipeline-stage 3 does not divide the 2 layers",
        ),
        (
            "vpp_microbatches",
            [
                "--pipeline-model-parallel-size",
                "2",
                "--num-layers-per-virtual-pipeline-stage",
                "1",
                "--micro-batch-size",
                "8",
            ],
            "a step has 1",
        ),
        (
            "param_gather_without_distributed_optimizer",
            ["--overlap-grad-reduce", "--overlap-param-gather"],
            "add --use-distributed-optimizer",
        ),
        (
            "packing_under_cp",
            ["--context-parallel-size", "2", "--sequence-packing"],
            "--sequence-packing with --context-parallel-size 2",
        ),
        (
            "recompute_method_without_full",
            ["--recompute-granularity", "selective", "--recompute-method", "block"],
            "add --recompute-granularity full",
        ),
    ]


def test_each_bad_combination_stops_every_rank_with_one_message(assets, tmp_path):
    valid = [*run_args(assets)[:4], "--micro-batch-size", "1", "--global-batch-size", "8"]
    valid += ["--train-iters", "1"]
    cases = bad_combinations()
    started = time.monotonic()
    launched = [
        (name, tmp_path / name, start_ranks_without_launcher(tmp_path / name, 2, [*valid, *flags]))
        for name, flags, _ in cases
    ]
    results = {name: wait_ranks(procs, run_dir, timeout=120) for name, run_dir, procs in launched}
    assert time.monotonic() - started < 120
    for name, _, message in cases:
        for rank, (code, output) in enumerate(results[name]):
            assert code == 2, f"{name}, rank {rank}: exit {code}\n{output[-3000:]}"
            assert output.count(message) == 1, f"{name}, rank {rank}:\n{output[-3000:]}"
            assert f"error (rank {rank})" in output and "Traceback" not in output, name


def test_layout_rules_in_process(assets):
    """The rules Megatron-Core would assert on: each a ConfigError naming the flag to change."""
    base = run_args(assets)
    cases = {
        "--overlap-param-gather needs --overlap-grad-reduce": [
            "--use-distributed-optimizer",
            "--overlap-param-gather",
        ],
        "needs --recompute-method": ["--recompute-granularity", "full"],
        "needs --pipeline-model-parallel-size > 1": [
            "--num-layers-per-virtual-pipeline-stage",
            "1",
        ],
        "does not split over tensor-model-parallel-size 2": [
            "--tensor-model-parallel-size",
            "2",
            "--sequence-parallel",
            "--seq-length",
            "31",
        ],
        "--cp-comm-type has no effect": ["--cp-comm-type", "a2a"],
        "does not do yet": ["--tensor-model-parallel-size", "2", "--tp-comm-overlap"],
    }
    for message, flags in cases.items():
        with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
            preflight(parse_train_config([*base, *flags]), 2)
    plan = preflight(
        parse_train_config(
            [*base, "--pipeline-model-parallel-size", "2"]
            + ["--num-layers-per-virtual-pipeline-stage", "1"]
        ),
        2,
    )
    assert plan.layout.virtual_pipeline == 2


# The layouts whose checkpoints are tested: the run in `runs` each is compared with.
RESUMED = {"pp2_vpp2": TWO_RANK_LAYOUTS["pp2_vpp2"], "cp2_rift_token": CP2}


@pytest.fixture(scope="module")
def resumed(runs, assets, tmp_path_factory):
    """Per layout: killed (SIGKILL of rank 0) after step 4 with a checkpoint at step 3, then
    resumed in the same layout (both layouts' resumes in one launch); then checkpoint 3 resumed by
    one process (both in one launch). {layout: (crashed metrics, resumed, one-process, output)}."""
    work = tmp_path_factory.mktemp("resume")
    crashed, same, single = {}, {}, {}
    for layout, flags in RESUMED.items():
        ckpt = work / layout / "ckpt"
        args = [*run_args(assets), *flags, "--load", str(ckpt), "--save", str(ckpt)]
        args += ["--save-interval", "3", "--log-file", str(work / layout / "metrics.jsonl")]
        code, output = run_trainer(
            work / layout / "crash", 2, args, kill_at="step:4", expect_success=False
        )
        assert code != 0, output[-3000:]
        crashed[layout] = read_metrics(work / layout / "metrics.jsonl")
        same[layout] = args[:-2]  # one_launch adds the log file
        single[layout] = [*run_args(assets), "--load", str(ckpt), "--ckpt-step", "3"]
    resumed_runs = one_launch(work / "resumed", 2, same)
    single_runs = one_launch(work / "single", 1, single)
    return {
        layout: (crashed[layout], resumed_runs[layout], single_runs[layout]) for layout in RESUMED
    }


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(RESUMED))
def test_run_killed_after_a_checkpoint_resumes_bitwise(runs, resumed, layout):
    """PP=2 x VPP=2 saves Megatron-LM's model0/model1 entries; CP=2 saves one replica per CP
    group. Model, optimizer, scheduler, RNG and data position come back exactly."""
    crashed, again, _ = resumed[layout]
    assert sorted(crashed) == [1, 2, 3, 4]
    assert sorted(again) == [4, 5]
    for step in (4, 5):
        assert again[step]["loss"] == runs[layout][step]["loss"], step
        assert again[step]["grad_norm"] == runs[layout][step]["grad_norm"], step


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(RESUMED))
def test_checkpoint_resumes_in_one_process_with_the_same_next_losses(runs, resumed, layout):
    """The sharded keys carry global layer numbers and no CP rank: one process reads them."""
    _, _, single = resumed[layout]
    assert sorted(single) == [4, 5]
    assert_same(single, {s: runs[layout][s] for s in (4, 5)})
