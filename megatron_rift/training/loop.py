"""The training loop: initialize, build, load, then step / log / save until ``train_iters``."""

from __future__ import annotations

import time

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import (
    destroy_num_microbatches_calculator,
    get_num_microbatches,
    init_num_microbatches_calculator,
)

from megatron_rift.data.dataset import RewardDataset
from megatron_rift.model import GPTArchitecture
from megatron_rift.model.stage import resolve_use_te
from megatron_rift.objectives import get_objective
from megatron_rift.parallel import destroy_distributed, init_distributed
from megatron_rift.training.checkpoint_state import (
    check_vocab_padding,
    check_weights_match_config,
    load_start_state,
    save_training_checkpoint,
)
from megatron_rift.training.config import TrainConfig
from megatron_rift.training.data import TrainingData, open_units, resolve_seq_length
from megatron_rift.training.faults import FAULTS, last_checkpoint
from megatron_rift.training.layout import (
    check_sequence_split,
    layout_note,
    parallel_state_layout,
)
from megatron_rift.training.logging import MetricsLogger
from megatron_rift.training.lost_rank import is_collective_failure, lost_rank_error
from megatron_rift.training.moe import router_loss_metrics
from megatron_rift.training.nonfinite import NonFiniteGuard
from megatron_rift.training.preflight import RunPlan
from megatron_rift.training.setup import build_reference_model, setup_training
from megatron_rift.training.step import loss_settings, make_forward_step, train_step


def _should_save(config: TrainConfig, iteration: int, train_iters: int) -> bool:
    ckpt = config.checkpoint
    if not ckpt.save:
        return False
    return iteration == train_iters or bool(
        ckpt.save_interval and iteration % ckpt.save_interval == 0
    )


def _fusion_note(config: TrainConfig) -> str:
    chunk = config.precision.cross_entropy_chunk
    return "" if chunk is None else f", output layer + CE fused ({chunk}-token chunks)"


def run_training(config: TrainConfig, plan: RunPlan) -> dict:
    """Train per ``config``/``plan`` (a process group per torchrun's environment). Returns the last
    step's record on rank 0 (an empty dict elsewhere, or when nothing was left to train)."""
    # Still before any process group (every rank alike): a rollout longer than --seq-length, or a
    # checkpoint this TP cannot load, ends the run with a message instead of a hang.
    dataset = RewardDataset(config.data.data_path)  # opened once, shared by every check
    seq_length = resolve_seq_length(config.data, dataset)
    objective = get_objective(config.objective.name)
    units = open_units(objective, config.objective, dataset)  # pairs, reference log-probs
    check_vocab_padding(plan, GPTArchitecture(**plan.arch_fields))
    check_sequence_split(seq_length, config.parallel, "the sequence length")
    check_weights_match_config(plan, GPTArchitecture(**plan.arch_fields), plan.arch_source)
    init_distributed(
        plan.tensor_parallel,
        plan.pipeline_parallel,
        config.schedule.seed,
        **parallel_state_layout(plan.layout),
        timeout_minutes=config.reliability.distributed_timeout_minutes,
        expert_model_parallel_size=config.moe.expert_model_parallel_size,
        expert_tensor_parallel_size=config.moe.expert_tensor_parallel_size,
    )
    try:
        return _train(config, plan, seq_length, dataset, units)
    finally:
        destroy_num_microbatches_calculator()
        destroy_distributed()


def _train(config: TrainConfig, plan: RunPlan, seq_length: int, dataset, units) -> dict:
    rank = dist.get_rank()
    schedule = config.schedule
    objective = get_objective(config.objective.name)
    init_num_microbatches_calculator(
        rank,
        None,
        schedule.global_batch_size,
        schedule.micro_batch_size,
        parallel_state.get_data_parallel_world_size(),
    )
    data = TrainingData(
        dataset,
        units,
        config.data,
        schedule,
        seq_length,
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
        resolve_use_te(config.precision.transformer_impl),
    )
    components = setup_training(config, plan)
    is_logger = rank == 0
    log = (lambda msg: print(msg, flush=True)) if is_logger else (lambda msg: None)
    unit = "rollouts" if units is None else "units"
    log(
        f"megatron-rift train: objective {objective.name}, {plan.train_iters} steps of "
        f"{schedule.global_batch_size} {unit}, lr {plan.lr:g} "
        f"({config.optimizer.lr_decay_style}, {plan.warmup_iters} warmup), "
        f"TP={plan.tensor_parallel} PP={plan.pipeline_parallel} DP={plan.data_parallel}, "
        f"seq {data.seq_length}, model from {plan.arch_source}, "
        f"{'Transformer Engine' if components.use_te else 'local'} layers"
        + _fusion_note(config)
        + layout_note(config, plan.layout)
    )
    start_iteration = load_start_state(config.checkpoint, plan, components, data, log)
    run_config = config.to_dict()
    logger = MetricsLogger(
        config.logging, plan.train_iters, start_iteration, enabled=is_logger, run_config=run_config
    )
    reference_model = None
    if objective.reference and config.objective.reference == "online":
        reference_model = build_reference_model(
            config.checkpoint.pretrained_checkpoint,
            plan,
            components,
            config.precision.cross_entropy_chunk,
        )
        log("reference: a frozen copy of the starting model, scored online")
    forward_step = make_forward_step(
        objective,
        loss_settings(objective, config.objective),
        config.data.sequence_packing,
        components.use_te,
        reference_model,
    )
    record: dict = {}
    if start_iteration >= plan.train_iters:
        log(
            f"nothing left to train: the checkpoint is at step {start_iteration} of "
            f"{plan.train_iters}"
        )
    reliability = config.reliability
    guard = NonFiniteGuard(reliability.skip_nan_steps, lambda: last_checkpoint(config), log)
    iteration = start_iteration
    try:
        for iteration in range(start_iteration + 1, plan.train_iters + 1):
            started = time.perf_counter()
            epoch, _ = data.position()
            micro_batches, global_tokens = data.next_step()
            values = train_step(
                components,
                micro_batches,
                get_num_microbatches(),
                data.seq_length,
                data.rows_per_micro_batch,
                forward_step,
                check_nonfinite=reliability.check_for_nan_in_loss_and_grad,
            )
            nonfinite = values.pop("nonfinite", None)
            if components.arch.is_moe:  # Megatron's router losses of this step, logged
                routed = get_num_microbatches() * data.rows_per_micro_batch * data.seq_length
                values.update(
                    router_loss_metrics(
                        components.arch.num_layers,
                        get_num_microbatches(),
                        routed * plan.data_parallel,
                        values.get("loss_tokens"),
                    )
                )
            elapsed = time.perf_counter() - started
            record = {
                "step": iteration,
                **values,
                "tokens": global_tokens,
                "tokens_per_s": global_tokens / elapsed,
                "step_time_s": elapsed,
                "epoch": epoch,
                "samples": iteration * schedule.global_batch_size,
            }
            logger.log_step(record)
            guard.check(iteration, nonfinite)  # raises when a NaN/Inf step ends the run
            if _should_save(config, iteration, plan.train_iters):
                folder = save_training_checkpoint(
                    config.checkpoint,
                    config.data.data_path,
                    components,
                    data,
                    iteration,
                    run_config,
                    plan.start_dir,
                )
                log(f"saved checkpoint {folder}")
    except RuntimeError as error:
        if isinstance(error, FAULTS) or not is_collective_failure(error):
            raise
        raise lost_rank_error(error, reliability.distributed_timeout_minutes, iteration) from error
    finally:
        logger.close()
    return record if is_logger else {}
