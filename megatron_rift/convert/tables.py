"""Declarative weight-name tables: Hugging Face <-> Megatron-Core, one table per architecture.

Megatron names are written in Megatron's *checkpoint* naming, which is the Transformer Engine
spec's module naming (norms fused into ``linear_qkv`` / ``linear_fc1`` as ``layer_norm_weight``).
The local spec keeps separate ``input_layernorm`` / ``pre_mlp_layernorm`` modules but stores them
under the TE names through its ``sharded_state_dict_keys_map``, so one table and one checkpoint
serve both specs; :func:`module_param_name` gives a spec's own module naming.

A new architecture is a new table: the HF names, which transform joins them, and the flags the
architecture sets on :class:`GPTArchitecture`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from megatron_rift.convert.transforms import GATE_UP, IDENTITY, QKV, VOCAB, Transform
from megatron_rift.model.config import GPTArchitecture

LAYER = "{layer}"
LAYERS_PREFIX = "decoder.layers."


@dataclasses.dataclass(frozen=True)
class WeightMapping:
    """One Megatron weight and the HF weight(s) it is made of. ``{layer}`` stands for the layer index."""

    megatron: str
    hf: tuple[str, ...]
    transform: Transform = IDENTITY
    untied_only: bool = False  # the output layer exists only when embeddings are not tied

    def __post_init__(self):
        if len(self.hf) != self.transform.hf_count:
            raise ValueError(
                f"{self.megatron}: transform {self.transform.name} takes "
                f"{self.transform.hf_count} HF tensors, got {self.hf}"
            )


@dataclasses.dataclass(frozen=True)
class ResolvedWeight:
    """A table row for one concrete layer (``layer`` is None outside the decoder stack)."""

    megatron: str
    hf: tuple[str, ...]
    transform: Transform
    layer: int | None


@dataclasses.dataclass(frozen=True)
class ArchitectureTable:
    model_type: str  # config.json's model_type
    hf_architecture: str  # config.json's architectures[0]
    mappings: tuple[WeightMapping, ...]
    arch_flags: Mapping[str, bool] = dataclasses.field(default_factory=dict)
    # HF tensors that carry no weights (buffers some old exports saved).
    ignored_hf: tuple[str, ...] = (r"\.rotary_emb\.inv_freq$",)

    def resolve(self, arch: GPTArchitecture) -> list[ResolvedWeight]:
        """Every weight of a model with this architecture, in HF order (embedding, layers, head)."""
        used = [m for m in self.mappings if not (m.untied_only and arch.tie_word_embeddings)]
        first = [m for m in used if m.megatron.startswith("embedding.")]
        per_layer = [m for m in used if LAYER in m.megatron]
        last = [m for m in used if m not in first and m not in per_layer]
        return (
            [_resolve(m, None) for m in first]
            + [_resolve(m, i) for i in range(arch.num_layers) for m in per_layer]
            + [_resolve(m, None) for m in last]
        )

    def is_ignored(self, hf_name: str) -> bool:
        return any(re.search(p, hf_name) for p in self.ignored_hf)


def _resolve(mapping: WeightMapping, layer: int | None) -> ResolvedWeight:
    def fill(name: str) -> str:
        return name if layer is None else name.replace(LAYER, str(layer))

    return ResolvedWeight(
        fill(mapping.megatron), tuple(fill(h) for h in mapping.hf), mapping.transform, layer
    )


_DECODER_LAYER = (
    WeightMapping(
        "decoder.layers.{layer}.self_attention.linear_qkv.layer_norm_weight",
        ("model.layers.{layer}.input_layernorm.weight",),
    ),
    WeightMapping(
        "decoder.layers.{layer}.self_attention.linear_qkv.weight",
        (
            "model.layers.{layer}.self_attn.q_proj.weight",
            "model.layers.{layer}.self_attn.k_proj.weight",
            "model.layers.{layer}.self_attn.v_proj.weight",
        ),
        QKV,
    ),
    WeightMapping(
        "decoder.layers.{layer}.self_attention.linear_proj.weight",
        ("model.layers.{layer}.self_attn.o_proj.weight",),
    ),
    WeightMapping(
        "decoder.layers.{layer}.mlp.linear_fc1.layer_norm_weight",
        ("model.layers.{layer}.post_attention_layernorm.weight",),
    ),
    WeightMapping(
        "decoder.layers.{layer}.mlp.linear_fc1.weight",
        ("model.layers.{layer}.mlp.gate_proj.weight", "model.layers.{layer}.mlp.up_proj.weight"),
        GATE_UP,
    ),
    WeightMapping(
        "decoder.layers.{layer}.mlp.linear_fc2.weight",
        ("model.layers.{layer}.mlp.down_proj.weight",),
    ),
)
_EMBEDDING_AND_HEAD = (
    WeightMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB),
    WeightMapping("decoder.final_layernorm.weight", ("model.norm.weight",)),
    WeightMapping("output_layer.weight", ("lm_head.weight",), VOCAB, untied_only=True),
)
_QKV_BIAS = (
    WeightMapping(
        "decoder.layers.{layer}.self_attention.linear_qkv.bias",
        (
            "model.layers.{layer}.self_attn.q_proj.bias",
            "model.layers.{layer}.self_attn.k_proj.bias",
            "model.layers.{layer}.self_attn.v_proj.bias",
        ),
        QKV,
    ),
)
_QK_NORM = (
    WeightMapping(
        "decoder.layers.{layer}.self_attention.q_layernorm.weight",
        ("model.layers.{layer}.self_attn.q_norm.weight",),
    ),
    WeightMapping(
        "decoder.layers.{layer}.self_attention.k_layernorm.weight",
        ("model.layers.{layer}.self_attn.k_norm.weight",),
    ),
)

LLAMA = ArchitectureTable("llama", "LlamaForCausalLM", _EMBEDDING_AND_HEAD + _DECODER_LAYER)
# Qwen2 / Qwen2.5 / Qwen2.5-Math / DeepSeek-R1-Distill-Qwen: Llama plus biases on q, k, v.
QWEN2 = ArchitectureTable(
    "qwen2",
    "Qwen2ForCausalLM",
    _EMBEDDING_AND_HEAD + _DECODER_LAYER + _QKV_BIAS,
    arch_flags={"add_qkv_bias": True},
)
# Qwen3: Llama plus an RMSNorm over each query and key head (no q, k, v biases).
QWEN3 = ArchitectureTable(
    "qwen3",
    "Qwen3ForCausalLM",
    _EMBEDDING_AND_HEAD + _DECODER_LAYER + _QK_NORM,
    arch_flags={"qk_layernorm": True},
)

TABLES: dict[str, ArchitectureTable] = {t.model_type: t for t in (LLAMA, QWEN2, QWEN3)}


def table_for_architecture(arch: GPTArchitecture) -> ArchitectureTable:
    """The table of ``arch.hf_model_type``; for models not converted from HF, the one whose flags fit."""
    if arch.hf_model_type is not None:
        if arch.hf_model_type not in TABLES:
            raise KeyError(
                f"model type {arch.hf_model_type!r} has no conversion table "
                f"(supported: {', '.join(sorted(TABLES))})"
            )
        return TABLES[arch.hf_model_type]
    if arch.qk_layernorm and not arch.add_qkv_bias:
        return QWEN3
    if arch.add_qkv_bias and not arch.qk_layernorm:
        return QWEN2
    if not arch.add_qkv_bias and not arch.qk_layernorm:
        return LLAMA
    raise KeyError("no HF architecture has both q/k/v biases and q/k norms")


def checkpoint_key(megatron_name: str) -> tuple[str, int | None]:
    """(stored key, layer): Megatron-Core stores the decoder layers stacked, so ``decoder.layers.3.X``
    is row 3 of ``decoder.layers.X``."""
    if megatron_name.startswith(LAYERS_PREFIX):
        index, _, rest = megatron_name[len(LAYERS_PREFIX) :].partition(".")
        if index.isdigit():
            return LAYERS_PREFIX + rest, int(index)
    return megatron_name, None


def layer_keys_map(layer_spec) -> dict[str, str]:
    """A layer spec's ``{module name prefix: checkpoint name prefix}`` (empty for the TE spec)."""
    return dict(getattr(layer_spec.submodules, "sharded_state_dict_keys_map", None) or {})


def module_param_name(megatron_name: str, layer_spec) -> str:
    """The parameter name in ``model.state_dict()`` of a model built with ``layer_spec``."""
    if not megatron_name.startswith(LAYERS_PREFIX):
        return megatron_name
    index, _, rest = megatron_name[len(LAYERS_PREFIX) :].partition(".")
    for module_prefix, checkpoint_prefix in layer_keys_map(layer_spec).items():
        if rest.startswith(checkpoint_prefix):
            rest = module_prefix + rest[len(checkpoint_prefix) :]
            break
    return f"{LAYERS_PREFIX}{index}.{rest}"
