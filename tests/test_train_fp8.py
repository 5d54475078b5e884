"""FP8 training through Transformer Engine (needs TE and an FP8-capable CUDA GPU; skipped elsewhere).

Same weights, same data: the FP8 run's first loss is the bf16 run's up to FP8 quantization of the
forward GEMMs, and it trains (the loss falls over the epoch). Also checks that TE's THD packed
path gives the unpacked losses.
"""

import math

import pytest

from tests.workers.train_runs import cached_run, prepared_assets, tiny_rift_args


def _fp8_unavailable_reason():
    try:
        import torch
    except ImportError:
        return "torch missing"
    if not torch.cuda.is_available():
        return "FP8 needs a CUDA GPU; none is visible (CPU-only machine)"
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return "FP8 needs Transformer Engine (pip install transformer-engine[pytorch])"
    if torch.cuda.get_device_capability() < (8, 9):
        return f"GPU compute capability {torch.cuda.get_device_capability()} < 8.9 has no FP8"
    return None


REASON = _fp8_unavailable_reason()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(900),
    pytest.mark.skipif(REASON is not None, reason=str(REASON)),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.getbasetemp()


def test_fp8_hybrid_trains_like_bf16(base):
    assets = prepared_assets(base)
    bf16 = cached_run(base, "gpu_bf16", 1, [*tiny_rift_args(assets), "--bf16"])
    fp8 = cached_run(
        base, "gpu_fp8", 1, [*tiny_rift_args(assets), "--bf16", "--fp8-format", "hybrid"]
    )
    assert all(math.isfinite(r["loss"]) for r in fp8.values())
    assert fp8[1]["loss"] == pytest.approx(bf16[1]["loss"], rel=0.05)
    assert fp8[max(fp8)]["loss"] < fp8[1]["loss"]


def test_te_packed_thd_matches_unpacked(base):
    assets = prepared_assets(base)
    bf16 = cached_run(base, "gpu_bf16", 1, [*tiny_rift_args(assets), "--bf16"])
    packed = cached_run(
        base, "gpu_bf16_packed", 1, [*tiny_rift_args(assets), "--bf16", "--sequence-packing"]
    )
    for step in bf16:
        assert packed[step]["loss"] == pytest.approx(bf16[step]["loss"], rel=2e-2), step
