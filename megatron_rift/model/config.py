"""``GPTArchitecture``: the architecture of a GPT model as one JSON-serializable record.

The converter writes it next to a checkpoint (``model_config.json``) and the trainer reads it back,
so nobody retypes ``--num-layers`` by hand. :func:`to_transformer_config` turns it into Megatron-Core's
``TransformerConfig``, the object every layer is built from.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_rift.checkpoint_layout import MODEL_CONFIG_FILE
from megatron_rift.model.device_settings import FusedKernels, default_device, device_settings
from megatron_rift.model_source import expert_parallel_problems


# The shape has no defaults (a silent toy model would train): tiny shapes live in tests and the
# demo. Keyword-only, so the required fields keep their place in model_config.json.
@dataclasses.dataclass(kw_only=True)
class GPTArchitecture:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int | None = None  # GQA: kv heads; None means = num_attention_heads
    ffn_hidden_size: int | None = None  # None means 4 * hidden_size
    kv_channels: int | None = None  # head dim; None means hidden_size // num_attention_heads
    vocab_size: int  # the tokenizer's vocabulary, before padding for TP
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    rope_scaling: bool = (
        False  # Llama-3.x "llama3" RoPE frequency scaling (Megatron-Core's fixed variant)
    )
    rope_scaling_factor: float = 8.0
    norm_epsilon: float = 1e-6
    normalization: str = "RMSNorm"
    add_qkv_bias: bool = False  # Qwen2
    qk_layernorm: bool = False  # Qwen3
    tie_word_embeddings: bool = True
    swiglu: bool = True
    make_vocab_size_divisible_by: int = 128
    hf_model_type: str | None = None  # llama / qwen2 / qwen3 when converted from HF
    # Mixture of experts (None: a dense model). Every decoder layer is an MoE layer: Megatron-Core's
    # MoELayer with a TopKRouter and num_moe_experts experts of moe_ffn_hidden_size.
    num_moe_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None  # None means ffn_hidden_size
    # False: softmax over the top-k logits (= top-k probabilities renormalized to sum to 1, HF's
    # norm_topk_prob / Mixtral); True: softmax over all experts, then the top k (not renormalized).
    moe_router_pre_softmax: bool = False
    moe_shared_expert_intermediate_size: int | None = None
    moe_aux_loss_coeff: float = 0.0  # the HF config's router_aux_loss_coef: the trainer's default

    def __post_init__(self):
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.kv_channels is None:
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.num_moe_experts is not None and self.moe_ffn_hidden_size is None:
            self.moe_ffn_hidden_size = self.ffn_hidden_size

    @property
    def is_moe(self) -> bool:
        return self.num_moe_experts is not None

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        """Megatron's rule: pad to a multiple of make-vocab-size-divisible-by x TP."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    def check_parallel(self, tensor_parallel_size: int, pipeline_parallel_size: int) -> None:
        """Raise ValueError with a readable reason when TP/PP cannot split this model."""
        problems = []
        tp, pp = tensor_parallel_size, pipeline_parallel_size
        if self.num_attention_heads % tp:
            problems.append(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"tensor-model-parallel-size={tp}"
            )
        if self.num_query_groups % tp:
            problems.append(
                f"num_query_groups (kv heads)={self.num_query_groups} is not divisible "
                f"by tensor-model-parallel-size={tp}"
            )
        if self.ffn_hidden_size % tp:
            problems.append(
                f"ffn_hidden_size={self.ffn_hidden_size} is not divisible by "
                f"tensor-model-parallel-size={tp}"
            )
        if self.is_moe and self.moe_ffn_hidden_size % tp:
            problems.append(
                f"moe_ffn_hidden_size={self.moe_ffn_hidden_size} is not divisible by "
                f"tensor-model-parallel-size={tp} (the expert tensor-parallel size)"
            )
        if self.num_layers % pp:
            problems.append(
                f"num_layers={self.num_layers} is not divisible by "
                f"pipeline-model-parallel-size={pp}"
            )
        if problems:
            raise ValueError("; ".join(problems))

    def check_expert_parallel(
        self,
        expert_parallel_size: int,
        world_size: int,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
    ) -> None:
        """Raise ValueError with a readable reason when ``expert_parallel_size`` cannot split this
        model's experts in a launch of ``world_size`` processes."""
        problems = expert_parallel_problems(
            self.num_moe_experts,
            expert_parallel_size,
            world_size,
            tensor_parallel_size,
            pipeline_parallel_size,
        )
        if problems:
            raise ValueError("; ".join(problems))

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / MODEL_CONFIG_FILE
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> GPTArchitecture:
        path = Path(folder) / MODEL_CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: not a converted checkpoint folder "
                "(convert one with tools/convert_hf_to_megatron.py)"
            )
        data = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown fields {unknown}")
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in data and f.default is dataclasses.MISSING
        )
        if missing:
            raise ValueError(f"{path}: missing fields {missing}")
        return cls(**data)


def to_transformer_config(
    arch: GPTArchitecture,
    params_dtype: torch.dtype = torch.float32,
    device: str | None = None,
    loads_weights: bool = False,
    kernels: FusedKernels | None = None,
    **overrides,
) -> TransformerConfig:
    """Build Megatron-Core's TransformerConfig.

    ``device`` (default: :func:`default_device`) and ``loads_weights`` pick the fusions and the
    initialization (:func:`device_settings`; ``kernels`` overrides its CUDA kernel probe).
    ``overrides`` go straight to TransformerConfig and win (parallel sizes, bf16, fp8, ...).
    """
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        ffn_hidden_size=arch.ffn_hidden_size,
        kv_channels=arch.kv_channels,
        layernorm_epsilon=arch.norm_epsilon,
        normalization=arch.normalization,
        add_bias_linear=False,
        add_qkv_bias=arch.add_qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        gated_linear_unit=arch.swiglu,
        activation_func=torch.nn.functional.silu if arch.swiglu else torch.nn.functional.gelu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        init_method_std=0.02,
    )
    kwargs.update(_moe_fields(arch))
    kwargs.update(device_settings(device or default_device(), loads_weights, arch, kernels))
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _moe_fields(arch: GPTArchitecture) -> dict:
    """TransformerConfig's MoE fields for ``arch`` (none for a dense model). The trainer's flags
    (aux-loss coefficient, dispatcher, grouped GEMM) come as overrides."""
    if not arch.is_moe:
        return {}
    return dict(
        num_moe_experts=arch.num_moe_experts,
        moe_router_topk=arch.moe_router_topk,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_router_pre_softmax=arch.moe_router_pre_softmax,
        moe_shared_expert_intermediate_size=arch.moe_shared_expert_intermediate_size,
        moe_aux_loss_coeff=0.0,  # no router loss outside training
    )
