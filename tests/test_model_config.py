"""The TransformerConfig fields the device decides (fusions, initialization), a model built without
random initialization, and the required shape of GPTArchitecture. No CUDA kernel runs here."""

import dataclasses
import json

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils

from megatron_rift.model import (
    FusedKernels,
    GPTArchitecture,
    build_gpt_model,
    default_device,
    device_settings,
    to_transformer_config,
)
from megatron_rift.parallel import destroy_distributed, init_distributed
from tests.workers.convert_tiny_models import tiny_architecture

FUSIONS = (
    "bias_activation_fusion",
    "masked_softmax_fusion",
    "persist_layer_norm",
    "bias_dropout_fusion",
    "apply_rope_fusion",
    "gradient_accumulation_fusion",
)
ALL_KERNELS = FusedKernels(rope=True, weight_gradient_accumulation=True, persistent_layer_norm=True)
NO_KERNELS = FusedKernels(
    rope=False, weight_gradient_accumulation=False, persistent_layer_norm=False
)


@pytest.fixture
def fused_rope_importable(monkeypatch):
    """TransformerConfig refuses apply_rope_fusion unless TE's fused RoPE imported: stand one in."""
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", lambda *args, **kwargs: None)


@pytest.mark.parametrize("loads_weights", [True, False])
def test_cuda_turns_the_fusions_on_and_initializes_on_the_device(
    fused_rope_importable, loads_weights
):
    config = to_transformer_config(
        tiny_architecture(),
        torch.bfloat16,
        device="cuda",
        loads_weights=loads_weights,
        kernels=ALL_KERNELS,
    )
    # RMSNorm never runs in apex's persistent LayerNorm kernel; every other fusion is on.
    assert {name: getattr(config, name) for name in FUSIONS} == {
        **dict.fromkeys(FUSIONS, True),
        "persist_layer_norm": False,
    }
    assert config.use_cpu_initialization is False
    # Fine-tuning from a checkpoint skips the random initialization; from scratch keeps it.
    assert config.perform_initialization is (not loads_weights)
    layer_norm = to_transformer_config(
        tiny_architecture(normalization="LayerNorm"), device="cuda:0", kernels=ALL_KERNELS
    )
    assert layer_norm.persist_layer_norm is True


def test_cuda_leaves_off_the_fusions_whose_kernel_is_missing():
    # No stand-in for TE here: the config would raise if apply_rope_fusion were left on.
    config = to_transformer_config(tiny_architecture(), device="cuda", kernels=NO_KERNELS)
    assert not (
        config.apply_rope_fusion or config.gradient_accumulation_fusion or config.persist_layer_norm
    )
    assert config.bias_activation_fusion and config.masked_softmax_fusion
    assert config.bias_dropout_fusion
    # Fused gelu needs a linear bias, which this family lacks.
    gelu = to_transformer_config(tiny_architecture(swiglu=False), device="cuda", kernels=NO_KERNELS)
    assert gelu.bias_activation_fusion is False


def test_the_probe_finds_no_cuda_kernels_on_this_machine():
    if torch.cuda.is_available():
        pytest.skip("a GPU machine may have them")
    assert FusedKernels.probe() == NO_KERNELS


@pytest.mark.parametrize("loads_weights", [True, False])
def test_cpu_keeps_every_fusion_off_and_initializes_whole_on_the_cpu(loads_weights):
    config = to_transformer_config(
        tiny_architecture(), device="cpu", loads_weights=loads_weights, kernels=ALL_KERNELS
    )  # the kernels are irrelevant on CPU
    assert not any(getattr(config, name) for name in FUSIONS)
    assert config.use_cpu_initialization is True
    assert config.perform_initialization is (not loads_weights)


def test_defaults_are_this_machines_device_and_random_init(monkeypatch):
    assert default_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = to_transformer_config(tiny_architecture())
    assert config.use_cpu_initialization and config.perform_initialization
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == "cuda"


def test_explicit_overrides_win():
    config = to_transformer_config(
        tiny_architecture(),
        device="cuda",
        kernels=NO_KERNELS,
        loads_weights=True,
        bias_dropout_fusion=False,
        perform_initialization=True,
        tensor_model_parallel_size=1,
    )
    assert config.bias_dropout_fusion is False and config.perform_initialization is True


def test_an_unknown_device_is_refused():
    with pytest.raises(ValueError, match="choose one of cpu, cuda"):
        device_settings("mps", False, tiny_architecture())


def test_the_architecture_needs_its_shape(tmp_path):
    with pytest.raises(TypeError, match="num_layers"):
        GPTArchitecture(hidden_size=64, num_attention_heads=4, vocab_size=256)
    arch = tiny_architecture()
    assert (arch.num_query_groups, arch.kv_channels) == (4, 16)  # derived when not given
    path = arch.save(tmp_path)
    assert GPTArchitecture.load(tmp_path) == arch
    fields = dataclasses.asdict(arch)
    del fields["hidden_size"]
    path.write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=r"missing fields \['hidden_size'\]"):
        GPTArchitecture.load(tmp_path)


@pytest.fixture
def world_of_one():
    init_distributed(1, 1)
    yield
    destroy_distributed()


@pytest.mark.parametrize("family_flags", [{}, {"add_qkv_bias": True, "tie_word_embeddings": False}])
def test_a_model_built_for_loading_has_the_tensor_parallel_attributes_of_a_random_one(
    world_of_one, family_flags
):
    """Megatron sets them inside its random init only; the optimizer's grad norm at TP>1 needs them."""
    arch = tiny_architecture(num_query_groups=2, **family_flags)

    def attributes(loads_weights):
        config = to_transformer_config(arch, device="cpu", loads_weights=loads_weights)
        model = build_gpt_model(arch, config, use_te=False)
        names = ("tensor_model_parallel", "partition_dim", "partition_stride")
        return {n: [getattr(p, a, None) for a in names] for n, p in model.named_parameters()}

    loaded, random = attributes(True), attributes(False)
    assert loaded == random
    assert random["decoder.layers.0.mlp.linear_fc1.weight"] == [True, 0, 2]  # SwiGLU's [gate, up]
    assert random["decoder.layers.0.self_attention.linear_proj.weight"] == [True, 1, 1]
