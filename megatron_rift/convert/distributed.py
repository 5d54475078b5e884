"""Parallel-state setup shared by both converters: torchrun's layout, or a world of one process."""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_rift.convert.errors import ConversionError
from megatron_rift.model.config import GPTArchitecture
from megatron_rift.parallel import init_distributed, world_size_from_env


def ensure_parallel_state(
    arch: GPTArchitecture,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    expert_parallel: int = 1,
) -> None:
    """Initialize torch.distributed and Megatron's parallel state for TP x PP, experts split over
    ``expert_parallel`` ranks (idempotent).

    Raises ConversionError when the model cannot be split that way or the launch does not fit.
    """
    world = dist.get_world_size() if dist.is_initialized() else world_size_from_env()
    try:
        arch.check_parallel(tensor_parallel, pipeline_parallel)
        arch.check_expert_parallel(expert_parallel, world, tensor_parallel, pipeline_parallel)
    except ValueError as err:
        raise ConversionError(f"cannot split the model: {err}") from err
    if world % (tensor_parallel * pipeline_parallel):
        raise ConversionError(
            f"tensor-model-parallel-size {tensor_parallel} x "
            f"pipeline-model-parallel-size {pipeline_parallel} "
            f"needs a multiple of {tensor_parallel * pipeline_parallel} processes, this launch has {world}: "
            f"run under torchrun --nproc_per_node={tensor_parallel * pipeline_parallel}"
        )
    if parallel_state.model_parallel_is_initialized():
        have = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_expert_model_parallel_world_size(),
        )
        if have != (tensor_parallel, pipeline_parallel, expert_parallel):
            raise ConversionError(
                f"this process already runs with TP={have[0]}, PP={have[1]}, EP={have[2]}; "
                f"conversion asked for TP={tensor_parallel}, PP={pipeline_parallel}, "
                f"EP={expert_parallel}"
            )
        return
    init_distributed(tensor_parallel, pipeline_parallel, expert_model_parallel_size=expert_parallel)


def is_main_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
