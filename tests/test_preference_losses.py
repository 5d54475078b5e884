"""The preference objectives (dpo, kto, simpo): parity with an independent plain-PyTorch reference
(TP=1, TP=2 through Megatron's vocab-parallel CE, packed and one-sample-per-row micro-batches),
sequence log-probs, role validation, KTO's reference point, numerical stability and DPO's value at
policy == reference. The losses are reached by name through the objectives registry
(tests/objective_losses.py), as the trainer reaches them."""

import math

import pytest
import torch

from megatron_rift.losses import CHOSEN, KL_SAMPLE, REJECTED, LossSettings, sequence_logprobs
from megatron_rift.objectives import get_objective
from tests.objective_losses import (
    PREFERENCE_OBJECTIVES,
    REFERENCE_OBJECTIVES,
    compute_preference_loss,
)
from tests.preference_reference import (
    reference_preference_loss,
    sample_logprobs,
    samples_from_segments,
)
from tests.test_losses import _ce
from tests.torchrun_utils import REPO, read_rank_results, run_torchrun

WORKERS = REPO / "tests" / "workers"
NUM_CASES = 7  # CASES in preference_parity_worker.py


@pytest.mark.distributed
@pytest.mark.parametrize("tp", [1, 2])
def test_preference_loss_and_logit_gradient_match_reference_under_tp(tmp_path, tp):
    run_torchrun(
        WORKERS / "preference_parity_worker.py", nproc=tp, result_dir=tmp_path, timeout=240
    )
    results = read_rank_results(tmp_path, tp)
    assert len(results) == tp
    for rank_result in results:
        assert len(rank_result) == NUM_CASES
        assert {case.split("/")[0] for case in rank_result} == set(PREFERENCE_OBJECTIVES)
        assert any("packed" in case for case in rank_result)
        for case, r in rank_result.items():
            assert r["units"] == r["ref_units"] > 0, (case, r)
            assert abs(r["loss"] - r["ref"]) <= 1e-5 * max(1.0, abs(r["ref"])), (case, r)
            # Non-vacuous: this rank's vocab shard gets a gradient, in both implementations.
            assert r["grad_max_abs"] > 0 and r["local_grad_max_abs"] > 0, (case, r)
            assert r["grad_max_abs_diff"] <= 1e-5, (case, r)
            assert r["grad_max_abs_diff"] <= 1e-4 * r["grad_max_abs"], (case, r)
            if case.startswith("kto"):
                assert abs(r["z"] - r["ref_z"]) <= 1e-5, (case, r)
        # Both sides of KTO's clamp are exercised.
        assert rank_result["kto/packed_z0"]["ref_z"] == 0.0
        assert rank_result["kto/rows"]["ref_z"] > 0 and rank_result["kto/packed"]["ref_z"] > 0
    # Every TP rank computes the same loss.
    for case in results[0]:
        assert len({round(r[case]["loss"], 6) for r in results}) == 1, case


@pytest.mark.distributed
def test_kto_reference_point_spans_the_data_parallel_ranks(tmp_path):
    run_torchrun(WORKERS / "kto_data_parallel_worker.py", nproc=2, result_dir=tmp_path, timeout=240)
    results = read_rank_results(tmp_path, 2)
    for r in results:
        assert r["ref_z"] == pytest.approx(1.5)  # the mean of both ranks' KL ratios (2.5, 0.5)
        assert abs(r["z"] - r["ref_z"]) <= 1e-5, r
        assert abs(r["loss"] - r["ref"]) <= 1e-5 * max(1.0, abs(r["ref"])), r
        assert 0 < r["grad_max_abs"] and r["grad_max_abs_diff"] <= 1e-5, r
    # Non-vacuous: each rank alone would have estimated another z.
    assert [round(r["z_alone"], 4) for r in results] == [2.5, 0.5]


def test_sequence_logprobs_match_a_loop():
    g = torch.Generator().manual_seed(3)
    ce = (torch.rand(3, 7, generator=g) * 4).requires_grad_(True)
    segment_ids = torch.tensor(
        [[0, 0, 0, 1, 1, 1, -1], [2, 2, 3, 3, 3, -1, -1], [4, 4, 4, 4, 4, 4, 4]]
    )
    # Row 0's last position is padding with loss_mask 1: it must not count. Sample 5 has no tokens.
    loss_mask = torch.tensor([[0, 1, 1, 0, 1, 1, 1], [0, 1, 0, 1, 1, 0, 1], [0, 0, 1, 1, 1, 1, 1]])
    num_samples = 6
    logp, count = sequence_logprobs(ce, loss_mask, segment_ids, num_samples)
    assert logp.shape == count.shape == (num_samples,)
    expected_logp, expected_count = [0.0] * num_samples, [0] * num_samples
    for row in range(3):
        for pos in range(7):
            seg = int(segment_ids[row, pos])
            if seg >= 0 and loss_mask[row, pos] > 0:
                expected_logp[seg] -= float(ce[row, pos])
                expected_count[seg] += 1
    assert expected_count == [2, 2, 1, 2, 5, 0]
    assert count.tolist() == expected_count
    assert logp.tolist() == pytest.approx(expected_logp, abs=1e-5)
    # d logp_i / d ce_t = -1 on sample i's counted tokens, 0 elsewhere.
    logp[1].backward()
    expected_grad = torch.zeros(3, 7)
    expected_grad[0, 4] = expected_grad[0, 5] = -1
    assert torch.equal(ce.grad, expected_grad)


@pytest.mark.parametrize("objective", ["dpo", "simpo"])
@pytest.mark.parametrize(
    "roles",
    [
        [CHOSEN, CHOSEN, REJECTED, REJECTED],
        [REJECTED, CHOSEN],
        [CHOSEN, REJECTED, CHOSEN],
        [CHOSEN, KL_SAMPLE],
    ],
)
def test_paired_objectives_reject_roles_that_are_not_chosen_rejected_pairs(objective, roles):
    n = len(roles)
    ce = torch.rand(n, 4)
    segment_ids = torch.arange(n).unsqueeze(-1).expand(n, 4).contiguous()
    with pytest.raises(ValueError, match="pairs"):
        compute_preference_loss(
            ce, torch.ones(n, 4), segment_ids, torch.tensor(roles), torch.zeros(n), objective
        )


def test_the_reference_objectives_are_dpo_and_kto():
    assert set(REFERENCE_OBJECTIVES) == {"dpo", "kto"}
    assert not get_objective("simpo").reference


@pytest.mark.parametrize("objective", REFERENCE_OBJECTIVES)
def test_reference_objectives_need_reference_logprobs(objective):
    ce, segment_ids = torch.rand(2, 4), torch.tensor([[0] * 4, [1] * 4])
    with pytest.raises(ValueError, match=f"(?i){objective} needs the reference model's log-probs"):
        compute_preference_loss(
            ce, torch.ones(2, 4), segment_ids, torch.tensor([CHOSEN, REJECTED]), None, objective
        )
    # simpo is reference-free: None is fine there.
    loss_sum, units, _ = compute_preference_loss(
        ce, torch.ones(2, 4), segment_ids, torch.tensor([CHOSEN, REJECTED]), None, "simpo"
    )
    assert torch.isfinite(loss_sum) and int(units) == 1


def test_kto_without_kl_samples_uses_z_zero():
    g = torch.Generator().manual_seed(5)
    b, s, v = 4, 5, 13
    logits = torch.randn(b, s, v, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, v, (b, s), generator=g)
    segment_ids = torch.arange(b).unsqueeze(-1).expand(b, s).contiguous()
    loss_mask = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 1, 1, 1, 0]])
    roles = [CHOSEN, REJECTED, CHOSEN, REJECTED]
    samples = samples_from_segments(segment_ids.tolist(), loss_mask.tolist(), b)
    with torch.no_grad():
        true_lp = torch.stack(sample_logprobs(logits, labels, samples))
    # Every ratio lp - ref is positive (mean 1.5): a z taken from non-KL samples would not be 0.
    ref_logprobs = true_lp - torch.tensor([1.0, 2.0, 0.5, 2.5], dtype=torch.float64)
    settings = LossSettings(beta=0.7, desirable_weight=1.2, undesirable_weight=0.9)

    ref_logits = logits.clone().requires_grad_(True)
    ref, info = reference_preference_loss(
        ref_logits,
        labels,
        samples,
        roles,
        ref_logprobs,
        "kto",
        beta=0.7,
        desirable_weight=1.2,
        undesirable_weight=0.9,
    )
    ref.backward()
    assert info["z"] == 0.0 and info["units"] == 4

    policy_logits = logits.float().clone().requires_grad_(True)
    loss_sum, units, metrics = compute_preference_loss(
        _ce(policy_logits, labels),
        loss_mask,
        segment_ids,
        torch.tensor(roles),
        ref_logprobs,
        "kto",
        settings,
    )
    loss = loss_sum / units
    loss.backward()
    assert int(units) == 4
    assert metrics["kl_estimate"].tolist() == [0.0, 0.0]
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    assert ref_logits.grad.abs().max() > 0
    assert (policy_logits.grad.double() - ref_logits.grad).abs().max() <= 1e-5


@pytest.mark.parametrize("objective", PREFERENCE_OBJECTIVES)
def test_preference_losses_finite_at_extreme_logits(objective):
    b, s, v = 4, 5, 11
    logits = torch.zeros(b, s, v)
    labels = torch.randint(0, v, (b, s), generator=torch.Generator().manual_seed(0))
    # Target logit at -1e4 (p -> 0, lp ~ -5e4) in rows 0 and 3, at +30 (p -> 1, lp ~ 0) in rows 1-2.
    target = torch.tensor([-1e4, 30.0, 30.0, -1e4]).view(b, 1).expand(b, s)
    logits.scatter_(-1, labels.unsqueeze(-1), target.unsqueeze(-1))
    logits.requires_grad_(True)
    segment_ids = torch.arange(b).unsqueeze(-1).expand(b, s).contiguous()
    roles = {"kto": [CHOSEN, REJECTED, KL_SAMPLE, REJECTED]}.get(objective, [CHOSEN, REJECTED] * 2)
    ref_logprobs = torch.tensor([0.0, -5e4, -3e4, 0.0])  # ratios of +-5e4 magnitude
    settings = LossSettings(beta=2.0 if objective == "simpo" else 0.1)
    loss_sum, units, metrics = compute_preference_loss(
        _ce(logits, labels),
        torch.ones(b, s),
        segment_ids,
        torch.tensor(roles),
        ref_logprobs,
        objective,
        settings,
    )
    (loss_sum / units).backward()
    assert torch.isfinite(loss_sum)
    assert torch.isfinite(logits.grad).all()
    assert all(torch.isfinite(m).all() for m in metrics.values())
    if objective == "dpo":
        # Pair 0: chosen ratio ~ -5e4, rejected ratio ~ +5e4: margin ~ -1e4, loss ~ 1e4 (not inf).
        assert 1e3 < loss_sum.item() < 1e5
    if objective in ("dpo", "simpo"):
        # Pair 0 is saturated the wrong way (-log sigmoid(m) ~ -m): its gradient stays ~ 1, not 0/NaN.
        assert logits.grad.abs().max() > 0


def test_dpo_at_policy_equal_reference_is_log2_per_pair():
    g = torch.Generator().manual_seed(7)
    segment_ids = torch.tensor([[0, 0, 0, 1, 1, 1, -1], [2, 2, 3, 3, 3, -1, -1]])
    loss_mask = torch.tensor([[0, 1, 1, 0, 1, 1, 0], [0, 1, 0, 1, 1, 0, 0]])
    ce = (torch.rand(2, 7, generator=g) * 5).requires_grad_(True)
    roles = torch.tensor([CHOSEN, REJECTED, CHOSEN, REJECTED])
    ref_logprobs = sequence_logprobs(ce, loss_mask, segment_ids, 4)[0].detach()
    beta = 0.25
    loss_sum, units, metrics = compute_preference_loss(
        ce, loss_mask, segment_ids, roles, ref_logprobs, "dpo", LossSettings(beta=beta)
    )
    assert int(units) == 2
    assert loss_sum.item() == pytest.approx(2 * math.log(2), rel=1e-7, abs=0)
    assert metrics["reward_margin"].tolist() == [0.0, 2.0]
    # d(-log sigmoid(m))/dm = -1/2 at m = 0, and lp = -sum ce: +beta/2 on chosen response tokens,
    # -beta/2 on rejected ones, 0 on prompt and padding.
    loss_sum.backward()
    expected = torch.zeros(2, 7)
    for row in range(2):
        for pos in range(7):
            seg = int(segment_ids[row, pos])
            if seg >= 0 and loss_mask[row, pos] > 0:
                expected[row, pos] = beta / 2 if seg % 2 == 0 else -beta / 2
    assert torch.allclose(ce.grad, expected, atol=1e-7, rtol=0)
