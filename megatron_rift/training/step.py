"""One optimizer step: ``forward_step`` in Megatron-LM's convention, the pipeline schedule, the
optimizer and scheduler updates, and the reduction of the loss report over micro-batches and
data-parallel ranks.

``forward_step(data_iterator, model)`` returns ``(output_tensor, loss_func)``; on the last pipeline
stage ``output_tensor`` is GPTModel's per-token cross-entropy [b, s] and ``loss_func`` (from
:func:`megatron_rift.losses.make_loss_func`) turns it into ``(loss_sum, num_tokens, report)``.
The schedule and DDP divide by the token count (``calculate_per_token_loss``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_rift.losses import LossSettings, make_loss_func, sequence_logprobs
from megatron_rift.model.context_parallel import split_for_context_parallel
from megatron_rift.objectives import Objective, Unit
from megatron_rift.training.config import ObjectiveConfig
from megatron_rift.training.model_chunks import chunk_iterators
from megatron_rift.training.nonfinite import nonfinite_ranks


def packed_seq_params_for_te(segment_ids: torch.Tensor) -> PackedSeqParams:
    """THD boundaries for Transformer Engine attention: rows [b, s] are read as one flattened
    sequence of b*s tokens cut wherever the segment id changes (padding runs are segments too)."""
    flat = segment_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    begin = torch.nonzero(starts).reshape(-1)
    cu = torch.cat([begin, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
    )


def loss_settings(objective: Objective, settings: ObjectiveConfig) -> LossSettings:
    """The loss hyper-parameters of a run (``--beta`` defaults to the objective's own)."""
    beta = settings.beta if settings.beta is not None else objective.default_beta
    return LossSettings(
        negative_mode=settings.negative_mode,
        beta=LossSettings.beta if beta is None else beta,
        simpo_gamma=settings.simpo_gamma,
        desirable_weight=settings.kto_desirable_weight,
        undesirable_weight=settings.kto_undesirable_weight,
    )


def _flatten_for_thd(batch: dict) -> dict:
    """Packed rows as one THD row for Transformer Engine; the loss terms are per token, so every
    per-token tensor follows."""
    flat = dict(batch)
    for key in ("tokens", "labels", "position_ids", "loss_mask", "rewards", "segment_ids"):
        flat[key] = batch[key].reshape(1, -1)
    return flat


def make_forward_step(
    objective: Objective, settings: LossSettings, packed: bool, use_te: bool, reference_model=None
):
    """The ``forward_step_func`` for Megatron's ``forward_backward_func``.

    The objective's loss reads the batch (``loss_mask``, ``rewards``, ``segment_ids``; ``roles``
    and ``ref_logprobs`` for pair / mismatched units). With ``reference_model``
    (``--reference online``) the frozen model scores the same micro-batch under ``no_grad`` and
    its log-probs replace ``ref_logprobs``.
    """
    on_gpu = torch.cuda.is_available()
    loss = objective.load_loss()
    sequences = objective.unit is not Unit.ROLLOUT
    # Statistics a loss reduces over the whole data-parallel batch (KTO's reference point).
    group = parallel_state.get_data_parallel_group()
    context_parallel = parallel_state.get_context_parallel_world_size() > 1

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        if on_gpu:
            batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
        if packed:
            batch["rewards"] = batch.pop("token_rewards")  # each token carries its sample's
        packed_seq_params = None
        if packed and use_te:
            packed_seq_params = packed_seq_params_for_te(batch["segment_ids"])
            batch = _flatten_for_thd(batch)
        if not (packed or sequences):
            batch.pop("segment_ids", None)  # one sample per row: the losses need no segments
        if context_parallel:
            batch = split_for_context_parallel(batch)
        args = (batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
        output = model(*args, labels=batch["labels"], packed_seq_params=packed_seq_params)
        if reference_model is not None:
            with torch.no_grad():
                ref_ce = reference_model(
                    *args, labels=batch["labels"], packed_seq_params=packed_seq_params
                )
                batch["ref_logprobs"] = sequence_logprobs(
                    ref_ce, batch["loss_mask"], batch["segment_ids"], batch["roles"].numel()
                )[0]
        return output, make_loss_func(loss, batch, settings, group)

    return forward_step


def reduce_reports(reports: list[dict]) -> dict[str, float]:
    """Sum the micro-batches' ``[sum, count]`` pairs, all-reduce over data-parallel ranks and
    return ``{name: sum / count}`` (``nan`` where nothing was counted). Last pipeline stage only."""
    if not reports:
        return {}
    names = sorted(reports[0])
    totals = torch.stack([sum(r[name].float() for r in reports) for name in names])  # [k, 2]
    if torch.cuda.is_available():
        totals = totals.cuda()
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    dist.all_reduce(totals, group=group)
    values = {}
    for name, (value_sum, count) in zip(names, totals.double().cpu().tolist()):
        values[name] = value_sum / count if count > 0 else float("nan")
        if name == "loss":
            values["loss_tokens"] = int(count)
    return values


def metrics_to_first_stage(values: dict) -> dict:
    """The last pipeline stage's metrics, on every rank of its pipeline group (so rank 0 logs)."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return values
    group = parallel_state.get_pipeline_model_parallel_group()
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    box = [values]
    dist.broadcast_object_list(box, src=last, group=group)
    return box[0]


def train_step(
    components,
    micro_batches,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_step,
    check_nonfinite: bool = False,
) -> dict:
    """Run one optimizer step; return the metrics of this step (on every rank).

    With ``check_nonfinite`` every rank agrees whether the loss terms or gradients hold a
    NaN/Inf before the update; such a step is not applied and ``values["nonfinite"]`` says
    where (training/nonfinite.py)."""
    model, optimizer, scheduler = components.model, components.optimizer, components.scheduler
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    lr = optimizer.param_groups[0]["lr"]
    forward_backward = get_forward_backward_func()
    reports = forward_backward(
        forward_step_func=forward_step,
        data_iterator=chunk_iterators(micro_batches, len(model)),
        model=model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    found = None
    if check_nonfinite:  # fp16's loss scaler skips overflowing gradients itself
        found = nonfinite_ranks(reports, model, check_grads=not components.config.fp16)
    if found and (found["loss"] or found["grad"]):
        update_successful, grad_norm = False, None
    else:
        update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        scheduler.step(increment=1)
    values = reduce_reports(reports) if parallel_state.is_pipeline_last_stage() else {}
    values = metrics_to_first_stage(values)
    values.update(
        lr=lr,
        grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
        skipped=not update_successful,
    )
    if found is not None:
        values["nonfinite"] = found
    return values
