"""Mixture-of-experts training: the run's MoE settings as TransformerConfig fields, and the router's
auxiliary losses as per-step metrics.

The auxiliary losses are Megatron-Core's own: each MoE layer's TopKRouter attaches its
load-balancing loss (and z-loss) to the activations through ``MoEAuxLossAutoScaler``, so the loss
adds its gradient in the backward without entering the objective's value. Their scale under this
trainer's per-token loss (``calculate_per_token_loss``), as Megatron-Core applies it:

* the router attaches ``coeff * aux_i * T_i`` for micro-batch i, T_i its routed tokens (every
  token of the micro-batch's rows: prompt, response and padding);
* the schedule sets the backward scale to the loss scale (1 in fp32/bf16), not 1/num_microbatches;
* ``finalize_model_grads`` divides every gradient by N, the objective's token count summed over
  the micro-batches and data-parallel ranks of the step.

So the step minimizes ``(sum of per-token losses + coeff * sum_i T_i * aux_i) / N``: the aux loss
counts like a per-token loss of ``coeff * aux_i`` on each routed token. Where every routed token is a
loss token (pre-training), this is Megatron-LM's ``coeff * mean_i aux_i``; where only responses
count (RIFT, SFT on chat data), the aux loss weighs ``routed / counted`` times more than its
coefficient says. docs/moe.md gives the figure and how to choose the coefficient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
)

from megatron_rift.model import GPTArchitecture
from megatron_rift.training.config import MoEConfig


def moe_transformer_overrides(moe: MoEConfig, arch: GPTArchitecture) -> dict:
    """TransformerConfig fields of the run's MoE flags (none for a dense model); the expert layout
    itself comes from ``arch`` (:func:`megatron_rift.model.to_transformer_config`)."""
    if not arch.is_moe:
        return {}
    coeff = arch.moe_aux_loss_coeff if moe.moe_aux_loss_coeff is None else moe.moe_aux_loss_coeff
    overrides = dict(
        expert_model_parallel_size=moe.expert_model_parallel_size,
        moe_router_load_balancing_type=moe.moe_router_load_balancing_type or "aux_loss",
        moe_aux_loss_coeff=coeff,
        moe_z_loss_coeff=moe.moe_z_loss_coeff,
        moe_grouped_gemm=moe.moe_grouped_gemm,
    )
    if moe.moe_token_dispatcher_type is not None:  # else Megatron's default, or the alltoall
        # that packed micro-batches under pipeline parallelism need (model/stage.py)
        overrides["moe_token_dispatcher_type"] = moe.moe_token_dispatcher_type
    if moe.expert_tensor_parallel_size is not None:
        overrides["expert_tensor_parallel_size"] = moe.expert_tensor_parallel_size
    return overrides


def keep_experts_apart(model) -> None:
    """Treat the experts as expert-parallel parameters at EP=1 too.

    Megatron-Core separates them (their own DDP buffers, their own optimizer in a
    ``ChainedOptimizer``, whose checkpoint keys are ``chained_0.`` / ``chained_1.``) only when
    EP > 1, so an EP=2 checkpoint's optimizer state would not load at EP=1 and the reverse. Marked
    here, the layout is the same at every EP. At EP=1 the expert data-parallel group is the
    data-parallel group: gradients are reduced exactly as before. Call before DDP wraps the model.
    """
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            param.allreduce = False


# Megatron's tracker names -> the metric names this trainer logs.
METRIC_NAMES = {"load_balancing_loss": "moe_aux_loss", "z_loss": "moe_z_loss"}


def router_loss_metrics(
    num_layers: int, num_microbatches: int, routed_tokens: int, counted_tokens: int | None
) -> dict[str, float]:
    """The step's router losses (without their coefficients), averaged over MoE layers,
    micro-batches and data-parallel ranks as Megatron-LM's ``track_moe_metrics`` reports them,
    and ``moe_aux_loss_scale``: routed / counted tokens of the step, the factor by which the aux
    losses' gradients weigh more than ``coeff * mean aux`` (module docstring). The tracker is then
    cleared for the next step. Collective: every rank calls it each step."""
    tracker = get_moe_layer_wise_logging_tracker()
    metrics = {}
    if counted_tokens:
        metrics["moe_aux_loss_scale"] = routed_tokens / counted_tokens
    for name in sorted(tracker):
        values = _reduced(tracker[name])
        metrics[METRIC_NAMES.get(name, f"moe_{name}")] = float(
            values.sum() / (num_layers * num_microbatches)
        )
    clear_aux_losses_tracker()
    return metrics


def _reduced(entry: dict) -> torch.Tensor:
    """Megatron-Core's ``reduce_aux_losses_tracker_across_ranks`` for one entry, with its averages
    written as sum / size (gloo has no ReduceOp.AVG). An entry Megatron leaves per rank (the
    z-loss: no reduce group) is averaged over data-parallel ranks too, so the logged value is the
    whole batch's at any layout."""
    values = entry["values"].clone()
    dist.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
    reduce_group, avg_group = entry.get("reduce_group"), entry.get("avg_group")
    if reduce_group is not None:
        dist.all_reduce(values, group=reduce_group)
    if not entry.get("reduce_group_has_dp", False):
        _average(values, parallel_state.get_data_parallel_group())
    if avg_group is not None:
        _average(values, avg_group)
    return values


def _average(values: torch.Tensor, group) -> None:
    dist.all_reduce(values, group=group)
    values /= dist.get_world_size(group)
