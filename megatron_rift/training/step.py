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

from megatron_rift.losses import (
    DEFAULT_BETA,
    PREFERENCE_OBJECTIVES,
    PreferenceSettings,
    make_loss_func,
    make_preference_loss_func,
    sequence_logprobs,
)


def packed_seq_params_for_te(segment_ids: torch.Tensor) -> PackedSeqParams:
    """THD boundaries for Transformer Engine attention: rows [b, s] are read as one flattened
    sequence of b*s tokens cut wherever the segment id changes (padding runs are segments too)."""
    flat = segment_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    begin = torch.nonzero(starts).reshape(-1)
    cu = torch.cat([begin, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max_len, max_seqlen_kv=max_len)


def preference_settings(args) -> PreferenceSettings:
    beta = args.beta if args.beta is not None else DEFAULT_BETA.get(args.objective, 0.1)
    return PreferenceSettings(beta=beta, simpo_gamma=args.simpo_gamma,
                              desirable_weight=args.kto_desirable_weight,
                              undesirable_weight=args.kto_undesirable_weight)


def make_forward_step(objective: str, negative_mode: str, packed: bool, use_te: bool,
                      preference: PreferenceSettings | None = None, reference_model=None):
    """The ``forward_step_func`` for Megatron's ``forward_backward_func``.

    Preference objectives read ``roles`` (and ``ref_logprobs``, when precomputed) from the batch;
    with ``reference_model`` (``--reference online``) the frozen model scores the same
    micro-batch under ``no_grad`` instead.
    """
    on_gpu = torch.cuda.is_available()
    is_preference = objective in PREFERENCE_OBJECTIVES
    # KTO's reference point z is estimated over the whole data-parallel batch, not one rank's slice.
    kl_group = parallel_state.get_data_parallel_group() if objective == "kto" else None

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        if on_gpu:
            batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
        tokens, labels, loss_mask = batch["tokens"], batch["labels"], batch["loss_mask"]
        position_ids, attention_mask = batch["position_ids"], batch.get("attention_mask")
        packed_seq_params, segment_ids = None, batch["segment_ids"] if packed or is_preference else None
        if packed:
            rewards = batch["token_rewards"]
            if use_te:  # one flattened THD row; the loss terms are per token so shapes follow
                packed_seq_params = packed_seq_params_for_te(segment_ids)
                tokens, labels, position_ids = (t.reshape(1, -1) for t in
                                                (tokens, labels, position_ids))
                loss_mask, rewards, segment_ids = (t.reshape(1, -1) for t in
                                                   (loss_mask, rewards, segment_ids))
        else:
            rewards = batch["rewards"]
        output = model(tokens, position_ids, attention_mask, labels=labels,
                       packed_seq_params=packed_seq_params)
        if not is_preference:
            return output, make_loss_func(loss_mask, rewards, objective, negative_mode, segment_ids)
        roles, ref_logprobs = batch["roles"], batch.get("ref_logprobs")
        if reference_model is not None:
            with torch.no_grad():
                ref_ce = reference_model(tokens, position_ids, attention_mask, labels=labels,
                                         packed_seq_params=packed_seq_params)
                ref_logprobs = sequence_logprobs(ref_ce, loss_mask, segment_ids, roles.numel())[0]
        return output, make_preference_loss_func(loss_mask, segment_ids, roles, ref_logprobs,
                                                 objective, preference, kl_group)

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


def train_step(components, micro_batches, num_microbatches: int, seq_length: int,
               micro_batch_size: int, forward_step) -> dict:
    """Run one optimizer step; return the metrics of this step (on every rank)."""
    model, optimizer, scheduler = components.model, components.optimizer, components.scheduler
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    lr = optimizer.param_groups[0]["lr"]
    forward_backward = get_forward_backward_func()
    reports = forward_backward(
        forward_step_func=forward_step, data_iterator=micro_batches, model=model,
        num_microbatches=num_microbatches, seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=False)
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        scheduler.step(increment=1)
    values = reduce_reports(reports) if parallel_state.is_pipeline_last_stage() else {}
    values = metrics_to_first_stage(values)
    values.update(lr=lr, grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                  skipped=not update_successful)
    return values
