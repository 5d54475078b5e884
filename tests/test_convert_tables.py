"""The conversion tables against Megatron's own naming, and the transforms against plain loops."""

import pytest
import torch
from megatron.core.dist_checkpointing.mapping import apply_factories

from megatron_rift.convert.tables import TABLES, checkpoint_key, layer_keys_map, module_param_name
from megatron_rift.convert.transforms import GATE_UP, QKV, VOCAB
from megatron_rift.model import (
    GPTArchitecture,
    build_gpt_model,
    get_layer_spec,
    to_transformer_config,
)
from megatron_rift.parallel import destroy_distributed, init_distributed
from tests.workers.convert_tiny_models import tiny_architecture

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def _world_of_one():
    init_distributed(1, 1)
    yield
    destroy_distributed()


def _arch(family: str, tie: bool) -> GPTArchitecture:
    moe = dict(num_moe_experts=3, moe_ffn_hidden_size=32) if TABLES[family].moe else {}
    return tiny_architecture(
        num_query_groups=2,
        kv_channels=32,
        tie_word_embeddings=tie,
        hf_model_type=family,
        **TABLES[family].arch_flags,
        **moe,
    )


@pytest.mark.parametrize("family", sorted(TABLES))
@pytest.mark.parametrize("tie", [True, False])
def test_table_covers_the_local_spec_model_and_its_checkpoint_keys(family, tie):
    arch = _arch(family, tie)
    spec = get_layer_spec(
        use_te=False, qk_layernorm=arch.qk_layernorm, num_experts=arch.num_moe_experts
    )
    model = build_gpt_model(
        arch, to_transformer_config(arch, perform_initialization=False), use_te=False
    )
    rows = TABLES[family].resolve(arch)

    # Module naming of the local spec: separate input_layernorm / pre_mlp_layernorm modules (and
    # SequentialMLP's local_experts.N).
    params = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    assert {module_param_name(r.megatron, spec) for r in rows} == params
    assert "decoder.layers.0.input_layernorm.weight" in params

    # Checkpoint naming: what the local spec's sharded_state_dict stores (the TE names, layers stacked,
    # experts stacked once more).
    sharded_state_dict = model.sharded_state_dict()
    apply_factories(sharded_state_dict)  # SwiGLU fc1: a factory that builds [gate, up] tensors
    stored = {}
    for name, sharded in sharded_state_dict.items():
        if not name.endswith("_extra_state"):
            sharded = sharded[0] if isinstance(sharded, list) else sharded
            stored[name] = (sharded.key, tuple(sharded.global_offset[: sharded.prepend_axis_num]))
    for row in rows:
        assert stored[module_param_name(row.megatron, spec)] == checkpoint_key(row.megatron), (
            row.megatron
        )


def test_te_names_are_the_local_names_through_the_keys_map():
    """TE isn't installed here: check the naming logic. Megatron's local spec maps its norm modules to
    the names TE's fused LayerNorm-linear modules have, which are the table's names."""
    local = get_layer_spec(use_te=False)
    assert layer_keys_map(local) == {
        "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
        "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
    }

    class TESpecStandIn:  # the TE layer spec sets no keys map: its module names are the checkpoint names
        class submodules:
            sharded_state_dict_keys_map = {}

    arch = _arch("qwen3", tie=False)
    for row in TABLES["qwen3"].resolve(arch):
        assert module_param_name(row.megatron, TESpecStandIn) == row.megatron
    assert (
        module_param_name("decoder.layers.1.mlp.linear_fc1.layer_norm_weight", local)
        == "decoder.layers.1.pre_mlp_layernorm.weight"
    )


@pytest.mark.parametrize("heads, groups, head_dim", [(4, 4, 8), (8, 2, 4), (6, 1, 5)])
def test_qkv_interleave_matches_a_per_head_loop(heads, groups, head_dim):
    arch = tiny_architecture(
        hidden_size=12, num_attention_heads=heads, num_query_groups=groups, kv_channels=head_dim
    )
    q = torch.randn(heads * head_dim, 12)
    k, v = torch.randn(groups * head_dim, 12), torch.randn(groups * head_dim, 12)
    expected = []
    for g in range(groups):
        for h in range(g * (heads // groups), (g + 1) * (heads // groups)):
            expected.append(q[h * head_dim : (h + 1) * head_dim])
        expected += [k[g * head_dim : (g + 1) * head_dim], v[g * head_dim : (g + 1) * head_dim]]
    fused = QKV.to_megatron([q, k, v], arch, None)
    assert torch.equal(fused, torch.cat(expected))
    assert all(torch.equal(a, b) for a, b in zip(QKV.to_hf(fused, arch), (q, k, v)))
    bias = [t[:, 0].contiguous() for t in (q, k, v)]
    assert torch.equal(QKV.to_megatron(bias, arch, None), fused[:, 0])


def test_gate_up_and_vocab_padding_round_trip():
    arch = tiny_architecture(vocab_size=5)
    gate, up = torch.randn(6, 3), torch.randn(6, 3)
    fc1 = GATE_UP.to_megatron([gate, up], arch, None)
    assert torch.equal(fc1, torch.cat([gate, up]))
    assert [torch.equal(a, b) for a, b in zip(GATE_UP.to_hf(fc1, arch), (gate, up))] == [True, True]
    table = torch.randn(5, 3)
    padded = VOCAB.to_megatron([table], arch, (8, 3))
    assert padded.shape == (8, 3) and not padded[5:].any() and torch.equal(padded[:5], table)
    assert torch.equal(VOCAB.to_hf(padded, arch)[0], table)
