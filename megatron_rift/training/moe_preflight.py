"""The mixture-of-experts part of the preflight (torch-free): MoE flags against the model's expert
layout, the expert-parallel sizes against the world size, and what runs where.

Called by :func:`megatron_rift.training.preflight.preflight` on every rank before any process group.
"""

from __future__ import annotations

import importlib.util

from megatron_rift.model_source import expert_parallel_problems, fail
from megatron_rift.training.config import TrainConfig


def check_moe(config: TrainConfig, fields: dict, world_size: int, tp: int, pp: int) -> dict:
    """``fields`` (GPTArchitecture's) with the run's MoE choices applied (``--moe-router-topk``);
    ConfigError on the first problem."""
    moe, experts = config.moe, fields.get("num_moe_experts")
    if experts is None:
        if moe.given():
            fail(
                f"{', '.join(moe.given())}: mixture-of-experts flags, but the model is dense "
                "(its model_config.json has no num_moe_experts); drop them, or start from a "
                "converted MoE model (Qwen3-MoE, Mixtral)"
            )
        return fields
    problems = expert_parallel_problems(
        experts, moe.expert_model_parallel_size, world_size, tp, pp, moe.expert_tensor_parallel_size
    )
    if problems:
        fail("cannot split the experts: " + "; ".join(problems))
    if tp > 1 and not config.parallel.sequence_parallel:
        # Megatron-Core's MoELayer refuses to train at TP > 1 without sequence parallelism.
        fail(
            f"--tensor-model-parallel-size {tp} with a mixture-of-experts model: Megatron-Core "
            "trains MoE layers under tensor parallelism only with sequence parallelism; add "
            "--sequence-parallel, or use TP=1 and split the experts with "
            "--expert-model-parallel-size"
        )
    topk = fields.get("moe_router_topk", 2) if moe.moe_router_topk is None else moe.moe_router_topk
    if not 1 <= topk <= experts:
        fail(f"--moe-router-topk {topk} must be between 1 and the model's {experts} experts")
    for name in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
        value = getattr(moe, name)
        if value is not None and not value >= 0:
            fail(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if moe.moe_grouped_gemm:
        if importlib.util.find_spec("transformer_engine") is None or not _cuda_available():
            fail(
                "--moe-grouped-gemm runs the experts in Transformer Engine's grouped GEMM "
                "(TEGroupedMLP), which needs Transformer Engine and a GPU; drop it here (the "
                "experts then run one after another, SequentialMLP, same checkpoint layout)"
            )
        if config.precision.transformer_impl == "local":
            fail(
                "--moe-grouped-gemm needs Transformer Engine layers; drop --transformer-impl local"
            )
    if moe.moe_token_dispatcher_type == "allgather" and config.data.sequence_packing and pp > 1:
        fail(
            "--sequence-packing with pipeline parallelism sends variable-length micro-batches, "
            "which Megatron-Core's allgather token dispatcher refuses: use "
            "--moe-token-dispatcher-type alltoall"
        )
    return {**fields, "moe_router_topk": topk}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
