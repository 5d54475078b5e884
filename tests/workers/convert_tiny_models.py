"""Tiny random Hugging Face models of each supported family, built on the fly (no downloads), and
the tiny Megatron architecture of the same shape.

Norm weights and biases are randomized too, so a norm or bias mapped to the wrong place changes
the logits; the larger initializer range makes logits big enough for a 1e-4 check to mean something.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 300  # not a multiple of 128: Megatron pads it to 384 at TP=1 and to 512 at TP=2
TOKENIZER_VOCAB = 280

FAMILIES = {
    # Llama-3 style: multi-head (kv heads = heads), untied head, llama3 RoPE scaling.
    "llama": dict(
        num_key_value_heads=4,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        max_position_embeddings=131072,
    ),
    # Qwen2.5 style: GQA (2 kv heads for 4), tied embeddings, q/k/v biases, rope theta 1e6.
    "qwen2": dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6),
    # Qwen3 style: one kv head, head_dim 32 != hidden/heads = 16, q/k norms, untied.
    "qwen3": dict(num_key_value_heads=1, tie_word_embeddings=False, head_dim=32, rope_theta=1e6),
}


# Mixture-of-experts families: 4 experts, top-2, experts of 32 (the dense MLP size 96 stays in the
# config as Qwen3-MoE keeps it). Qwen3-MoE without top-k renormalization (its default), so the
# router's other normalization is exercised by Mixtral.
MOE_FAMILIES = {
    "qwen3_moe": dict(
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=False,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=False,
        rope_theta=1e6,
    ),
    "mixtral": dict(
        num_key_value_heads=2,
        tie_word_embeddings=True,
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=32,
        rope_theta=1e6,
    ),
}


def tiny_architecture(**overrides):
    """A ``GPTArchitecture`` of :func:`hf_config`'s shape (2 layers, hidden 64, 4 heads, ffn 96,
    vocabulary VOCAB); ``overrides`` replace any field."""
    from megatron_rift.model import GPTArchitecture

    fields = dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, vocab_size=VOCAB
    )
    return GPTArchitecture(**{**fields, **overrides})


def hf_config(family: str, **overrides):
    from transformers import LlamaConfig, MixtralConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    cls = {
        "llama": LlamaConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
        "qwen3_moe": Qwen3MoeConfig,
        "mixtral": MixtralConfig,
    }[family]
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        rms_norm_eps=1e-6,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update({**FAMILIES, **MOE_FAMILIES}[family])
    kwargs.update(overrides)
    return cls(**kwargs)


def make_tiny_hf_model(
    folder: str | Path,
    family: str,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_shard_size: str | None = None,
    tokenizer: bool = False,
    **overrides,
) -> Path:
    """Save a random tiny model of ``family`` to ``folder`` (safetensors; sharded with ``max_shard_size``)."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.2 * torch.randn_like(param))
    model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), **kwargs)
    if tokenizer:
        from tests.tiny_tokenizers import build_bpe_tokenizer

        texts = [
            "the quick brown fox jumps over the lazy dog",
            "2 + 2 = 4",
            "solve for x: 3x = 12",
        ] * 20
        build_bpe_tokenizer(folder, texts, vocab_size=TOKENIZER_VOCAB)
    return folder


def safetensors_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder's safetensors files (single or sharded), read independently."""
    from safetensors.torch import load_file

    weights = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        weights.update(load_file(str(path)))
    return weights
