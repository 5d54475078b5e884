"""The transformer layer spec: Transformer Engine where it imports, Megatron's local spec elsewhere.

TE layers fuse the pre-attention and pre-MLP norms into ``linear_qkv`` / ``linear_fc1`` and are
required for FP8. Without TE we take Megatron's local spec and swap its CUDA-only core attention for
:class:`SDPACoreAttention`. Either way ``qk_layernorm`` must be passed here: setting it on
``TransformerConfig`` alone is silently ignored (Qwen3 depends on it).
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_rift.model.sdpa_attention import SDPACoreAttention


def transformer_engine_available() -> bool:
    """True when TE imports and a CUDA device exists (TE layers cannot run on CPU)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def get_layer_spec(
    use_te: bool | None = None,
    qk_layernorm: bool = False,
    normalization: str = "RMSNorm",
    num_experts: int | None = None,
    moe_grouped_gemm: bool = False,
) -> ModuleSpec:
    """Layer spec for GPTModel. ``use_te=None`` picks TE when available.

    With ``num_experts`` the MLP is Megatron-Core's MoELayer: experts as ``SequentialMLP`` (local, CPU)
    or ``TEGroupedMLP`` (TE with ``moe_grouped_gemm``); both store the same checkpoint layout.
    """
    if use_te is None:
        use_te = transformer_engine_available()
    moe = dict(num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm) if num_experts else {}
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm, **moe)
    spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization=normalization, **moe)
    if num_experts:
        # The TE MoE spec keeps pre_mlp_layernorm as its own module (nothing to fuse it into), stored
        # as `pre_mlp_layernorm.weight`; the local spec would rename it to the dense layer's fused
        # name. Dropping that rename gives both specs one checkpoint layout.
        keys_map = dict(spec.submodules.sharded_state_dict_keys_map)
        keys_map.pop("pre_mlp_layernorm.", None)
        spec.submodules = dataclasses.replace(spec.submodules, sharded_state_dict_keys_map=keys_map)
    attention = spec.submodules.self_attention
    attention.submodules = dataclasses.replace(
        attention.submodules, core_attention=SDPACoreAttention
    )
    return spec


class SequenceParallelTorchNorm:
    """Megatron's ``WrappedTorchNorm`` (torch's RMSNorm / LayerNorm, the norm of the local spec
    without apex), allowed under sequence parallelism.

    Megatron's wrapper refuses sequence parallelism only because torch's norm does not mark its
    weights: each tensor-parallel rank then normalizes its own slice of the sequence, so the
    weight gradients are partial sums that ``finalize_model_grads`` must all-reduce over the TP
    group, which it does for parameters marked ``sequence_parallel`` (as apex's and TE's norms
    mark theirs).
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        norms = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in norms:
            raise ValueError(f"normalization {config.normalization!r}: LayerNorm or RMSNorm")
        norm = norms[config.normalization](normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def _swap_torch_norms(spec):
    """A copy of ``spec`` with every WrappedTorchNorm replaced by SequenceParallelTorchNorm."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if spec is WrappedTorchNorm:
        return SequenceParallelTorchNorm
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(spec, submodules=_swap_torch_norms(spec.submodules))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changes = {
            f.name: _swap_torch_norms(getattr(spec, f.name)) for f in dataclasses.fields(spec)
        }
        return dataclasses.replace(spec, **changes)
    return spec


def sequence_parallel_block_spec(layer_spec: ModuleSpec, config, vp_stage: int | None = None):
    """The transformer block of this stage (chunk) for a sequence-parallel ``config``: the layer
    spec and the final norm with :class:`SequenceParallelTorchNorm` where the torch norm was (TE's
    and apex's norms support sequence parallelism and stay)."""
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    final_norm = transformer_block.LayerNormImpl
    if final_norm is WrappedTorchNorm:
        final_norm = SequenceParallelTorchNorm
    num_layers = transformer_block.get_num_layers_to_build(config, vp_stage=vp_stage)
    return transformer_block.TransformerBlockSubmodules(
        layer_specs=[_swap_torch_norms(layer_spec)] * num_layers, layer_norm=final_norm
    )
