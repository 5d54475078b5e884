"""Build what a training step needs, all from Megatron-Core: the model for this pipeline stage wrapped
in ``DistributedDataParallel``, the Megatron optimizer (AdamW, optionally distributed) and the
``OptimizerParamScheduler``; and wire them into the model config the way Megatron-LM does.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from megatron_rift.model import GPTArchitecture, build_gpt_model, to_transformer_config
from megatron_rift.model.spec import transformer_engine_available
from megatron_rift.training.validation import RunPlan


@dataclasses.dataclass
class TrainingComponents:
    model: list  # one DistributedDataParallel chunk (no virtual pipeline stages)
    optimizer: object  # megatron.core.optimizer.MegatronOptimizer
    scheduler: OptimizerParamScheduler
    config: object  # the TransformerConfig every layer was built from
    arch: GPTArchitecture
    use_te: bool


def params_dtype(args: argparse.Namespace) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def resolve_use_te(args: argparse.Namespace) -> bool:
    if args.transformer_impl == "local":
        return False
    if args.transformer_impl == "transformer_engine":
        if not transformer_engine_available():
            raise RuntimeError("--transformer-impl transformer_engine: Transformer Engine or a "
                               "CUDA device is missing")
        return True
    return transformer_engine_available()


def build_transformer_config(args: argparse.Namespace, plan: RunPlan, arch: GPTArchitecture):
    overrides = dict(
        tensor_model_parallel_size=plan.tensor_parallel,
        pipeline_model_parallel_size=plan.pipeline_parallel,
        # The loss function returns (sum, count): the schedule and DDP divide by the token count
        # summed over micro-batches and data-parallel ranks (Megatron-LM pretrain_gpt convention).
        calculate_per_token_loss=True,
        sequence_parallel=False,
    )
    if args.sequence_packing and plan.pipeline_parallel > 1:
        # Packed micro-batches have a varying number of rows; p2p must exchange shapes first.
        # (TransformerConfig refuses it with the default MoE dispatcher, unused here.)
        overrides.update(variable_seq_lengths=True, moe_token_dispatcher_type="alltoall")
    if args.fp8_format is not None:
        overrides.update(fp8=args.fp8_format, fp8_recipe=args.fp8_recipe)
    return to_transformer_config(arch, params_dtype(args), **overrides)


def build_model(args: argparse.Namespace, plan: RunPlan, arch: GPTArchitecture):
    """[DDP(GPTModel)] for this rank's pipeline stage, and its TransformerConfig."""
    use_te = resolve_use_te(args)
    config = build_transformer_config(args, plan, arch)
    model = build_gpt_model(arch, config, use_te=use_te)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if config.fp16 or config.bf16:
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=args.use_distributed_optimizer,
        check_for_nan_in_grad=True,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    return [ddp], config, use_te


def build_optimizer(args: argparse.Namespace, plan: RunPlan, model: list):
    opt_config = OptimizerConfig(
        optimizer="adam",  # with decoupled_weight_decay=True (default): AdamW
        lr=plan.lr,
        # Always set: the param groups otherwise override the scheduler with None
        # (megatron-core 0.16.1 optimizer_param_scheduler.py:252).
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        fp16=args.fp16,
        params_dtype=params_dtype(args),
        use_distributed_optimizer=args.use_distributed_optimizer,
        # fp8_recipe tells the distributed optimizer how parameters are stored; we keep
        # high-precision parameters (no fp8_param), so it stays None.
    )
    return get_megatron_optimizer(opt_config, model)


def build_scheduler(args: argparse.Namespace, plan: RunPlan, optimizer) -> OptimizerParamScheduler:
    """Steps are optimizer iterations (increment 1 per step)."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=plan.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=plan.warmup_iters,
        lr_decay_steps=plan.decay_iters,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=plan.train_iters,
        wd_incr_style="constant",
        # Resume takes the schedule from the checkpoint, as Megatron-LM does by default.
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )


def setup_training(args: argparse.Namespace, plan: RunPlan) -> TrainingComponents:
    arch = GPTArchitecture(**plan.arch_fields)
    arch.check_parallel(plan.tensor_parallel, plan.pipeline_parallel)
    model, config, use_te = build_model(args, plan, arch)
    optimizer = build_optimizer(args, plan, model)
    scheduler = build_scheduler(args, plan, optimizer)
    # Megatron-LM's wiring: the schedule scales the loss for fp16 and finishes the gradient
    # all-reduce (and the per-token division) through these hooks.
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    return TrainingComponents(model, optimizer, scheduler, config, arch, use_te)


def reference_source(args: argparse.Namespace, plan: RunPlan) -> str:
    """The checkpoint whose weights are the online reference: the model fine-tuning started from."""
    from pathlib import Path

    if args.pretrained_checkpoint:
        return args.pretrained_checkpoint
    if plan.start == "finetune":
        root = Path(plan.start_dir)
        return str(root if plan.start_iteration == "release" else
                   root / f"iter_{int(plan.start_iteration):07d}")
    raise RuntimeError("no starting model to use as the reference (checked in validation)")


def build_frozen_model(arch: GPTArchitecture, config, use_te: bool, checkpoint: str | None = None,
                       state_dict: dict | None = None):
    """A model for scoring only: the trainer's layers and parallel layout, eval mode, no gradients,
    no DDP, no optimizer. Weights from ``checkpoint`` (root or iteration folder) or ``state_dict``."""
    from megatron_rift.checkpointing import load_model_weights

    model = build_gpt_model(arch, config, use_te=use_te)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if config.fp16 or config.bf16:
        model = Float16Module(config, model)
    if checkpoint is not None:
        load_model_weights(checkpoint, model)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.eval()
    model.requires_grad_(False)
    return model


def build_reference_model(args: argparse.Namespace, plan: RunPlan, components: TrainingComponents):
    """``--reference online``: a frozen copy of the model fine-tuning started from."""
    return build_frozen_model(components.arch, components.config, components.use_te,
                              reference_source(args, plan))
