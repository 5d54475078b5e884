"""The ``TransformerConfig`` fields the device decides, not the model: fused kernels, where weights
are created, and whether they are randomly initialized at all.

CPU: every fusion off (their kernels are CUDA-only) and the master weights initialized whole on
the CPU, then split, so a random model is the same at any TP. CUDA: the fusions Megatron-LM turns
on by default for Llama/Qwen-style models, each only where its kernel imports, and weights created
on the GPU. On both, a model about to be filled from a checkpoint skips the random initialization.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from megatron_rift.model.config import GPTArchitecture

DEVICES = ("cpu", "cuda")


@dataclasses.dataclass(frozen=True)
class FusedKernels:
    """Which optional fused kernels this process has. :meth:`probe` asks Megatron-Core the same
    questions its own checks ask; tests pass an instance instead."""

    rope: bool  # TE's fused RoPE: TransformerConfig refuses apply_rope_fusion without it
    # apex's fused_weight_gradient_mlp_cuda: every ColumnParallelLinear (the output layer too,
    # under TE) refuses gradient_accumulation_fusion without it.
    weight_gradient_accumulation: bool
    # apex's FastLayerNorm: the only norm that honours persist_layer_norm (torch's asserts it off).
    persistent_layer_norm: bool

    @classmethod
    def probe(cls) -> FusedKernels:
        from megatron.core.fusions import fused_layer_norm
        from megatron.core.models.common.embeddings import rope_utils
        from megatron.core.tensor_parallel import layers

        return cls(
            rope=(
                rope_utils.fused_apply_rotary_pos_emb is not None
                or rope_utils.fused_apply_rotary_pos_emb_thd is not None
            ),
            weight_gradient_accumulation=bool(
                getattr(layers, "_grad_accum_fusion_available", False)
            ),
            persistent_layer_norm=bool(fused_layer_norm.HAVE_PERSIST_LAYER_NORM),
        )


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``: the one place the device is guessed."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_settings(
    device: str, loads_weights: bool, arch: GPTArchitecture, kernels: FusedKernels | None = None
) -> dict:
    """TransformerConfig keyword arguments for ``device`` (``"cpu"``/``"cuda"``, ``"cuda:1"`` too).

    ``loads_weights``: every parameter is about to be overwritten from a checkpoint, so the random
    initialization is skipped. ``kernels`` defaults to :meth:`FusedKernels.probe` (CUDA only).
    """
    kind = torch.device(device).type
    if kind not in DEVICES:
        raise ValueError(f"device {device!r}: choose one of {', '.join(DEVICES)}")
    if kind == "cpu":
        return dict(
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            bias_dropout_fusion=False,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
            # Master weights initialized whole on CPU then split: the same model at any TP.
            use_cpu_initialization=True,
            perform_initialization=not loads_weights,
        )
    kernels = FusedKernels.probe() if kernels is None else kernels
    return dict(
        # SwiGLU's jit-fused activation; fused gelu needs a linear bias, which this family lacks.
        bias_activation_fusion=arch.swiglu,
        # Plain-torch fallbacks live inside both: Megatron picks the fused path where it can.
        masked_softmax_fusion=True,
        bias_dropout_fusion=True,
        apply_rope_fusion=kernels.rope,
        # Needs Megatron's DDP (it accumulates into param.main_grad): a model trained without it
        # passes gradient_accumulation_fusion=False.
        gradient_accumulation_fusion=kernels.weight_gradient_accumulation,
        # RMSNorm runs in TE's or torch's norm, never apex's persistent LayerNorm kernel.
        persist_layer_norm=kernels.persistent_layer_norm and arch.normalization == "LayerNorm",
        use_cpu_initialization=False,
        perform_initialization=not loads_weights,
    )
