"""DPO/KTO/SimPO end to end on the real trainer: precomputed reference log-probs (checked against
the HF export of the same model, at TP=1, TP=2 and DP=2), precomputed vs online references, TP=2
vs TP=1, and a reference file that does not belong to the dataset."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_rift.data.dataset import RewardDataset
from megatron_rift.data.preference import kl_partners, mismatched_sample
from tests.torchrun_utils import REPO, run_torchrun
from tests.workers.train_runs import (
    prepared_assets,
    read_metrics,
    run_trainer,
    start_ranks_without_launcher,
    tiny_run_args,
    wait_ranks,
)

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

TOOL = REPO / "tools" / "compute_ref_logprobs.py"
STEPS = 3


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return prepared_assets(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("preference")


def _compute(prefix, assets, output, nproc=1, extra=()):
    return run_torchrun(
        TOOL,
        [
            "--load",
            assets["release"],
            "--data-path",
            prefix,
            "--output",
            str(output),
            "--seq-length",
            "32",
            "--micro-batch-size",
            "3",
            "--no-progress",
            *extra,
        ],
        nproc=nproc,
        timeout=240,
    )


def _hf_logprobs(hf_dir, samples) -> np.ndarray:
    """Independent reference: transformers' model, log_softmax + gather over response tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for sample in samples:
            tokens = torch.tensor(np.asarray(sample["tokens"], dtype=np.int64))[None]
            logp = torch.log_softmax(model(tokens).logits[0, :-1].double(), -1)
            picked = logp.gather(-1, tokens[0, 1:, None])[:, 0]
            out.append(float(picked[sample["response_start"] - 1 :].sum()))
    return np.array(out)


@pytest.fixture(scope="module")
def reference_tp1(assets, work):
    out = work / "ref_tp1"
    _compute(assets["pairs"], assets, out)
    return out


def test_reference_logprobs_match_the_hf_model_at_tp1_tp2_and_dp2(assets, work, reference_tp1):
    hf = work / "hf"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/convert_megatron_to_hf.py"),
            "--megatron-path",
            assets["release"],
            "--output",
            str(hf),
        ],
        check=True,
        capture_output=True,
        cwd=str(REPO),
        timeout=240,
    )
    ds = RewardDataset(assets["pairs"])
    rows = np.load(f"{reference_tp1}.npy")
    info = json.loads(open(f"{reference_tp1}.json").read())
    assert info["documents"] == len(ds) and info["kl_samples"]
    partners = kl_partners(ds.groups)
    longest = int(ds.lengths.max())
    kl_samples = [mismatched_sample(ds, i, int(partners[i]), longest) for i in range(len(ds))]
    expected = _hf_logprobs(hf, [ds[i] for i in range(len(ds))])
    expected_kl = _hf_logprobs(hf, kl_samples)
    assert np.abs(expected).min() > 1  # non-trivial sums
    np.testing.assert_allclose(rows["logprob"], expected, rtol=0, atol=2e-4)
    np.testing.assert_allclose(rows["kl_logprob"], expected_kl, rtol=0, atol=2e-4)
    assert (rows["num_tokens"] == ds.lengths - ds.side["response_start"]).all()
    # The same numbers at TP=2 (vocab-parallel CE across ranks) and DP=2 (split sequences).
    for name, extra in (("tp2", ["--tensor-model-parallel-size", "2"]), ("dp2", [])):
        out = work / f"ref_{name}"
        _compute(assets["pairs"], assets, out, nproc=2, extra=extra)
        other = np.load(f"{out}.npy")
        np.testing.assert_allclose(other["logprob"], rows["logprob"], rtol=0, atol=1e-4)
        np.testing.assert_allclose(other["kl_logprob"], rows["kl_logprob"], rtol=0, atol=1e-4)


def _train(run_dir, assets, objective, nproc=1, data=None, extra=()):
    metrics = run_dir / "metrics.jsonl"
    args = [
        *tiny_run_args(data or assets["pairs"], assets["release"], objective, STEPS, seed=3),
        "--log-file",
        str(metrics),
        *extra,
    ]
    run_trainer(run_dir, nproc, args)
    return read_metrics(metrics)


def _losses(metrics):
    return [metrics[s]["loss"] for s in range(1, STEPS + 1)]


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_precomputed_and_online_references_train_identically(assets, work, objective):
    data = assets["pairs"] if objective == "dpo" else assets["data"]
    ref = work / f"ref_{objective}"
    _compute(data, assets, ref)
    pre = _train(
        work / f"{objective}_pre", assets, objective, data=data, extra=["--ref-logprobs", str(ref)]
    )
    online = _train(
        work / f"{objective}_online", assets, objective, data=data, extra=["--reference", "online"]
    )
    # Step 1: policy == reference, so DPO's loss is log 2 and KTO's 0.5 (z = 0); later steps
    # depend on the reference values, which must agree too.
    first = {"dpo": np.log(2), "kto": 0.5}[objective]
    assert pre[1]["loss"] == pytest.approx(first, abs=1e-6)
    np.testing.assert_allclose(_losses(pre), _losses(online), rtol=1e-5, atol=0)
    # Training moved the policy away (by far more than the tolerance above).
    assert abs(pre[STEPS]["loss"] - first) > 5e-5
    if objective == "kto":  # the reference point, from the mismatched samples, agrees and is used
        assert pre[STEPS]["kl_estimate"] > 0
        assert pre[STEPS]["kl_estimate"] == pytest.approx(online[STEPS]["kl_estimate"], rel=1e-5)


@pytest.mark.parametrize("objective", ["dpo", "simpo"])
def test_tensor_parallel_matches_single_process(assets, work, reference_tp1, objective):
    extra = ["--ref-logprobs", str(reference_tp1)]
    one = _train(work / f"{objective}_tp1", assets, objective, extra=extra)
    two = _train(
        work / f"{objective}_tp2",
        assets,
        objective,
        nproc=2,
        extra=[*extra, "--tensor-model-parallel-size", "2"],
    )
    np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5, atol=0)
    assert one[1]["loss_tokens"] == 8  # the count is pairs (global batch), not tokens


def test_reference_of_another_dataset_stops_every_rank(assets, work, reference_tp1):
    # Reference log-probs of the pairs dataset offered for the rollout dataset.
    procs = start_ranks_without_launcher(
        work / "wrong_ref",
        2,
        [
            "--data-path",
            assets["data"],
            "--pretrained-checkpoint",
            assets["release"],
            "--objective",
            "kto",
            "--ref-logprobs",
            str(reference_tp1),
            "--seq-length",
            "32",
            "--micro-batch-size",
            "2",
            "--global-batch-size",
            "8",
            "--train-iters",
            "1",
        ],
    )
    for code, output in wait_ranks(procs, work / "wrong_ref"):
        assert code == 2, output[-3000:]
        assert "computed for another dataset" in output
