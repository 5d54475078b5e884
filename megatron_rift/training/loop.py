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

from megatron_rift.model import GPTArchitecture
from megatron_rift.parallel import destroy_distributed, init_distributed
from megatron_rift.training.checkpoint_state import (
    check_vocab_padding,
    load_start_state,
    maybe_kill_for_test,
    run_flags_record,
    save_training_checkpoint,
)
from megatron_rift.data.dataset import RewardDataset
from megatron_rift.training.data import TrainingData, preference_units, resolve_seq_length
from megatron_rift.training.logging import MetricsLogger
from megatron_rift.training.setup import build_reference_model, resolve_use_te, setup_training
from megatron_rift.training.step import make_forward_step, preference_settings, train_step
from megatron_rift.training.validation import RunPlan


def _should_save(args, iteration: int, train_iters: int) -> bool:
    if not args.save:
        return False
    return iteration == train_iters or bool(args.save_interval and iteration % args.save_interval == 0)


def run_training(args, plan: RunPlan) -> dict:
    """Train per ``args``/``plan`` (a process group per torchrun's environment). Returns the last
    step's record on rank 0 (an empty dict elsewhere, or when nothing was left to train)."""
    # Still before any process group (every rank alike): a rollout longer than --seq-length, or a
    # checkpoint this TP cannot load, ends the run with a message instead of a hang.
    seq_length = resolve_seq_length(args)
    dataset = RewardDataset(args.data_path)
    units = preference_units(args, dataset)  # pairs layout, reference log-probs: checked once
    check_vocab_padding(plan, GPTArchitecture(**plan.arch_fields))
    init_distributed(plan.tensor_parallel, plan.pipeline_parallel, args.seed)
    try:
        return _train(args, plan, seq_length, dataset, units)
    finally:
        destroy_num_microbatches_calculator()
        destroy_distributed()


def _train(args, plan: RunPlan, seq_length: int, dataset, units) -> dict:
    rank = dist.get_rank()
    init_num_microbatches_calculator(rank, None, args.global_batch_size, args.micro_batch_size,
                                     parallel_state.get_data_parallel_world_size())
    data = TrainingData(args, seq_length, parallel_state.get_data_parallel_rank(),
                        parallel_state.get_data_parallel_world_size(), resolve_use_te(args),
                        dataset=dataset, units=units)
    components = setup_training(args, plan)
    is_logger = rank == 0
    log = (lambda msg: print(msg, flush=True)) if is_logger else (lambda msg: None)
    log(f"megatron-rift train: objective {args.objective}, {plan.train_iters} steps of "
        f"{args.global_batch_size} {'rollouts' if data.units is None else 'units'}, lr {plan.lr:g} ({args.lr_decay_style}, "
        f"{plan.warmup_iters} warmup), TP={plan.tensor_parallel} PP={plan.pipeline_parallel} "
        f"DP={plan.data_parallel}, seq {data.seq_length}, model from {plan.arch_source}, "
        f"{'Transformer Engine' if components.use_te else 'local'} layers")
    start_iteration = load_start_state(args, plan, components, data, log)
    run_flags = run_flags_record(args)
    logger = MetricsLogger(args, plan.train_iters, start_iteration, enabled=is_logger,
                           run_config=run_flags)
    reference_model = None
    if data.units is not None and args.objective != "simpo" and args.reference == "online":
        reference_model = build_reference_model(args, plan, components)
        log("reference: a frozen copy of the starting model, scored online")
    forward_step = make_forward_step(args.objective, args.negative_mode, args.sequence_packing,
                                     components.use_te, preference_settings(args), reference_model)
    model_source = plan.start_dir
    record: dict = {}
    if start_iteration >= plan.train_iters:
        log(f"nothing left to train: the checkpoint is at step {start_iteration} of "
            f"{plan.train_iters}")
    try:
        for iteration in range(start_iteration + 1, plan.train_iters + 1):
            started = time.perf_counter()
            epoch, _ = data.position()
            micro_batches, global_tokens = data.next_step()
            values = train_step(components, micro_batches, get_num_microbatches(),
                                data.seq_length, data.rows_per_micro_batch, forward_step)
            elapsed = time.perf_counter() - started
            record = {"step": iteration, **values, "tokens": global_tokens,
                      "tokens_per_s": global_tokens / elapsed, "step_time_s": elapsed,
                      "epoch": epoch, "samples": iteration * args.global_batch_size}
            logger.log_step(record)
            maybe_kill_for_test("step", iteration)
            if _should_save(args, iteration, plan.train_iters):
                folder = save_training_checkpoint(args, components, data, iteration, run_flags,
                                                  model_source)
                log(f"saved checkpoint {folder}")
    finally:
        logger.close()
    return record if is_logger else {}
