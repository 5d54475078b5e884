"""Hugging Face ``config.json`` <-> :class:`GPTArchitecture`, refusing what Megatron cannot reproduce.

Anything the Megatron model would silently compute differently (sliding-window attention, a RoPE
variant Megatron-Core lacks, biases it has no slot for) is an error naming the config field.
Both config styles are read: transformers 4 (``rope_theta`` + ``rope_scaling``) and
transformers 5 (``rope_parameters``).
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_rift.convert.errors import ConversionError
from megatron_rift.convert.moe_config import moe_fields_from_hf, moe_fields_to_hf, other_spellings
from megatron_rift.convert.tables import TABLES, ArchitectureTable
from megatron_rift.model.config import GPTArchitecture

# Megatron-Core 0.16's Llama-3 RoPE scaling fixes everything but the factor
# (models/common/embeddings/rotary_pos_embedding.py, RotaryEmbedding._apply_scaling).
MEGATRON_LLAMA3_ROPE = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_MISSING = object()


def read_hf_config(hf_dir: str | Path) -> tuple[GPTArchitecture, ArchitectureTable, dict]:
    """Parse ``hf_dir/config.json``. Returns the architecture, its weight table and the raw config dict."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(
            f"{path} not found: --hf-path must be a Hugging Face model folder "
            "(config.json and *.safetensors)"
        )
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: not valid JSON (line {err.lineno}): {err.msg}") from err
    return architecture_from_hf_config(cfg, source=str(path)), TABLES[cfg["model_type"]], cfg


def architecture_from_hf_config(cfg: dict, source: str = "config.json") -> GPTArchitecture:
    model_type = cfg.get("model_type")
    if model_type not in TABLES:
        raise ConversionError(
            f"{source}: model_type {model_type!r} is not supported; supported model types: "
            f"{', '.join(sorted(TABLES))}"
        )
    table = TABLES[model_type]

    def field(name, default=_MISSING):
        value = cfg.get(name, default)
        if value is _MISSING or (value is None and default is _MISSING):
            raise ConversionError(f"{source}: field {name!r} is missing")
        return value

    def refuse(name: str, value, why: str):
        raise ConversionError(f"{source}: field {name!r} = {value!r} is not supported: {why}")

    if field("hidden_act", "silu") != "silu":
        refuse(
            "hidden_act", cfg["hidden_act"], "only SwiGLU MLPs (hidden_act 'silu') are converted"
        )
    for name in ("attention_bias", "mlp_bias"):
        # Qwen2 always has q/k/v biases (its table says so); elsewhere Megatron would need
        # o_proj / MLP biases too.
        if cfg.get(name) and model_type != "qwen2":
            refuse(
                name, cfg[name], "Megatron's GPTModel here has no bias slot for o_proj / the MLP"
            )
    if cfg.get("use_sliding_window"):
        refuse("use_sliding_window", True, "the Megatron model has no sliding-window attention")
    layer_types = cfg.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        refuse("layer_types", sorted(set(layer_types)), "only full attention layers are supported")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        refuse(
            "partial_rotary_factor", cfg["partial_rotary_factor"], "RoPE must cover the whole head"
        )

    heads = field("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    hidden = field("hidden_size")
    if heads % kv_heads:
        raise ConversionError(
            f"{source}: num_key_value_heads={kv_heads} does not divide num_attention_heads={heads}"
        )
    rotary_base, rope_scaling_factor = _rope(cfg, source)
    return GPTArchitecture(
        num_layers=field("num_hidden_layers"),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        ffn_hidden_size=field("intermediate_size"),
        kv_channels=cfg.get("head_dim") or hidden // heads,
        vocab_size=field("vocab_size"),
        max_position_embeddings=field("max_position_embeddings"),
        rotary_base=float(rotary_base),
        rope_scaling=rope_scaling_factor is not None,
        rope_scaling_factor=float(rope_scaling_factor or 8.0),
        norm_epsilon=float(field("rms_norm_eps")),
        normalization="RMSNorm",
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        swiglu=True,
        hf_model_type=model_type,
        **table.arch_flags,
        **moe_fields_from_hf(cfg, table, source),
    )


def _rope(cfg: dict, source: str) -> tuple[float, float | None]:
    """(rope theta, llama3 scaling factor or None)."""
    if isinstance(cfg.get("rope_parameters"), dict):
        params, where = cfg["rope_parameters"], "rope_parameters"
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    else:
        params, where = cfg.get("rope_scaling") or {}, "rope_scaling"
        theta = cfg.get("rope_theta", 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ConversionError(
            f"{source}: field '{where}.rope_type' = {rope_type!r} is not supported: "
            "Megatron-Core's GPTModel implements plain RoPE and Llama-3's 'llama3' "
            "scaling only"
        )
    for name, required in MEGATRON_LLAMA3_ROPE.items():
        if float(params.get(name, required)) != required:
            raise ConversionError(
                f"{source}: field '{where}.{name}' = {params[name]!r} is not supported: "
                f"Megatron-Core's llama3 RoPE scaling fixes it to {required}"
            )
    if "factor" not in params:
        raise ConversionError(f"{source}: field '{where}.factor' is missing")
    return theta, float(params["factor"])


def hf_config_from_architecture(
    arch: GPTArchitecture, table: ArchitectureTable, dtype_name: str, base: dict | None = None
) -> dict:
    """A ``config.json`` dict for ``arch``. ``base`` (the source model's config, when kept) supplies the
    fields Megatron does not model (token ids, initializer range, ...); the architecture fields win."""
    cfg = dict(base or {})
    rope_scaling = None
    if arch.rope_scaling:
        rope_scaling = {
            "rope_type": "llama3",
            "factor": arch.rope_scaling_factor,
            **MEGATRON_LLAMA3_ROPE,
        }
    cfg.update(
        model_type=table.model_type,
        architectures=[table.hf_architecture],
        num_hidden_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups,
        intermediate_size=arch.ffn_hidden_size,
        head_dim=arch.kv_channels,
        vocab_size=arch.vocab_size,
        max_position_embeddings=arch.max_position_embeddings,
        rms_norm_eps=arch.norm_epsilon,
        tie_word_embeddings=arch.tie_word_embeddings,
        hidden_act="silu",
        # Both spellings: transformers 4 (and vLLM builds on it) reads rope_theta/rope_scaling,
        # transformers 5 prefers rope_parameters.
        rope_theta=arch.rotary_base,
        rope_scaling=rope_scaling,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rotary_base}
        if rope_scaling is None
        else {**rope_scaling, "rope_theta": arch.rotary_base},
        torch_dtype=dtype_name,
        dtype=dtype_name,
    )
    for name in other_spellings(table):
        cfg.pop(name, None)
    cfg.update(moe_fields_to_hf(arch, table))
    if table.model_type == "qwen2":
        cfg["use_sliding_window"] = False
    cfg.pop("layer_types", None)  # recomputed by transformers from num_hidden_layers
    return cfg
