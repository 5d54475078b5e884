"""Activations saved for backward per training step under the memory flags: full and selective
recompute, and sequence parallelism, each as a ratio to the same layout without the flag.

Runs the trainer's own model and forward step (``setup_training``, ``make_forward_step`` with
RIFT) at TP=2, one micro-batch, and counts what the autograd graph saves during the forward pass
(``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters excluded): that is
what is alive at the forward/backward boundary, where activation memory peaks. Per rank, rank 0
reported. Also one timed step per row (CPU time, for the recompute cost). Sequence parallelism
needs TP > 1, which is why this is a two-process benchmark beside benchmarks/train_step.py.

    torchrun --nproc_per_node=2 benchmarks/activation_memory.py
    torchrun --nproc_per_node=2 benchmarks/activation_memory.py --num-layers 8 --seq-length 1024
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

ROWS = {
    "plain (TP=2)": ({}, {}),
    "full recompute": (
        {},
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    ),
    "selective recompute": ({}, dict(recompute_granularity="selective")),
    "sequence parallel": (dict(sequence_parallel=True), {}),
    "sequence parallel + full recompute": (
        dict(sequence_parallel=True),
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    ),
}
BASELINE = "plain (TP=2)"


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per row")
    return p.parse_args()


def build(bench, parallel: dict, memory: dict):
    """The trainer's TrainingComponents at TP=2 with these ParallelConfig / MemoryConfig fields
    (the same initial weights every call: CPU initialization, one seed)."""
    from megatron_rift.parallel import set_seed
    from megatron_rift.training.config import (
        DataConfig,
        MemoryConfig,
        ParallelConfig,
        ScheduleConfig,
        TrainConfig,
    )
    from megatron_rift.training.preflight import RunPlan
    from megatron_rift.training.setup import setup_training

    set_seed(0)
    config = TrainConfig(
        data=DataConfig(data_path="unused"),
        parallel=ParallelConfig(tensor_model_parallel_size=2, **parallel),
        schedule=ScheduleConfig(
            micro_batch_size=bench.micro_batch_size, global_batch_size=bench.micro_batch_size
        ),
        memory=MemoryConfig(**memory),
    )
    arch = dict(
        num_layers=bench.num_layers,
        hidden_size=bench.hidden_size,
        num_attention_heads=bench.num_attention_heads,
        vocab_size=bench.vocab_size,
        max_position_embeddings=bench.seq_length,
    )
    plan = RunPlan(
        2, 2, 1, 1, 1, 1e-5, 10**6, 0, 10**6, 0, {}, arch, "benchmark", "scratch", None, None
    )
    return setup_training(config, plan)


def synthetic_batch(bench):
    g = torch.Generator().manual_seed(0)
    b, s = bench.micro_batch_size, bench.seq_length
    tokens = torch.randint(0, bench.vocab_size, (b, s), generator=g)
    loss_mask = torch.zeros(b, s)
    loss_mask[:, s // 4 : -1] = 1.0
    return {
        "tokens": tokens,
        "labels": torch.roll(tokens, -1, dims=1),
        "loss_mask": loss_mask,
        "position_ids": torch.arange(s).expand(b, s).contiguous(),
        "rewards": torch.tensor([1.0 if i % 2 == 0 else -0.2 for i in range(b)]),
    }


def saved_activation_bytes(forward_step, ddp, batch) -> int:
    """Bytes of distinct non-parameter storages saved for backward in one forward."""
    params = {p.untyped_storage().data_ptr() for p in ddp.module.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output, loss_func = forward_step(iter([dict(batch)]), ddp)
        loss_sum, _, _ = loss_func(output)
    loss_sum.backward()
    ddp.zero_grad_buffer()
    return sum(storages.values())


def main():
    bench = parse()
    from megatron_rift.objectives import RIFT
    from megatron_rift.parallel import destroy_distributed, init_distributed
    from megatron_rift.training.config import ObjectiveConfig
    from megatron_rift.training.setup import setup_training  # noqa: F401  (Megatron's imports
    from megatron_rift.training.step import loss_settings, make_forward_step, train_step

    # go before the CUDA->CPU remap that init_distributed installs)
    torch.set_num_threads(1)
    init_distributed(2, 1, seed=0)
    batch = synthetic_batch(bench)
    results = {}
    for name, (parallel, memory) in ROWS.items():
        components = build(bench, parallel, memory)
        step = make_forward_step(
            RIFT, loss_settings(RIFT, ObjectiveConfig()), packed=False, use_te=components.use_te
        )
        saved = saved_activation_bytes(step, components.model[0], batch)
        times = []
        for _ in range(bench.steps + 1):  # the first step warms up
            start = time.process_time()
            train_step(
                components, iter([dict(batch)]), 1, bench.seq_length, bench.micro_batch_size, step
            )
            times.append(time.process_time() - start)
        results[name] = (saved, statistics.median(times[1:]))
    if dist.get_rank() == 0:
        report(bench, results)
    destroy_distributed()


def report(bench, results):
    base_saved, base_time = results[BASELINE]
    print(
        f"# {bench.num_layers} layers, hidden {bench.hidden_size}, heads "
        f"{bench.num_attention_heads}, vocab {bench.vocab_size}, micro-batch "
        f"{bench.micro_batch_size} x seq {bench.seq_length}; TP=2 (rank 0); rift; saved = "
        "activations saved for backward in one forward (parameters excluded); step time = median "
        f"CPU time of {bench.steps} steps"
    )
    print("| layout | saved for backward (MiB) | vs plain | step CPU time (s) | vs plain |")
    print("|---|---|---|---|---|")
    for name, (saved, step_time) in results.items():
        print(
            f"| {name} | {saved / 2**20:.2f} | {saved / base_saved:.3f} | {step_time:.3f} | "
            f"{step_time / base_time:.3f} |"
        )


if __name__ == "__main__":
    main()
