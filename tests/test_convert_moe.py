"""Mixture-of-experts conversion (Qwen3-MoE, Mixtral): HF -> Megatron -> HF bit for bit with logit
parity both ways against transformers, the expert layout in model_config.json and config.json,
expert parallelism (EP=2) and TP=2 under torchrun, and the HF MoE layouts that are refused."""

import json

import pytest
import torch

from megatron_rift.convert import ConversionError, convert_hf_to_megatron, convert_megatron_to_hf
from megatron_rift.convert.hf_config import architecture_from_hf_config
from megatron_rift.model import GPTArchitecture
from megatron_rift.parallel import destroy_distributed
from tests.torchrun_utils import REPO, read_rank_results, run_torchrun
from tests.workers.convert_tiny_models import (
    MOE_FAMILIES,
    hf_config,
    make_tiny_hf_model,
    safetensors_weights,
)

# Fields that carry the expert layout, per family (config.json spelling).
LAYOUT_FIELDS = {
    "qwen3_moe": ("num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob"),
    "mixtral": ("num_experts_per_tok", "intermediate_size", "num_local_experts"),
}


def assert_same_weights(expected: dict, actual: dict):
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_moe_round_trip_is_bit_identical_and_verified(family, tmp_path):
    hf = make_tiny_hf_model(tmp_path / "hf", family)
    try:
        there = convert_hf_to_megatron(hf, tmp_path / "meg", target_dtype="fp32", verify=True)
        back = convert_megatron_to_hf(tmp_path / "meg", tmp_path / "hf2", verify=True)
    finally:
        destroy_distributed()
    assert 0 <= there.max_abs_logit_diff <= 1e-4 and 0 <= back.max_abs_logit_diff <= 1e-4
    assert_same_weights(safetensors_weights(hf), safetensors_weights(tmp_path / "hf2"))

    arch = GPTArchitecture.load(tmp_path / "meg")  # the expert layout travels in model_config.json
    assert (arch.num_moe_experts, arch.moe_router_topk, arch.moe_ffn_hidden_size) == (4, 2, 32)
    # Qwen3-MoE's tiny model keeps the top-k probabilities unnormalized; Mixtral renormalizes.
    assert arch.moe_router_pre_softmax == (family == "qwen3_moe")
    source = json.loads((hf / "config.json").read_text())
    exported = json.loads((tmp_path / "hf2" / "config.json").read_text())
    for key in ("model_type", "architectures", *LAYOUT_FIELDS[family]):
        assert exported[key] == source[key], key


@pytest.mark.parametrize(
    "family, field, value",
    [
        ("qwen3_moe", "mlp_only_layers", [1]),
        ("qwen3_moe", "decoder_sparse_step", 2),
        ("qwen3_moe", "shared_expert_intermediate_size", 64),
    ],
)
def test_unsupported_moe_layouts_are_refused_naming_the_field(family, field, value):
    cfg = hf_config(family).to_dict()
    cfg[field] = value
    with pytest.raises(ConversionError, match=f"field '{field}' = .* is not supported"):
        architecture_from_hf_config(cfg, source="model/config.json")
    cfg = hf_config(family).to_dict()
    cfg.pop("num_experts_per_tok")
    with pytest.raises(ConversionError, match="'num_experts_per_tok' is missing"):
        architecture_from_hf_config(cfg, source="model/config.json")


@pytest.mark.distributed
@pytest.mark.timeout(420)
def test_expert_and_tensor_parallel_conversion_verify_and_reshard(tmp_path):
    qwen3_moe = make_tiny_hf_model(tmp_path / "qwen3_moe", "qwen3_moe")
    mixtral = make_tiny_hf_model(tmp_path / "mixtral", "mixtral")
    try:
        convert_hf_to_megatron(mixtral, tmp_path / "mixtral_ep1", target_dtype="fp32")
    finally:
        destroy_distributed()
    run_torchrun(
        REPO / "tests" / "workers" / "convert_moe_worker.py",
        ["--qwen3-moe-hf", str(qwen3_moe), "--mixtral-hf", str(mixtral)]
        + ["--mixtral-checkpoint", str(tmp_path / "mixtral_ep1"), "--out", str(tmp_path / "out")],
        nproc=2,
        timeout=360,
        result_dir=tmp_path,
    )
    ranks = read_rank_results(tmp_path, 2)
    for rank in ranks:
        assert rank["ep3_status"] == 2 and not rank["ep3_written"]
        assert rank["ep2_status"] == 0
        for key in ("mixtral_at_ep2", "ep2_checkpoint_at_tp2", "mixtral_at_tp2"):
            assert 0 <= rank[key] <= 1e-4, key
    assert 0 <= ranks[0]["ep2_cli_diff"] <= 1e-4

    # Saved at EP=2 (each rank wrote its own experts), exported in one process: the HF model again.
    try:
        convert_megatron_to_hf(tmp_path / "out" / "ep2", tmp_path / "hf_ep2")
    finally:
        destroy_distributed()
    assert_same_weights(safetensors_weights(qwen3_moe), safetensors_weights(tmp_path / "hf_ep2"))
