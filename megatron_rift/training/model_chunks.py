"""Model chunks (virtual pipeline stages) and the communication-overlap hooks, wired as Megatron-LM's
``training.py`` wires them, so Megatron-Core's schedules and DDP do the work.

* Virtual stages: each pipeline rank holds ``virtual_pipeline`` chunks of layers; chunk ``i`` is
  the first / last stage only where Megatron's parallel state says so, and the interleaved 1F1B
  schedule wants one data iterator per chunk, each yielding the step's micro-batches.
* Overlap: with ``--overlap-grad-reduce`` the schedule suspends DDP's gradient sync between
  micro-batches and starts each bucket's reduce as its gradients are ready; with
  ``--overlap-param-gather`` the distributed optimizer's all-gather of updated parameters runs in
  the next forward (DDP's pre-hooks), so the weights are stale until then: :func:`synced_parameters`
  completes the gather before anything reads them (a checkpoint save).
"""

from __future__ import annotations

import contextlib

from megatron.core import parallel_state

from megatron_rift.training.layout import Layout


def virtual_stages(layout: Layout) -> list[int | None]:
    """The ``vp_stage`` of each model chunk on this rank ([None] without virtual stages)."""
    if layout.virtual_pipeline is None:
        return [None]
    return list(range(layout.virtual_pipeline))


def stage_flags(vp_stage: int | None) -> dict:
    """``build_gpt_model`` keywords for one chunk: whether it embeds, whether it ends in the loss."""
    if vp_stage is None:
        return {}
    return dict(
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        vp_stage=vp_stage,
    )


def _per_chunk(functions: list):
    return functions[0] if len(functions) == 1 else functions


def set_overlap_hooks(transformer_config, model: list) -> None:
    """The schedule's hooks for gradient-reduce overlap (Megatron-LM's ``align_grad_reduce``)."""
    ddp_config = model[0].ddp_config
    if ddp_config.overlap_grad_reduce:
        transformer_config.no_sync_func = _per_chunk([chunk.no_sync for chunk in model])
        transformer_config.grad_sync_func = _per_chunk([chunk.start_grad_sync for chunk in model])


@contextlib.contextmanager
def synced_parameters(model: list):
    """Inside, every chunk's parameters are the optimizer's latest (the overlapped all-gather
    is completed first); the forward pre-hooks are back afterwards."""
    overlapped = model[0].ddp_config.overlap_param_gather
    if overlapped:
        for chunk in model:
            chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        if overlapped:
            for chunk in model:
                chunk.enable_forward_pre_hook()


def chunk_iterators(micro_batches, num_chunks: int):
    """The schedule's ``data_iterator``: the iterator itself for one chunk; for several, one
    iterator per chunk over the same micro-batches (each chunk's forward step reads them all)."""
    if num_chunks == 1:
        return micro_batches
    batches = list(micro_batches)
    # A shallow copy per chunk: the forward step renames keys of the dict it reads.
    return [iter([dict(batch) for batch in batches]) for _ in range(num_chunks)]
