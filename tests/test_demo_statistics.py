"""The demo's paired statistics (bootstrap over problems, paired by seed and problem) against known
answers, the competence report's band, and the evidence preset's and variants' plumbing."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_rift.demo.cli import build_parser, config_from_args, num_seeds
from megatron_rift.demo.competence import competence_report
from megatron_rift.demo.methods import TABLE6, demo_method
from megatron_rift.demo.report import paired_markdown
from megatron_rift.demo.statistics import comparisons, paired_difference


def test_a_constant_shift_gives_a_zero_width_interval_at_the_shift():
    rng = np.random.default_rng(0)
    base = [rng.random(50), rng.random(80)]
    shifted = [b + 0.05 for b in base]  # +5 points on every problem of every seed
    result = paired_difference([100 * (s - b) for s, b in zip(shifted, base)])
    assert result["change"] == result["low"] == result["high"] == pytest.approx(5.0)
    assert result["verdict"] == "better" and result["problems"] == 130


def test_interval_covers_the_truth_about_95_percent_of_the_time():
    """Independent per-problem noise around a known mean difference, 2 seeds of 60 problems:
    the 95% interval covers the true difference in ~95% of seeded trials."""
    truth, trials, covered = 1.5, 300, 0
    for trial in range(trials):
        rng = np.random.default_rng(1000 + trial)
        differences = [truth + rng.normal(0, 10, size=60) for _ in range(2)]
        r = paired_difference(differences, resamples=1000, seed=trial)
        covered += r["low"] <= truth <= r["high"]
    assert 0.90 <= covered / trials <= 0.99, covered / trials


def test_a_difference_inside_the_noise_is_a_tie_and_a_clear_loss_is_worse():
    rng = np.random.default_rng(5)
    symmetric = np.concatenate([rng.normal(0, 20, size=20)] * 2) * np.repeat([1, -1], 20)
    assert paired_difference([symmetric])["verdict"] == "tie"  # mean exactly 0
    assert paired_difference([rng.normal(-10, 5, size=40)])["verdict"] == "worse"


def _run(scores: dict[str, list[float]]) -> dict:
    return {"per_problem": {m: {"test": dict(enumerate(v))} for m, v in scores.items()}}


def test_comparisons_pair_by_seed_and_problem():
    # Seed 0: rift is rft + 0.1 everywhere; seed 1: + 0.3. Bases differ, pairing cancels them.
    runs = [
        _run({"base": [0.1, 0.2, 0.9], "rft": [0.5, 0.5, 0.5], "rift": [0.6, 0.6, 0.6]}),
        _run({"base": [0.0, 0.0, 0.0], "rft": [0.2, 0.3, 0.4], "rift": [0.5, 0.6, 0.7]}),
    ]
    paired = comparisons(runs, ("base", "rft"), ("test", "ood"))
    assert set(paired) == {"rft", "rift"} and "vs_rft" not in paired["rft"]["test"]
    vs_rft = paired["rift"]["test"]["vs_rft"]
    assert vs_rft["change"] == vs_rft["low"] == vs_rft["high"] == pytest.approx(20.0)
    # rift - base: seed 0 mean(+50, +40, -30) = 20, seed 1 mean(50, 60, 70) = 60 -> 40.
    assert paired["rift"]["test"]["vs_base"]["change"] == pytest.approx(40.0)
    table = paired_markdown(paired, 8)
    assert "| rift | +40.0 [" in table and "+20.0 [+20.0, +20.0] better |" in table


def test_competence_band_and_advice():
    fine = competence_report({"positive_fraction": 0.4, "mixed_fraction": 0.5}, seed=0)
    assert not fine["warnings"] and "40.0% of its rollouts right" in fine["message"]
    weak = competence_report({"positive_fraction": 0.026, "mixed_fraction": 0.1}, seed=1)
    assert len(weak["warnings"]) == 2 and "WARNING" in weak["message"]
    assert "--base-epochs" in weak["message"] and "--samples-per-problem" in weak["message"]
    strong = competence_report({"positive_fraction": 0.95, "mixed_fraction": 0.3}, seed=2)
    assert "harder" in strong["message"]


def test_variants_train_rift_on_their_own_datasets():
    assert demo_method("rift").dataset() == "rollouts"
    assert demo_method("rift-divergent").negative_mode == "divergent"
    assert demo_method("rift-divergent").dataset() == "rollouts"
    assert demo_method("rift-neg0.5").dataset() == "rollouts-neg0.5"
    assert demo_method("rift-gaussian").dataset() == "rollouts-gaussian"
    assert demo_method("rft").dataset() == "positives" and demo_method("sft").dataset() == "expert"
    assert {demo_method(m).objective for m in TABLE6} == {"rift"}


def test_evidence_preset_and_flags():
    args = build_parser().parse_args(["--preset", "evidence", "--test-problems", "50"])
    cfg = config_from_args(args)
    assert num_seeds(args) == 3 and cfg.sweep_lr and cfg.test_problems == 50  # flag overrides
    assert cfg.train_problems == 1024 and "rift-divergent" in cfg.methods
    assert cfg.base_competence_ceiling == 0.40 and not cfg.sweep_every_seed
    assert set(TABLE6) <= set(cfg.methods) and cfg.naive_collapse_lrs
    args = build_parser().parse_args(["--table6", "--naive-collapse-lrs", "1e-3"])
    cfg = config_from_args(args)
    assert num_seeds(args) == 1 and set(TABLE6) <= set(cfg.methods)
    assert cfg.naive_collapse_lrs == (1e-3,) and cfg.train_problems == 128
    with pytest.raises(SystemExit, match="--naive-collapse-lrs 'x'"):
        config_from_args(build_parser().parse_args(["--naive-collapse-lrs", "x"]))


@pytest.mark.parametrize(
    "peak, expected_extra",
    [(3e-5, []), (1e-6, [1e-5 / 10**0.5, 1e-6]), (1e-2, [3e-4 * 10**0.5, 3e-3])],
)
def test_sweep_extends_past_the_grid_edge_when_the_best_rate_sits_on_it(
    tmp_path, monkeypatch, peak, expected_extra
):
    """Validation scores peaked at ``peak`` (a stand-in for fine-tuning and scoring): the sweep
    adds rates past the edge the best one sits on, up to sweep_extensions of them."""
    import dataclasses
    import math

    from megatron_rift.demo.config import DemoConfig
    from megatron_rift.demo.pipeline import DemoRun

    cfg = dataclasses.replace(
        DemoConfig(output_dir=str(tmp_path)), sweep_lrs=(1e-5, 3e-5, 1e-4, 3e-4), sweep_extensions=2
    )
    run = DemoRun(cfg, 0, tmp_path)
    tried = []

    def val_score(method, lr, data, base_ckpt, splits):
        tried.append(lr)
        return -abs(math.log10(lr) - math.log10(peak))

    monkeypatch.setattr(run, "_val_score", val_score)
    chosen = run._sweep({}, {"rollouts": tmp_path}, None, ["rift"])
    assert tried[4:] == pytest.approx(expected_extra, rel=1e-3)
    assert chosen["rift"] == pytest.approx(min(tried, key=lambda lr: abs(math.log10(lr / peak))))
