"""Trainer step throughput and memory per objective, on one tiny model in one process.

Every objective runs the trainer's own step (``megatron_rift.training.step.train_step``: Megatron's
forward-backward schedule, DDP, the Megatron optimizer) on the same model and the same synthetic
micro-batches. Objectives are interleaved one step at a time, in a rotated order each round, so
machine load hits all of them alike. Reported: median tokens/s (wall clock), and the median over
rounds of the step-time ratio to sft in the same round (robust to load that drifts during the run);
on CPU that ratio uses the process's CPU time, which other processes' load barely disturbs.

Memory:

* GPU: ``torch.cuda.max_memory_allocated`` over the objective's steps (the real peak).
* CPU: peak RSS cannot separate objectives (the allocator keeps freed pages, and the loss path is
  a few [b, s] tensors next to the [b, s, vocab] logits). Instead we count what the autograd graph
  saves for backward during the forward pass, with ``torch.autograd.graph.saved_tensors_hooks``
  (each storage once). Saved activations are what is alive at the forward/backward boundary, where
  training memory peaks; ``loss path`` is the part saved inside the objective's loss function.

    .venv/bin/python benchmarks/train_step.py                      # defaults below
    .venv/bin/python benchmarks/train_step.py --vocab-size 32000 --seq-length 512 --rounds 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

OBJECTIVES = ("sft", "dft", "rft", "rift", "naive")


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=30,
                   help="rounds of one step per objective (interleaved)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: CPU time measures the work itself)")
    p.add_argument("--json", action="store_true", help="print the table as JSON too")
    return p.parse_args()


def build(bench):
    from megatron_rift.parallel import init_distributed
    from megatron_rift.training.arguments import parse_args
    from megatron_rift.training.setup import setup_training
    from megatron_rift.training.validation import RunPlan

    init_distributed(1, 1, seed=0)
    flags = ["--data-path", "unused", "--num-layers", str(bench.num_layers),
             "--hidden-size", str(bench.hidden_size),
             "--num-attention-heads", str(bench.num_attention_heads),
             "--micro-batch-size", str(bench.micro_batch_size),
             "--global-batch-size", str(bench.micro_batch_size)]
    args = parse_args(flags)
    arch = dict(num_layers=bench.num_layers, hidden_size=bench.hidden_size,
                num_attention_heads=bench.num_attention_heads, vocab_size=bench.vocab_size,
                max_position_embeddings=bench.seq_length)
    plan = RunPlan(1, 1, 1, 1, 1, 1e-5, 10**6, 0, 10**6, 0, {}, arch, "benchmark", "scratch",
                   None, None)
    return args, setup_training(args, plan)


def synthetic_batch(bench, device):
    """One micro-batch: prompt of 1/4 of the row, response the rest; half the rows rewarded +1,
    half -0.2 (the paper's constant scheme)."""
    g = torch.Generator().manual_seed(0)
    b, s = bench.micro_batch_size, bench.seq_length
    tokens = torch.randint(0, bench.vocab_size, (b, s), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    loss_mask = torch.zeros(b, s)
    loss_mask[:, s // 4:-1] = 1.0
    rewards = torch.tensor([1.0 if i % 2 == 0 else -0.2 for i in range(b)])
    batch = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
             "position_ids": torch.arange(s).expand(b, s).contiguous(), "rewards": rewards}
    return {k: v.to(device) for k, v in batch.items()}


class SavedTensorMeter:
    """Bytes of distinct storages saved for backward while active."""

    def __init__(self):
        self.storages = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def bytes(self):
        return sum(self.storages.values())


def measure_saved_bytes(forward_step, model, batch):
    """(model + loss, loss only) bytes saved for backward in one forward."""
    total, loss_only = SavedTensorMeter(), SavedTensorMeter()
    with torch.autograd.graph.saved_tensors_hooks(total.pack, lambda t: t):
        output, loss_func = forward_step(iter([batch]), model)
        with torch.autograd.graph.saved_tensors_hooks(loss_only.pack, lambda t: t):
            loss_sum, _, _ = loss_func(output)
    total.storages.update(loss_only.storages)
    loss_sum.backward()
    model.zero_grad_buffer()
    return total.bytes, loss_only.bytes


def main():
    bench = parse()
    from megatron_rift.cpu_compat import cpu_compat_active
    from megatron_rift.training.step import make_forward_step, train_step

    torch.set_num_threads(bench.threads)
    args, components = build(bench)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    batch = synthetic_batch(bench, device)
    tokens_per_step = bench.micro_batch_size * bench.seq_length
    steps = {name: make_forward_step(name, "token", packed=False, use_te=components.use_te)
             for name in OBJECTIVES}
    times = {name: [] for name in OBJECTIVES}
    cpu_times = {name: [] for name in OBJECTIVES}
    peak = {name: 0 for name in OBJECTIVES}
    for name in OBJECTIVES:  # warm-up (allocator, kernels) outside the measurement
        train_step(components, iter([batch]), 1, bench.seq_length, bench.micro_batch_size,
                   steps[name])
    # One step per objective per round, in a rotated order: neighbouring steps share the machine's
    # load, so the per-round ratios to sft are robust even when the load drifts.
    for round_index in range(bench.rounds):
        shift = round_index % len(OBJECTIVES)
        for name in OBJECTIVES[shift:] + OBJECTIVES[:shift]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            train_step(components, iter([batch]), 1, bench.seq_length, bench.micro_batch_size,
                       steps[name])
            if device.type == "cuda":
                torch.cuda.synchronize()
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated())
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    saved = {name: measure_saved_bytes(steps[name], components.model[0], batch)
             for name in OBJECTIVES}
    # On a GPU the wall clock is the measure; on a (shared) CPU the process's own CPU time is far
    # less disturbed by other processes' load, so ratios use it there.
    ratio_times = times if device.type == "cuda" else cpu_times
    report(bench, times, ratio_times, peak, saved, tokens_per_step, device, cpu_compat_active())


def report(bench, times, ratio_times, peak, saved, tokens_per_step, device, compat):
    rows = []
    for name in OBJECTIVES:
        tps = tokens_per_step / statistics.median(times[name])
        # Median over rounds of (sft step time / this objective's step time in the same round).
        ratio = statistics.median(s / t for s, t in zip(ratio_times["sft"], ratio_times[name]))
        row = {"objective": name, "tokens_per_s": tps, "tokens_per_s_vs_sft": ratio,
               "saved_for_backward_mib": saved[name][0] / 2**20,
               "saved_vs_sft": saved[name][0] / saved["sft"][0],
               "loss_path_saved_kib": saved[name][1] / 2**10, "steps_timed": len(times[name])}
        if device.type == "cuda":
            row.update(peak_mib=peak[name] / 2**20, peak_vs_sft=peak[name] / peak["sft"])
        rows.append(row)
    print(f"# {bench.num_layers} layers, hidden {bench.hidden_size}, vocab {bench.vocab_size}, "
          f"micro-batch {bench.micro_batch_size} x seq {bench.seq_length}; {bench.rounds} "
          f"interleaved steps per objective; device {device}"
          + ("" if device.type == "cuda" else f", {bench.threads} thread(s); 'vs sft' from "
             "per-round CPU-time ratios")
          + (" (CUDA->CPU remap active)" if compat else ""))
    head = "| objective | tokens/s | vs sft | saved for backward (MiB) | vs sft | loss path (KiB) |"
    if device.type == "cuda":
        head += " peak (MiB) | vs sft |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        line = (f"| {r['objective']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s_vs_sft']:.3f} | "
                f"{r['saved_for_backward_mib']:.2f} | {r['saved_vs_sft']:.4f} | "
                f"{r['loss_path_saved_kib']:.1f} |")
        if device.type == "cuda":
            line += f" {r['peak_mib']:.1f} | {r['peak_vs_sft']:.4f} |"
        print(line)
    if bench.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
