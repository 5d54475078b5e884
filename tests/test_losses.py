"""The loss family: parity with a plain-PyTorch reference (TP=1, TP=2 through Megatron's
vocab-parallel CE), numerical stability, the counting contract, packed rows, and the training-level
behaviour the paper predicts (naive collapses, RIFT stays bounded). Every loss is reached by name
through the objectives registry (tests/objective_losses.py), as the trainer reaches it; the
registry's declared metrics are checked against what each loss reports."""

import math

import pytest
import torch

from megatron_rift.losses import CHOSEN, KL_SAMPLE, REJECTED
from megatron_rift.objectives import Unit, get_objective, objective_names, objectives
from tests.objective_losses import (
    TOKEN_OBJECTIVES as OBJECTIVES,
    compute_loss,
    first_response_tokens,
    objective_loss_func,
    preference_batch,
    token_batch,
)
from tests.torchrun_utils import REPO, read_rank_results, run_torchrun

WORKERS = REPO / "tests" / "workers"


def _ce(logits, labels):
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")


@pytest.mark.distributed
@pytest.mark.parametrize("tp", [1, 2])
def test_loss_and_logit_gradient_match_reference_under_tp(tmp_path, tp):
    run_torchrun(WORKERS / "loss_parity_worker.py", nproc=tp, result_dir=tmp_path, timeout=240)
    for rank_result in read_rank_results(tmp_path, tp):
        assert len(rank_result) == len(OBJECTIVES) + 3
        for case, r in rank_result.items():
            assert abs(r["loss"] - r["ref"]) <= 1e-5 * max(1.0, abs(r["ref"])), (case, r)
            assert r["grad_max_abs"] > 0, case  # the comparison is not vacuous
            assert r["grad_max_abs_diff"] <= 1e-5, (case, r)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_rift_family_finite_at_extreme_rewards_and_logits(objective):
    b, s, v = 4, 5, 11
    logits = torch.zeros(b, s, v)
    labels = torch.randint(0, v, (b, s), generator=torch.Generator().manual_seed(0))
    # Target logit at -1e4 (p -> 0) in rows 0-1 and at +30 (p -> 1) in rows 2-3.
    target = torch.tensor([-1e4, -1e4, 30.0, 30.0]).view(b, 1).expand(b, s)
    logits.scatter_(-1, labels.unsqueeze(-1), target.unsqueeze(-1))
    logits.requires_grad_(True)
    rewards = torch.tensor([1e3, -1e3, 1e3, -1e3])
    loss_sum, n, _ = compute_loss(_ce(logits, labels), torch.ones(b, s), rewards, objective)
    (loss_sum / n).backward()
    assert torch.isfinite(loss_sum)
    assert torch.isfinite(logits.grad).all()
    if objective == "rift":
        # Every RIFT term is non-negative; a negative at p ~ 1 costs at most |r| per token.
        assert 0 <= loss_sum.item()
        neg_p1 = compute_loss(_ce(logits, labels)[3:], torch.ones(1, s), rewards[3:], "rift")[0]
        assert neg_p1.item() == pytest.approx(1e3 * s, rel=1e-6)


def test_counting_contract_and_empty_micro_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 7, generator=g)
    labels = torch.randint(0, 7, (3, 4), generator=g)
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]]).float()
    rewards = torch.tensor([1.0, -0.2, 0.0])
    ce = _ce(logits, labels)
    for objective, expected in [("sft", 9), ("dft", 9), ("rift", 9), ("naive", 9), ("rft", 3)]:
        assert compute_loss(ce, mask, rewards, objective)[1].item() == expected
    # A micro-batch with no counted tokens: 0, never NaN, through Megatron's loss_func contract.
    loss_func = objective_loss_func("rift", token_batch(torch.zeros(3, 4), rewards))
    loss_sum, n, report = loss_func(ce)
    assert loss_sum.item() == 0.0 and n.item() == 0 and not torch.isnan(report["loss"]).any()
    only_negatives = objective_loss_func("rft", token_batch(mask, torch.tensor([-1.0] * 3)))(ce)
    assert only_negatives[0].item() == 0.0 and only_negatives[1].item() == 0


def test_report_matches_loss_and_metrics():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 5, generator=g)
    labels = torch.randint(0, 5, (2, 3), generator=g)
    mask = torch.ones(2, 3)
    ce = _ce(logits, labels)
    loss_sum, n, report = objective_loss_func("rift", token_batch(mask, torch.tensor([1.0, -0.5])))(
        ce
    )
    assert report["loss"].tolist() == pytest.approx([loss_sum.item(), 3 + 3])
    frac = report["negative_token_fraction"]
    assert (frac[0] / frac[1]).item() == pytest.approx(0.5)
    p_neg = report["p_negative"]
    assert (p_neg[0] / p_neg[1]).item() == pytest.approx(torch.exp(-ce[1]).mean().item(), rel=1e-6)


@pytest.mark.parametrize("mode", ["token", "sequence", "geometric"])
def test_packed_rows_equal_unpacked_samples(mode):
    """Two samples packed into one row (per-token rewards + segment ids) give the same loss sum,
    count and gradient as the same samples in two rows."""
    g = torch.Generator().manual_seed(3)
    ce_a = torch.rand(1, 4, generator=g) * 3
    ce_b = torch.rand(1, 5, generator=g) * 3
    rewards = torch.tensor([-0.5, -2.0])
    unpacked = torch.zeros(2, 5)
    unpacked[0, :4], unpacked[1, :5] = ce_a, ce_b
    unpacked.requires_grad_(True)
    mask_u = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]).float()
    lu, nu, _ = compute_loss(unpacked, mask_u, rewards, "rift", mode)
    lu.backward()
    packed = torch.cat([ce_a, ce_b], dim=1).clone().requires_grad_(True)
    token_rewards = torch.tensor([[-0.5] * 4 + [-2.0] * 5])
    segments = torch.tensor([[0] * 4 + [1] * 5])
    lp, np_, _ = compute_loss(packed, torch.ones(1, 9), token_rewards, "rift", mode, segments)
    lp.backward()
    assert lp.item() == pytest.approx(lu.item(), rel=1e-6) and np_.item() == nu.item()
    expected_grad = torch.cat([unpacked.grad[0, :4], unpacked.grad[1, :5]])
    assert torch.allclose(packed.grad[0], expected_grad, atol=1e-7)


def test_bad_objective_and_mode_are_named():
    ce, mask, r = torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1)
    with pytest.raises(KeyError, match="unknown objective 'ppo'.*sft") as err:
        get_objective("ppo")
    assert all(name in str(err.value) for name in objective_names())
    with pytest.raises(KeyError, match="unknown objective 'ppo'"):
        compute_loss(ce, mask, r, "ppo")  # the registry path the trainer takes
    with pytest.raises(ValueError, match="unknown negative_mode 'log'"):
        compute_loss(ce, mask, r, "rift", "log")
    with pytest.raises(ValueError, match="'divergent' needs .* re-pack"):
        compute_loss(ce, mask, r, "rift", "divergent")  # a batch without shared prefixes


def test_divergent_negatives_match_the_reference_and_token_mode_when_nothing_is_shared():
    """Divergent mode against the plain-PyTorch reference (loss and logit gradient), with shared
    prefixes of 0, some and all of a negative's tokens, and a shared mask on a positive row (which
    must change nothing); with nothing shared it is token mode exactly."""
    from tests.loss_reference import reference_loss

    g = torch.Generator().manual_seed(4)
    b, s, v = 5, 7, 13
    logits = torch.randn(b, s, v, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, v, (b, s), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]] * 3 + [[0, 1, 1, 1, 1, 0, 0]] * 2).float()
    rewards = torch.tensor([-0.5, 1.0, -0.8, -0.2, -1.0])
    for shared in ([2, 3, 0, 4, 1], [0, 0, 0, 0, 0], [5, 0, 5, 0, 0]):
        shared_mask = first_response_tokens(mask, shared)
        ref_logits = logits.clone().requires_grad_(True)
        # The reference skips only negatives' shared tokens; row 1 is positive.
        ref, ref_count = reference_loss(
            ref_logits, labels, mask, rewards, "rift", "divergent", shared
        )
        ref.backward()
        mine = logits.clone().requires_grad_(True)
        loss_sum, n, _ = compute_loss(
            _ce(mine, labels), mask, rewards, "rift", "divergent", shared_prefix=shared_mask
        )
        (loss_sum / n).backward()
        assert n.item() == ref_count == int(mask.sum())  # shared tokens stay counted
        assert (loss_sum / n).item() == pytest.approx(
            ref.item(), rel=1e-6
        )  # the loss works in float32
        assert torch.allclose(mine.grad, ref_logits.grad, atol=1e-7)
        token_sum, token_n, _ = compute_loss(_ce(logits, labels), mask, rewards, "rift", "token")
        if not any(shared[i] for i in range(b) if rewards[i] < 0):
            assert loss_sum.item() == token_sum.item() and n.item() == token_n.item()
        else:
            assert loss_sum.item() < token_sum.item()  # a shared prefix is pushed down less


def _metrics_batch(objective):
    """(per-token CE with grad, a valid batch for the objective's unit): 4 rows, one sample each."""
    g = torch.Generator().manual_seed(4)
    b, s = 4, 5
    ce = (torch.rand(b, s, generator=g) * 3).requires_grad_(True)
    mask = torch.tensor(
        [[0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 1, 1, 1, 0]]
    ).float()
    if objective.unit is Unit.ROLLOUT:
        return ce, token_batch(mask, torch.tensor([1.0, -0.5, 0.0, -2.0]))
    roles = {
        Unit.PAIR: [CHOSEN, REJECTED, CHOSEN, REJECTED],
        Unit.MISMATCHED: [CHOSEN, KL_SAMPLE, REJECTED, KL_SAMPLE],
    }[objective.unit]
    segment_ids = torch.arange(b).unsqueeze(-1).expand(b, s).contiguous()
    ref_logprobs = -torch.rand(b, generator=g) * 8 if objective.reference else None
    return ce, preference_batch(mask, segment_ids, torch.tensor(roles), ref_logprobs)


@pytest.mark.parametrize("objective", objectives(), ids=lambda o: o.name)
def test_losses_report_exactly_the_metrics_their_registry_entry_declares(objective):
    assert len(set(objective.metrics)) == len(objective.metrics) and "loss" not in objective.metrics
    ce, batch = _metrics_batch(objective)
    loss_sum, count, metrics = objective.load_loss()(ce, batch)
    assert sorted(metrics) == sorted(objective.metrics), objective.name
    loss_sum2, count2, report = objective_loss_func(objective.name, batch)(ce)
    assert sorted(report) == sorted(["loss", *objective.metrics]), objective.name
    assert int(count) == int(count2) > 0 and loss_sum2.item() == pytest.approx(loss_sum.item())
    for name, value in report.items():
        assert value.shape == (2,) and not value.requires_grad, (objective.name, name)
        assert torch.isfinite(value).all(), (objective.name, name, value)


@pytest.mark.distributed
def test_naive_collapses_while_rift_stays_non_negative(tmp_path):
    """Paper theorem 3.2 vs 3.4 on a tiny GPTModel trained on a fixed batch holding negatives."""
    results = {}
    for objective in ("naive", "rift"):
        out = tmp_path / objective
        out.mkdir()
        run_torchrun(
            WORKERS / "tiny_gpt_train_worker.py",
            ["--objective", objective, "--steps", "300", "--lr", "1e-2"],
            nproc=1,
            result_dir=out,
            timeout=300,
        )
        results[objective] = read_rank_results(out, 1)[0]["losses"]
    naive = results["naive"]
    assert not math.isfinite(naive[-1]) or min(naive) < -100, naive[-5:]
    assert len(results["rift"]) == 300 and min(results["rift"]) >= 0.0


@pytest.mark.distributed
def test_rift_training_losses_equal_at_tp1_and_tp2(tmp_path):
    runs = {}
    for tp in (1, 2):
        out = tmp_path / f"tp{tp}"
        out.mkdir()
        run_torchrun(
            WORKERS / "tiny_gpt_train_worker.py",
            ["--objective", "rift", "--steps", "20"],
            nproc=tp,
            result_dir=out,
            timeout=300,
        )
        runs[tp] = read_rank_results(out, tp)
    tp1 = runs[1][0]["losses"]
    assert len(tp1) == 20 and tp1[-1] < tp1[0]  # it trains
    for rank_result in runs[2]:
        for a, b in zip(tp1, rank_result["losses"], strict=True):
            assert abs(a - b) <= 1e-5 * abs(a), (tp1, rank_result["losses"])
