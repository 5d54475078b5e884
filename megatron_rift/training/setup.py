"""Build what a training step needs, all from Megatron-Core: the model for this pipeline stage wrapped
in ``DistributedDataParallel``, the Megatron optimizer (AdamW, optionally distributed) and the
``OptimizerParamScheduler``; and wire them into the model config the way Megatron-LM does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_rift.checkpoint_layout import iteration_dir_name
from megatron_rift.model import GPTArchitecture, build_gpt_model
from megatron_rift.model.stage import (
    DTYPES,
    build_frozen_model,
    place_model,
    resolve_use_te,
    stage_transformer_config,
)
from megatron_rift.training.config import OptimConfig, TrainConfig
from megatron_rift.training.layout import ddp_layout, transformer_layout
from megatron_rift.training.model_chunks import set_overlap_hooks, stage_flags, virtual_stages
from megatron_rift.training.moe import keep_experts_apart, moe_transformer_overrides
from megatron_rift.training.preflight import RunPlan


@dataclasses.dataclass
class TrainingComponents:
    model: list  # DistributedDataParallel chunks: one, or one per virtual pipeline stage
    optimizer: object  # megatron.core.optimizer.MegatronOptimizer
    scheduler: OptimizerParamScheduler
    config: object  # the TransformerConfig every layer was built from
    arch: GPTArchitecture
    use_te: bool


def run_transformer_config(config: TrainConfig, plan: RunPlan, arch: GPTArchitecture):
    precision = config.precision
    return stage_transformer_config(
        arch,
        plan.tensor_parallel,
        plan.pipeline_parallel,
        precision.dtype_name,
        loads_weights=plan.loads_weights,
        fp8_format=precision.fp8_format,
        fp8_recipe=precision.fp8_recipe,
        variable_seq_lengths=config.data.sequence_packing and plan.pipeline_parallel > 1,
        layout=transformer_layout(config, plan.layout),
        moe_overrides=moe_transformer_overrides(config.moe, arch),
    )


def build_model(config: TrainConfig, plan: RunPlan, arch: GPTArchitecture):
    """[DDP(GPTModel)] for this rank's pipeline stage (one chunk per virtual stage), its
    TransformerConfig and the layer kind."""
    use_te = resolve_use_te(config.precision.transformer_impl)
    transformer_config = run_transformer_config(config, plan, arch)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=config.optimizer.use_distributed_optimizer,
        # training/nonfinite.py checks every step on all ranks together (this check raises on
        # one rank while the others wait in the next collective)
        check_for_nan_in_grad=False,
        **ddp_layout(config),
    )
    chunks = []
    for vp_stage in virtual_stages(plan.layout):
        gpt = build_gpt_model(
            arch,
            transformer_config,
            use_te=use_te,
            cross_entropy_chunk=config.precision.cross_entropy_chunk,
            **stage_flags(vp_stage),
        )
        if arch.is_moe:
            keep_experts_apart(gpt)  # one optimizer-state layout at every EP
        model = place_model(gpt, transformer_config)
        # Megatron-LM: only the first chunk buckets its gradients (the others reduce as one).
        chunks.append(
            DistributedDataParallel(
                config=transformer_config,
                ddp_config=ddp_config,
                module=model,
                disable_bucketing=vp_stage is not None and vp_stage > 0,
            )
        )
    return chunks, transformer_config, use_te


def build_optimizer(optim: OptimConfig, dtype: str, plan: RunPlan, model: list):
    opt_config = OptimizerConfig(
        optimizer="adam",  # with decoupled_weight_decay=True (default): AdamW
        lr=plan.lr,
        # Always set: the param groups otherwise override the scheduler with None
        # (megatron-core 0.16.1 optimizer_param_scheduler.py:252).
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        params_dtype=DTYPES[dtype],
        use_distributed_optimizer=optim.use_distributed_optimizer,
        # fp8_recipe tells the distributed optimizer how parameters are stored; we keep
        # high-precision parameters (no fp8_param), so it stays None.
    )
    return get_megatron_optimizer(opt_config, model)


def build_scheduler(optim: OptimConfig, plan: RunPlan, optimizer) -> OptimizerParamScheduler:
    """Steps are optimizer iterations (increment 1 per step)."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=plan.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=plan.warmup_iters,
        lr_decay_steps=plan.decay_iters,
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=plan.train_iters,
        wd_incr_style="constant",
        # Resume takes the schedule from the checkpoint, as Megatron-LM does by default.
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )


def setup_training(config: TrainConfig, plan: RunPlan) -> TrainingComponents:
    arch = GPTArchitecture(**plan.arch_fields)
    arch.check_parallel(plan.tensor_parallel, plan.pipeline_parallel)
    model, transformer_config, use_te = build_model(config, plan, arch)
    optimizer = build_optimizer(config.optimizer, config.precision.dtype_name, plan, model)
    scheduler = build_scheduler(config.optimizer, plan, optimizer)
    # Megatron-LM's wiring: the schedule scales the loss for fp16 and finishes the gradient
    # all-reduce (and the per-token division) through these hooks.
    transformer_config.grad_scale_func = optimizer.scale_loss
    transformer_config.finalize_model_grads_func = finalize_model_grads
    set_overlap_hooks(transformer_config, model)
    return TrainingComponents(model, optimizer, scheduler, transformer_config, arch, use_te)


def reference_source(pretrained_checkpoint: str | None, plan: RunPlan) -> str:
    """The checkpoint whose weights are the online reference: the model fine-tuning started from."""
    if pretrained_checkpoint:
        return pretrained_checkpoint
    if plan.start == "finetune":
        return str(Path(plan.start_dir) / iteration_dir_name(plan.start_iteration))
    raise RuntimeError("no starting model to use as the reference (checked in the preflight)")


def build_reference_model(
    pretrained_checkpoint: str | None,
    plan: RunPlan,
    components: TrainingComponents,
    cross_entropy_chunk: int | None = None,
):
    """``--reference online``: a frozen copy of the model fine-tuning started from (with the
    policy's output layer + CE fusion, so its scoring pass holds no whole logits either)."""
    return build_frozen_model(
        components.arch,
        components.config,
        components.use_te,
        reference_source(pretrained_checkpoint, plan),
        cross_entropy_chunk=cross_entropy_chunk,
    )
