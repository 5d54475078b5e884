"""Process-group and Megatron parallel-state setup for torchrun launches (or a single process).

NCCL on GPUs; gloo plus :mod:`megatron_rift.cpu_compat` on CPU machines.
"""

from __future__ import annotations

import datetime
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_rift import megatron_compat
from megatron_rift.cpu_compat import enable_cpu_compat


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: float = 10.0,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: int | None = None,
    **layout,
) -> None:
    """Initialize torch.distributed (env:// as torchrun sets it) and Megatron's parallel state
    (with ``expert_model_parallel_size`` ranks sharing a layer's experts, for MoE models).

    A plain ``python`` launch works too: it becomes a world of one on a free local port.
    ``layout``: more ``initialize_model_parallel`` keywords (context_parallel_size,
    virtual_pipeline_model_parallel_size).
    """
    megatron_compat.check_supported()
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        enable_cpu_compat()
    if not dist.is_initialized():
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        _init_process_group("nccl" if on_gpu else "gloo", timeout_minutes)
    if not parallel_state.model_parallel_is_initialized():
        megatron_compat.initialize_model_parallel(
            tensor_model_parallel_size,
            pipeline_model_parallel_size,
            distributed_timeout_minutes=timeout_minutes,  # Megatron's groups get the same
            expert_model_parallel_size=expert_model_parallel_size,
            expert_tensor_parallel_size=expert_tensor_parallel_size,
            **layout,
        )
    set_seed(seed)


def ensure_process_group(timeout_minutes: float = 10.0) -> None:
    """torch.distributed alone, on gloo: no Megatron parallel state and no CPU remap (idempotent).

    For code that only reads a distributed checkpoint into CPU tensors (``dist_checkpointing.load``
    needs a process group) and may run inside another program: the demo exports each model to HF in
    its own process, which then keeps generating with ``transformers`` untouched by the remap.
    """
    if not dist.is_initialized():
        _init_process_group("gloo", timeout_minutes)


def _init_process_group(backend: str, timeout_minutes: float) -> None:
    kwargs = {}
    if "MASTER_ADDR" not in os.environ:
        # A plain `python` launch: a world of one on a free port, passed explicitly rather than
        # written into os.environ, where child processes would inherit a port that is in use.
        kwargs = dict(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    dist.init_process_group(
        backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs
    )


def set_seed(seed: int) -> None:
    """Seed python, numpy, torch and Megatron's model-parallel RNG tracker."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
