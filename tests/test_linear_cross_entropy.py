"""``--cross-entropy-loss-fusion``: the chunked output layer + per-token CE is the unfused path.

* The function and GPTModel against Megatron's ``ColumnParallelLinear`` + ``vocab_parallel_cross_
  entropy`` (tests/workers/linear_cross_entropy_worker.py), at TP=1 (in this process) and TP=2: every
  registry objective, tied and untied embeddings, chunks that do and do not divide the tokens, an
  all-masked micro-batch, targets with logits at -1e4, sequence parallelism. Tolerance: 1e-5 of
  max(1, the largest reference value) in fp32; and bf16 with the weight gradient going into an fp32
  ``main_grad`` (1e-2: the unfused weight gradient is rounded to bf16 once, the fused one per chunk).
* The trainer: 5+ steps of rift and dpo with the fusion give the unfused per-step losses within 1e-5
  relative at TP=1, TP=2 and PP=2 (against the unfused TP=1 runs, which the parallel tests show
  equal to the unfused TP=2 and PP=2 ones); dpo's reference log-probs come from the reference tool with the
  fusion on (step 1's loss is then log 2: the fused scores equal the unfused policy's). A fused run
  killed after step 4 resumes bitwise.
* Preflight: settings the fusion cannot run with stop every rank with one message.
"""

from __future__ import annotations

import json
import math

import pytest

from megatron_rift.objectives import NEGATIVE_MODES, RIFT, Unit, objectives
from megatron_rift.training.config import CROSS_ENTROPY_CHUNK_TOKENS, PrecisionConfig
from megatron_rift.training.preflight import ConfigError
from tests.torchrun_utils import read_rank_results, run_torchrun

# Megatron's modules before any process group (their import-time torch.compile decorators).
from tests.workers import linear_cross_entropy_worker as worker
from tests.workers.train_runs import (
    prepared_assets,
    read_metrics,
    reference_run,
    run_trainer,
    tiny_rift_args,
    tiny_run_args,
)

TOLERANCE = 1e-5
BF16_TOLERANCE = 1e-2  # bf16 GEMMs: one rounding of dW (unfused) vs one per chunk (fused)
TOKEN_OBJECTIVES = {o.name for o in objectives() if o.unit is Unit.ROLLOUT}


def _variants() -> list[str]:
    return [
        f"{o.name}/{mode}"
        for o in objectives()
        for mode in (NEGATIVE_MODES if o is RIFT else ("token",))
    ]


def check_worker_results(results: dict, tp: int) -> float:
    """Assert the worker's figures; return the largest relative difference seen."""
    worst = 0.0
    names = set(results)
    for variant in _variants():  # every registry objective was run, in every case
        cases = [f"{variant}/chunk{c}" for c in (5, 7, 28, 64)]
        cases += [f"{variant}/all_masked", f"{variant}/logit_-1e4"]
        assert names.issuperset(cases), sorted(set(cases) - names)
    if tp > 1:
        assert "rift/token/sequence_parallel" in names
    bf16 = results["bf16/rift/token/main_grad"]
    assert not bf16["weight_grad_returned"] and bf16["grad_added_to_main_grad"]
    for case, figures in results.items():
        if not isinstance(figures, dict):
            continue
        assert figures["finite"], f"{case}: NaN or inf"
        tolerance = BF16_TOLERANCE if case.startswith("bf16/") else TOLERANCE
        for quantity, value in figures.items():
            if not isinstance(value, list):
                continue
            diff, scale = value
            relative = diff / max(1.0, scale)
            if tolerance == TOLERANCE:
                worst = max(worst, relative)
            assert relative <= tolerance, f"{case} {quantity}: {diff} (scale {scale})"
        objective = case.split("/")[0]
        if case.endswith("all_masked") and objective in TOKEN_OBJECTIVES:
            assert figures["fused_loss"] == 0.0, case  # nothing counted: 0, not NaN
    for model in ("tied", "untied"):
        assert results[f"model/{model}/state_dict_keys_equal"]
        assert results[f"model/{model}/logits_max_abs_diff"] == 0.0  # labels=None: plain logits
        for objective in ("rift", "dpo"):
            compared = results[f"model/{model}/{objective}"]  # every parameter's main_grad
            assert "embedding.word_embeddings.weight" in compared
            assert ("output_layer.weight" in compared) == (model == "untied")
    return worst


@pytest.fixture
def single_process_megatron():
    from megatron_rift.parallel import destroy_distributed, init_distributed

    init_distributed(1, 1)
    yield
    destroy_distributed()


def test_fused_matches_unfused_at_tp1(single_process_megatron):
    results = worker.function_cases(1, 0)
    results.update(worker.model_cases(1))
    check_worker_results(json.loads(json.dumps(results)), tp=1)


@pytest.mark.distributed
def test_fused_matches_unfused_at_tp2(launches):
    for results in launches["tp2_worker"]:
        check_worker_results(results, tp=2)


def test_default_chunk_is_the_modules():
    from megatron_rift.model.linear_cross_entropy import DEFAULT_CHUNK_TOKENS

    assert CROSS_ENTROPY_CHUNK_TOKENS == DEFAULT_CHUNK_TOKENS


@pytest.mark.parametrize(
    "fields, version, message",
    [
        (dict(cross_entropy_fusion_chunk_size=64), "0.16.1", "has no effect without"),
        (
            dict(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="te"),
            "0.16.1",
            "offers linear",
        ),
        (
            dict(cross_entropy_loss_fusion=True, cross_entropy_fusion_chunk_size=0),
            "0.16.1",
            "at least 1 token",
        ),
        (dict(cross_entropy_loss_fusion=True), "0.20.0", "megatron-core 0.20.0 is installed"),
        (dict(cross_entropy_loss_fusion=True), "0.15.0", "megatron-core 0.15.0 is installed"),
    ],
)
def test_preflight_refuses_what_the_fusion_cannot_run(monkeypatch, fields, version, message):
    from packaging.version import Version

    from megatron_rift.training import preflight

    monkeypatch.setattr(preflight, "installed_version", lambda: Version(version))
    with pytest.raises(ConfigError, match=message):
        preflight.check_cross_entropy_fusion(PrecisionConfig(**fields))
    # The installed version (a leg of the tested matrix) passes with a plain fused run.
    monkeypatch.undo()
    preflight.check_cross_entropy_fusion(PrecisionConfig(cross_entropy_loss_fusion=True))


# ---- the trainer ---------------------------------------------------------------------------------

FUSED = ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-chunk-size", "7"]
LAYOUTS = {
    "tp1": [],
    "tp2": ["--tensor-model-parallel-size", "2"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.getbasetemp()


@pytest.fixture(scope="module")
def assets(base):
    return prepared_assets(base)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fused_ce")


def _dpo_args(assets, ref) -> list[str]:
    return [
        *tiny_run_args(assets["pairs"], assets["release"], "dpo", steps=5, seed=3),
        *["--ref-logprobs", str(ref)],
    ]


def _reference_tool_args(assets, out) -> list[str]:
    """The pairs dataset's reference log-probs, scored by the tool with the fusion on."""
    return [
        "--load",
        assets["release"],
        "--data-path",
        assets["pairs"],
        "--output",
        str(out),
        "--seq-length",
        "32",
        "--micro-batch-size",
        "3",
        "--skip-kl-samples",
        "--no-progress",
        "--cross-entropy-loss-fusion",
        "--cross-entropy-fusion-chunk-size",
        "11",
    ]


TRAIN, TOOL, WORKER_MAIN = (
    "megatron_rift.train:main",
    "tools.compute_ref_logprobs:main",
    "tests.workers.linear_cross_entropy_worker:main",
)


def _one_launch(run_dir, nproc: int, runs: dict[str, list]) -> None:
    """Run each {name: [entry, *argv]} in one launch (tests/workers/one_launch.py); a training
    run logs to run_dir/NAME.jsonl, the worker writes run_dir/rank*.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    items = [
        [entry, *argv, *(["--log-file", str(run_dir / f"{name}.jsonl")] if entry == TRAIN else [])]
        for name, (entry, *argv) in runs.items()
    ]
    (run_dir / "runs.json").write_text(json.dumps(items))
    # torchrun's -m: the module runs from the repository (run_torchrun's working directory).
    entry = ["tests.workers.one_launch", str(run_dir / "runs.json")]
    run_torchrun("-m", entry, nproc=nproc, timeout=420, result_dir=run_dir)


@pytest.fixture(scope="module")
def launches(base, assets, work):
    """One launch of one rank: the fused reference tool, then rift (fused; the unfused run is the
    suite's shared reference run) and dpo (unfused and fused) at TP=1. One launch of two ranks:
    the TP=2 worker, then fused rift and dpo at TP=2 and at PP=2."""
    ref = work / "ref_fused"
    rift, dpo = tiny_rift_args(assets), _dpo_args(assets, ref)
    one, two = work / "one_rank", work / "two_ranks"
    _one_launch(
        one,
        1,
        {
            "ref": [TOOL, *_reference_tool_args(assets, ref)],
            "rift_fused": [TRAIN, *rift, *FUSED],
            "dpo_unfused": [TRAIN, *dpo],
            "dpo_fused": [TRAIN, *dpo, *FUSED],
        },
    )
    layouts = {layout: flags for layout, flags in LAYOUTS.items() if layout != "tp1"}
    runs = {"worker": [WORKER_MAIN]}
    for layout, flags in layouts.items():
        runs[f"{layout}_rift_fused"] = [TRAIN, *rift, *flags, *FUSED]
        runs[f"{layout}_dpo_fused"] = [TRAIN, *dpo, *flags, *FUSED]
    _one_launch(two, 2, runs)
    metrics = {
        "tp1/rift_unfused": reference_run(base),
        **{
            f"tp1/{name}": read_metrics(one / f"{name}.jsonl")
            for name in ("rift_fused", "dpo_unfused", "dpo_fused")
        },
        **{
            f"{layout}/{objective}_fused": read_metrics(two / f"{layout}_{objective}_fused.jsonl")
            for layout in layouts
            for objective in ("rift", "dpo")
        },
    }
    return {"metrics": metrics, "tp2_worker": read_rank_results(two, 2)}


def _assert_same_losses(actual: dict, expected: dict) -> float:
    worst = 0.0
    assert len(actual) >= 5 and sorted(actual) == sorted(expected)
    for step in sorted(actual):
        a, e = actual[step]["loss"], expected[step]["loss"]
        assert math.isfinite(a), f"step {step}: loss {a}"
        worst = max(worst, abs(a - e) / abs(e))
        assert abs(a - e) <= TOLERANCE * abs(e), f"step {step}: fused {a} vs unfused {e}"
    return worst


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_with_the_fusion_gives_the_unfused_losses(launches, layout):
    """Against the unfused TP=1 runs (unfused TP=2 and PP=2 equal those within 1e-5:
    test_train_parallel.py, test_preference_training.py)."""
    metrics = launches["metrics"]
    for objective in ("rift", "dpo"):
        _assert_same_losses(
            metrics[f"{layout}/{objective}_fused"], metrics[f"tp1/{objective}_unfused"]
        )
    # Step 1: policy == reference, so DPO's loss is log 2: the reference log-probs the tool scored
    # with the fusion are the unfused policy's.
    assert metrics["tp1/dpo_unfused"][1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics[f"{layout}/dpo_fused"][1]["loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.distributed
def test_fused_run_killed_after_a_checkpoint_resumes_bitwise(assets, work, launches):
    uninterrupted = launches["metrics"]["tp1/rift_fused"]
    ckpt = work / "ckpt_killed"
    run_dir = work / "killed"
    metrics = run_dir / "metrics.jsonl"
    args = [
        *tiny_rift_args(assets),
        *FUSED,
        "--load",
        str(ckpt),
        "--save",
        str(ckpt),
        "--save-interval",
        "3",
        "--log-file",
        str(metrics),
    ]
    code, crashed = run_trainer(run_dir / "crash", 1, args, kill_at="step:4", expect_success=False)
    assert code != 0, crashed[-3000:]
    assert sorted(read_metrics(metrics)) == [1, 2, 3, 4]
    _, output = run_trainer(run_dir / "resume", 1, args)
    assert "resumed from" in output and "iter_0000003" in output and "CE fused" in output
    resumed = read_metrics(metrics)
    assert sorted(resumed) == sorted(uninterrupted)
    for step in resumed:
        assert resumed[step]["loss"] == uninterrupted[step]["loss"], step
        assert resumed[step]["grad_norm"] == uninterrupted[step]["grad_norm"], step
