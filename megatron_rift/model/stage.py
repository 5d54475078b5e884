"""This rank's model as the trainer and the reference tool build it: the layer implementation, the
TransformerConfig for a parallel layout and precision, and frozen copies for scoring.

Both callers pass explicit values (no command-line namespace), so the reference log-probs are
computed by exactly the model the trainer trains.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import Float16Module

from megatron_rift.model.builder import build_gpt_model
from megatron_rift.model.config import GPTArchitecture, to_transformer_config
from megatron_rift.model.spec import transformer_engine_available

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_use_te(transformer_impl: str) -> bool:
    """``auto``: Transformer Engine layers when TE and a GPU are here; ``local``: never."""
    if transformer_impl == "local":
        return False
    if transformer_impl == "transformer_engine":
        if not transformer_engine_available():
            raise RuntimeError(
                "--transformer-impl transformer_engine: Transformer Engine or a "
                "CUDA device is missing"
            )
        return True
    return transformer_engine_available()


def stage_transformer_config(
    arch: GPTArchitecture,
    tensor_parallel: int,
    pipeline_parallel: int,
    dtype: str = "fp32",
    loads_weights: bool = False,
    fp8_format: str | None = None,
    fp8_recipe: str = "delayed",
    variable_seq_lengths: bool = False,
    layout: dict | None = None,
    moe_overrides: dict | None = None,
):
    """Megatron's TransformerConfig for a run of this layout (``dtype`` one of :data:`DTYPES`).
    ``layout``: TransformerConfig fields of the layout and memory flags (sequence parallelism,
    virtual pipeline stages, recompute; megatron_rift.training.layout.transformer_layout);
    ``moe_overrides``: the run's MoE fields (expert parallel size, router losses, dispatcher)."""
    overrides = dict(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        # The loss function returns (sum, count): the schedule and DDP divide by the count summed
        # over micro-batches and data-parallel ranks (Megatron-LM pretrain_gpt convention).
        calculate_per_token_loss=True,
        sequence_parallel=False,
    )
    if variable_seq_lengths:
        # Packed micro-batches have a varying number of rows; p2p must exchange shapes first.
        # (TransformerConfig refuses it with the default MoE dispatcher, unused here.)
        overrides.update(variable_seq_lengths=True, moe_token_dispatcher_type="alltoall")
    if fp8_format is not None:
        overrides.update(fp8=fp8_format, fp8_recipe=fp8_recipe)
    overrides.update(layout or {})
    overrides.update(moe_overrides or {})
    return to_transformer_config(arch, DTYPES[dtype], loads_weights=loads_weights, **overrides)


def place_model(model, config):
    """On the GPU when there is one, wrapped for bf16/fp16 as Megatron-LM does."""
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if config.fp16 or config.bf16:
        model = Float16Module(config, model)
    return model


def build_frozen_model(
    arch: GPTArchitecture,
    config,
    use_te: bool,
    checkpoint: str | None = None,
    state_dict: dict | None = None,
    cross_entropy_chunk: int | None = None,
):
    """A model for scoring only: the trainer's layers and parallel layout, eval mode, no gradients,
    no DDP, no optimizer. Weights from ``checkpoint`` (root or iteration folder) or ``state_dict``;
    ``cross_entropy_chunk`` as for :func:`build_gpt_model`."""
    from megatron_rift.checkpointing import load_model_weights

    gpt = build_gpt_model(arch, config, use_te=use_te, cross_entropy_chunk=cross_entropy_chunk)
    model = place_model(gpt, config)
    if checkpoint is not None:
        load_model_weights(checkpoint, model)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.eval()
    model.requires_grad_(False)
    return model
