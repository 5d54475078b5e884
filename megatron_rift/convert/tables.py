"""Declarative weight-name tables: Hugging Face <-> Megatron-Core, one table per architecture.

Megatron names are written in Megatron's *checkpoint* naming, which is the Transformer Engine
spec's module naming (norms fused into ``linear_qkv`` / ``linear_fc1`` as ``layer_norm_weight``).
The local spec keeps separate ``input_layernorm`` / ``pre_mlp_layernorm`` modules but stores them
under the TE names through its ``sharded_state_dict_keys_map``, so one table and one checkpoint
serve both specs; :func:`module_param_name` gives a spec's own module naming.

A new architecture is a new table: the HF names, which transform joins them, and the flags the
architecture sets on :class:`GPTArchitecture`. Mixture-of-experts tables add rows with an
``{expert}`` index (one per routed expert) and the names of their config.json fields
(:class:`MoEConfigNames`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from megatron_rift.convert.transforms import GATE_UP, IDENTITY, QKV, VOCAB, Transform
from megatron_rift.model.config import GPTArchitecture

LAYER = "{layer}"
EXPERT = "{expert}"
LAYERS_PREFIX = "decoder.layers."
# Module naming of a local expert; dist_checkpointing stores all experts of a layer stacked under
# `...experts.experts.` (SequentialMLP and TEGroupedMLP alike), indexed by the global expert.
LOCAL_EXPERT = re.compile(r"^(?P<head>.*\.)local_experts\.(?P<expert>\d+)\.(?P<tail>.*)$")


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
    expert: int | None = None


@dataclasses.dataclass(frozen=True)
class MoEConfigNames:
    """Where an MoE family's config.json keeps the expert layout (the rest is read the same way)."""

    num_experts: tuple[str, ...]  # accepted spellings, the first one is written
    expert_ffn: str  # the size of one expert's MLP
    # config.json's norm_topk_prob, or None where the family always renormalizes (Mixtral)
    norm_topk_prob: str | None = None


@dataclasses.dataclass(frozen=True)
class ArchitectureTable:
    model_type: str  # config.json's model_type
    hf_architecture: str  # config.json's architectures[0]
    mappings: tuple[WeightMapping, ...]
    arch_flags: Mapping[str, bool] = dataclasses.field(default_factory=dict)
    # HF tensors that carry no weights (buffers some old exports saved).
    ignored_hf: tuple[str, ...] = (r"\.rotary_emb\.inv_freq$",)
    moe: MoEConfigNames | None = None  # None: a dense family

    def resolve(self, arch: GPTArchitecture) -> list[ResolvedWeight]:
        """Every weight of a model with this architecture, in HF order (embedding, layers, head;
        within a layer, the shared weights before the experts)."""
        used = [m for m in self.mappings if not (m.untied_only and arch.tie_word_embeddings)]
        first = [m for m in used if m.megatron.startswith("embedding.")]
        per_layer = [m for m in used if LAYER in m.megatron and EXPERT not in m.megatron]
        per_expert = [m for m in used if EXPERT in m.megatron]
        last = [m for m in used if m not in first and m not in per_layer + per_expert]
        experts = range(arch.num_moe_experts or 0)
        return (
            [_resolve(m, None) for m in first]
            + [
                row
                for i in range(arch.num_layers)
                for row in [_resolve(m, i) for m in per_layer]
                + [_resolve(m, i, e) for e in experts for m in per_expert]
            ]
            + [_resolve(m, None) for m in last]
        )

    def is_ignored(self, hf_name: str) -> bool:
        return any(re.search(p, hf_name) for p in self.ignored_hf)


def _resolve(
    mapping: WeightMapping, layer: int | None, expert: int | None = None
) -> ResolvedWeight:
    def fill(name: str) -> str:
        if layer is not None:
            name = name.replace(LAYER, str(layer))
        return name if expert is None else name.replace(EXPERT, str(expert))

    return ResolvedWeight(
        fill(mapping.megatron), tuple(fill(h) for h in mapping.hf), mapping.transform, layer, expert
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


def _moe_layer(block: str, router: str, gate: str, up: str, down: str) -> tuple[WeightMapping, ...]:
    """The MLP half of an MoE decoder layer: the pre-MLP norm (its own module in an MoE layer), the
    router and each expert's SwiGLU MLP. ``block`` is the HF MoE module's name in a layer."""
    hf_block = f"model.layers.{{layer}}.{block}"
    expert = f"{hf_block}.experts.{{expert}}"
    megatron_expert = "decoder.layers.{layer}.mlp.experts.local_experts.{expert}"
    return (
        WeightMapping(
            "decoder.layers.{layer}.pre_mlp_layernorm.weight",
            ("model.layers.{layer}.post_attention_layernorm.weight",),
        ),
        WeightMapping("decoder.layers.{layer}.mlp.router.weight", (f"{hf_block}.{router}.weight",)),
        WeightMapping(
            f"{megatron_expert}.linear_fc1.weight",
            (f"{expert}.{gate}.weight", f"{expert}.{up}.weight"),
            GATE_UP,
        ),
        WeightMapping(f"{megatron_expert}.linear_fc2.weight", (f"{expert}.{down}.weight",)),
    )


_ATTENTION = _DECODER_LAYER[:3]  # input norm, q/k/v, output projection

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

# Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention, every MLP a routed MoE block.
QWEN3_MOE = ArchitectureTable(
    "qwen3_moe",
    "Qwen3MoeForCausalLM",
    _EMBEDDING_AND_HEAD
    + _ATTENTION
    + _QK_NORM
    + _moe_layer("mlp", "gate", "gate_proj", "up_proj", "down_proj"),
    arch_flags={"qk_layernorm": True},
    moe=MoEConfigNames(
        ("num_experts", "num_local_experts"), "moe_intermediate_size", "norm_topk_prob"
    ),
)
# Mixtral: Llama's attention, every MLP a routed MoE block (w1 gate, w3 up, w2 down).
MIXTRAL = ArchitectureTable(
    "mixtral",
    "MixtralForCausalLM",
    _EMBEDDING_AND_HEAD + _ATTENTION + _moe_layer("block_sparse_moe", "gate", "w1", "w3", "w2"),
    moe=MoEConfigNames(("num_local_experts",), "intermediate_size"),
)

TABLES: dict[str, ArchitectureTable] = {
    t.model_type: t for t in (LLAMA, QWEN2, QWEN3, QWEN3_MOE, MIXTRAL)
}


def table_for_architecture(arch: GPTArchitecture) -> ArchitectureTable:
    """The table of ``arch.hf_model_type``; for models not converted from HF, the one whose flags fit."""
    if arch.is_moe and arch.hf_model_type is None:
        raise KeyError("an MoE model not converted from HF has no conversion table")
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


def checkpoint_key(megatron_name: str) -> tuple[str, tuple[int, ...]]:
    """(stored key, indices into its stacked leading axes): Megatron-Core stores the decoder layers
    stacked, so ``decoder.layers.3.X`` is row 3 of ``decoder.layers.X``, and a layer's experts stacked
    once more: ``decoder.layers.3.mlp.experts.local_experts.5.Y`` is [3, 5] of
    ``decoder.layers.mlp.experts.experts.Y``."""
    if megatron_name.startswith(LAYERS_PREFIX):
        index, _, rest = megatron_name[len(LAYERS_PREFIX) :].partition(".")
        if index.isdigit():
            expert = LOCAL_EXPERT.match(rest)
            if expert:
                key = f"{expert['head']}experts.{expert['tail']}"
                return LAYERS_PREFIX + key, (int(index), int(expert["expert"]))
            return LAYERS_PREFIX + rest, (int(index),)
    return megatron_name, ()


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
