"""The demo's report: mean ± std over seeds and the change from the base paired by seed, against
values computed by hand."""

import pytest

from megatron_rift.demo.report import aggregate, markdown


def _run(base_test, rift_test, base_ood, rift_ood):
    def result(test, ood):
        return {
            "benchmarks": {
                "test": {"mean_at_k": test, "pass_at_k": min(1.0, 2 * test)},
                "ood": {"mean_at_k": ood, "pass_at_k": min(1.0, 2 * ood)},
            }
        }

    return {"results": {"base": result(base_test, base_ood), "rift": result(rift_test, rift_ood)}}


def test_change_from_base_is_paired_by_seed():
    # Bases far apart (0.2 and 0.8), RIFT +0.05 and +0.01 above its own base.
    runs = [_run(0.20, 0.25, 0.10, 0.05), _run(0.80, 0.81, 0.30, 0.32)]
    summary = aggregate(runs, k=8)
    rift = summary["rift"]
    assert rift["test"]["mean@8"] == pytest.approx(53.0)
    assert rift["test"]["mean@8_std"] == pytest.approx(39.6, abs=0.01)  # stdev(25, 81)
    assert rift["test"]["mean@8_change_from_base"] == pytest.approx(3.0)  # mean(+5, +1)
    assert rift["test"]["mean@8_change_from_base_std"] == pytest.approx(2.83, abs=0.01)
    assert rift["ood"]["mean@8_change_from_base"] == pytest.approx(-1.5)  # mean(-5, +2)
    assert rift["ood"]["mean@8_change_from_base_std"] == pytest.approx(4.95, abs=0.01)
    assert "mean@8_change_from_base" not in summary["base"]["test"]
    table = markdown(summary, 8, num_seeds=2)
    assert "| rift | 53.0 ± 39.6 |" in table and "+3.0 ± 2.8 | -1.5 ± 5.0 |" in table
    # One seed: no ± and no change columns.
    single = markdown(aggregate(runs[:1], k=8), 8, num_seeds=1)
    assert "±" not in single and "base |" not in single.splitlines()[0]
