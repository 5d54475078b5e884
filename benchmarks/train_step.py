"""Trainer step throughput and memory per objective, on one tiny model in one process.

The objectives are the registry's (``megatron_rift.objectives``): one row per token objective, one
per preference objective, and for DPO a second row with the online reference. Every objective
runs the trainer's own step (``megatron_rift.training.step.train_step``: Megatron's
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
  Saved activations miss what lives all run long, so the CPU peak figure is ``saved activations +
  model state``, where model state = the bytes of the policy's parameters, gradient buffers and
  optimizer state, plus the frozen reference model's parameters for ``dpo (online)``. That row
  also adds the transient peak of the reference's ``no_grad`` forward (it runs while the policy's
  saved activations are alive; measured once with a dispatch mode that tracks live storages).

``rift (fused CE)`` is RIFT on a second model built with ``--cross-entropy-loss-fusion`` (the
same initial weights): the output layer and the CE in chunks of tokens, so the forward saves no
``[tokens, vocab]`` softmax for backward (megatron_rift/model/linear_cross_entropy.py;
benchmarks/output_layer.py measures that layer alone at Qwen2.5-1.5B's shape).

Preference rows (``dpo (precomputed)``, ``dpo (online)``, ``kto``, ``simpo``) run the trainer's
preference path (``make_forward_step`` with the objective's ``LossSettings``, its default beta)
on the very same rows as sft:
a micro-batch of b rows is b/2 (chosen, rejected) pairs for dpo/simpo and b/2 (sample, mismatched
KL sample) units for kto, so every row processes the same sequences and tokens per step.
``dpo (precomputed)`` and ``kto`` read ``ref_logprobs`` from the batch (scored once, before the
run, by the frozen reference, as ``tools/compute_ref_logprobs.py`` would); ``dpo (online)`` scores
each micro-batch with the frozen reference model (a copy of the initial policy) under ``no_grad``.
On GPU the reference's parameters live all run long, so they are subtracted from the other rows'
``max_memory_allocated`` (a run without ``--reference online`` would not hold them).

    .venv/bin/python benchmarks/train_step.py                      # defaults below
    .venv/bin/python benchmarks/train_step.py --vocab-size 32000 --seq-length 512 --rounds 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import weakref

import torch

from megatron_rift.objectives import DPO, RIFT, SFT, Objective, Unit, get_objective, objectives

BASELINE = SFT.name  # the "vs sft" columns
OBJECTIVES = tuple(o.name for o in objectives() if o.unit is Unit.ROLLOUT)
# RIFT once more on a second, identical model built with --cross-entropy-loss-fusion.
FUSED_ROW = f"{RIFT.name} (fused CE)"
# The preference objective that also gets a row with the online reference (--reference online).
ONLINE_OBJECTIVE = DPO


def _preference_rows() -> dict[str, tuple[Objective, bool]]:
    """Row name -> (preference objective, scored by the online reference model)."""
    rows = {}
    for objective in objectives():
        if objective.unit is Unit.ROLLOUT:
            continue
        if objective is ONLINE_OBJECTIVE:
            rows[f"{objective.name} (precomputed)"] = (objective, False)
            rows[f"{objective.name} (online)"] = (objective, True)
        else:
            rows[objective.name] = (objective, False)
    return rows


PREFERENCE_ROWS = _preference_rows()
ROWS = (*OBJECTIVES, FUSED_ROW, *PREFERENCE_ROWS)
# Issue target: <= 1.05x sft peak memory.
TARGET_ROW, TARGET_RATIO = f"{ONLINE_OBJECTIVE.name} (precomputed)", 1.05


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument(
        "--rounds", type=int, default=30, help="rounds of one step per objective (interleaved)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: CPU time measures the work itself)",
    )
    p.add_argument("--json", action="store_true", help="print the table as JSON too")
    return p.parse_args()


def build(bench, fused: bool = False):
    """(the run's TrainConfig, the trainer's TrainingComponents) for a from-scratch model (the same
    initial weights every call); ``fused``: with ``--cross-entropy-loss-fusion``."""
    from megatron_rift.parallel import init_distributed
    from megatron_rift.training.config import (
        DataConfig,
        PrecisionConfig,
        ScheduleConfig,
        TrainConfig,
    )
    from megatron_rift.training.preflight import RunPlan
    from megatron_rift.training.setup import setup_training

    init_distributed(1, 1, seed=0)
    config = TrainConfig(
        data=DataConfig(data_path="unused"),
        schedule=ScheduleConfig(
            micro_batch_size=bench.micro_batch_size, global_batch_size=bench.micro_batch_size
        ),
        precision=PrecisionConfig(cross_entropy_loss_fusion=fused),
    )
    arch = dict(
        num_layers=bench.num_layers,
        hidden_size=bench.hidden_size,
        num_attention_heads=bench.num_attention_heads,
        vocab_size=bench.vocab_size,
        max_position_embeddings=bench.seq_length,
    )
    plan = RunPlan(
        1, 1, 1, 1, 1, 1e-5, 10**6, 0, 10**6, 0, {}, arch, "benchmark", "scratch", None, None
    )
    return config, setup_training(config, plan)


def synthetic_batch(bench, device):
    """One micro-batch: prompt of 1/4 of the row, response the rest; half the rows rewarded +1,
    half -0.2 (the paper's constant scheme)."""
    g = torch.Generator().manual_seed(0)
    b, s = bench.micro_batch_size, bench.seq_length
    tokens = torch.randint(0, bench.vocab_size, (b, s), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    loss_mask = torch.zeros(b, s)
    loss_mask[:, s // 4 : -1] = 1.0
    rewards = torch.tensor([1.0 if i % 2 == 0 else -0.2 for i in range(b)])
    batch = {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": torch.arange(s).expand(b, s).contiguous(),
        "rewards": rewards,
    }
    return {k: v.to(device) for k, v in batch.items()}


def preference_batch(batch, objective: Objective, ref_logprobs=None):
    """The same rows as ``batch`` as a preference micro-batch (one sample per row, as
    ``collate_rollouts`` lays out unpacked rows): pair units (dpo, simpo) alternate CHOSEN,
    REJECTED (b/2 pairs); mismatched units (kto) alternate a desirable or undesirable sample with
    its KL_SAMPLE (b/2 units)."""
    from megatron_rift.roles import CHOSEN, KL_SAMPLE, REJECTED

    b, s = batch["tokens"].shape
    if b % 2:
        raise SystemExit("--micro-batch-size must be even (preference rows hold pairs)")
    if objective.unit is Unit.MISMATCHED:
        roles = [
            role
            for unit in range(b // 2)
            for role in ((CHOSEN if unit % 2 == 0 else REJECTED), KL_SAMPLE)
        ]
    else:
        roles = [CHOSEN, REJECTED] * (b // 2)
    device = batch["tokens"].device
    out = dict(batch)
    out["segment_ids"] = torch.arange(b, device=device).unsqueeze(-1).expand(b, s).contiguous()
    out["roles"] = torch.tensor(roles, dtype=torch.int64, device=device)
    if ref_logprobs is not None:
        out["ref_logprobs"] = ref_logprobs.to(device=device, dtype=torch.float32)
    return out


def build_frozen_reference(components):
    """The frozen reference of ``--reference online`` (``model.stage.build_frozen_model``), with
    the policy's current weights copied in: the benchmark has no checkpoint to load."""
    from megatron_rift.model.stage import build_frozen_model

    return build_frozen_model(
        components.arch,
        components.config,
        components.use_te,
        state_dict=components.model[0].module.state_dict(),
    )


def reference_logprobs(reference, batch):
    """log pi_ref(y|x) per row of ``batch``, as the precomputed file would hold them."""
    from megatron_rift.losses import sequence_logprobs

    b = batch["tokens"].shape[0]
    segment_ids = (
        torch.arange(b, device=batch["tokens"].device).unsqueeze(-1).expand_as(batch["tokens"])
    )
    with torch.no_grad():
        ce = reference(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return sequence_logprobs(ce, batch["loss_mask"], segment_ids, b)[0].float()


class LiveBytesMeter:
    """Peak bytes of the tensor storages that ops create while active (a dispatch mode; a storage
    counts until the last tensor on it dies). On CPU this is the only way to see the transient
    memory of a ``no_grad`` forward, which saves nothing for backward."""

    def __init__(self, existing=()):
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.live, self.current, self.peak = {}, 0, 0

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        meter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        meter.track(t)
                return out

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)

    def track(self, tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if not storage.nbytes() or ptr in self.existing:
            return
        entry = self.live.get(ptr)
        if entry is None:
            entry = self.live[ptr] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(tensor, self.release, ptr)

    def release(self, ptr):
        entry = self.live[ptr]
        entry[1] -= 1
        if not entry[1]:
            self.current -= entry[0]
            del self.live[ptr]


def reference_forward_bytes(reference, batch):
    """Transient peak of the online reference's ``no_grad`` scoring of one micro-batch (what
    ``dpo (online)`` allocates on top of the policy's saved activations, at the forward/backward
    boundary)."""
    existing = list(reference_state_tensors(reference)) + list(batch.values())
    with LiveBytesMeter(existing) as meter:
        reference_logprobs(reference, batch)
    return meter.peak


def storage_bytes(tensors):
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once)."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            storage = t.untyped_storage()
            seen[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def policy_state_tensors(components):
    """The policy's parameters, gradient buffers (DDP ``main_grad``) and optimizer state
    (master weights, Adam moments): what training holds all run long."""
    ddp = components.model[0]
    module = ddp.module
    yield from module.parameters()
    yield from torch.nn.Module.buffers(module)  # DDP's own ``buffers`` attribute shadows it
    for param in module.parameters():
        yield getattr(param, "main_grad", None)
        yield param.grad
    optimizer = components.optimizer
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(chained, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                yield param
                yield param.grad
        for state in inner.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def reference_state_tensors(reference):
    yield from reference.parameters()
    yield from reference.buffers()


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
    from megatron_rift.training.step import loss_settings, make_forward_step, train_step

    torch.set_num_threads(bench.threads)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    on_gpu = device.type == "cuda"
    allocated = torch.cuda.memory_allocated() if on_gpu else 0
    config, components = build(bench)
    policy_allocated = torch.cuda.memory_allocated() - allocated if on_gpu else 0
    _, fused_components = build(bench, fused=True)
    fused_allocated = torch.cuda.memory_allocated() - allocated - policy_allocated if on_gpu else 0
    row_components = {name: fused_components if name == FUSED_ROW else components for name in ROWS}
    batch = synthetic_batch(bench, device)
    tokens_per_step = bench.micro_batch_size * bench.seq_length  # every row: the same b x s rows
    # The frozen reference: a copy of the initial policy, as --reference online would load it.
    reference_allocated = torch.cuda.memory_allocated() if on_gpu else 0
    reference = build_frozen_reference(components)
    reference_allocated = torch.cuda.memory_allocated() - reference_allocated if on_gpu else 0
    ref_logprobs = reference_logprobs(reference, batch)  # "precomputed", before any step
    steps, batches = {}, {}
    # The trainer's defaults (negative mode token, each objective's own beta).
    for name in (*OBJECTIVES, FUSED_ROW):
        objective = RIFT if name == FUSED_ROW else get_objective(name)
        steps[name] = make_forward_step(
            objective,
            loss_settings(objective, config.objective),
            packed=False,
            use_te=components.use_te,
        )
        batches[name] = batch
    for name, (objective, online) in PREFERENCE_ROWS.items():
        steps[name] = make_forward_step(
            objective,
            loss_settings(objective, config.objective),
            packed=False,
            use_te=components.use_te,
            reference_model=reference if online else None,
        )
        needs_ref = objective.reference and not online
        batches[name] = preference_batch(batch, objective, ref_logprobs if needs_ref else None)
    uses_reference = {name: PREFERENCE_ROWS.get(name, (None, False))[1] for name in ROWS}
    times = {name: [] for name in ROWS}
    cpu_times = {name: [] for name in ROWS}
    peak = dict.fromkeys(ROWS, 0)
    for name in ROWS:  # warm-up (allocator, kernels, optimizer state) outside the measurement
        train_step(
            row_components[name],
            iter([batches[name]]),
            1,
            bench.seq_length,
            bench.micro_batch_size,
            steps[name],
        )
    # One step per objective per round, in a rotated order: neighbouring steps share the machine's
    # load, so the per-round ratios to sft are robust even when the load drifts.
    for round_index in range(bench.rounds):
        shift = round_index % len(ROWS)
        for name in ROWS[shift:] + ROWS[:shift]:
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            train_step(
                row_components[name],
                iter([batches[name]]),
                1,
                bench.seq_length,
                bench.micro_batch_size,
                steps[name],
            )
            if on_gpu:
                torch.cuda.synchronize()
                # The reference's weights are resident all run; only dpo (online) needs them.
                # Likewise each row needs only its own policy (the fused row's or the other).
                used = (
                    torch.cuda.max_memory_allocated()
                    - (0 if uses_reference[name] else reference_allocated)
                    - (policy_allocated if name == FUSED_ROW else fused_allocated)
                )
                peak[name] = max(peak[name], used)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    saved = {
        name: measure_saved_bytes(steps[name], row_components[name].model[0], batches[name])
        for name in ROWS
    }
    policy_state = storage_bytes(policy_state_tensors(components))
    reference_state = storage_bytes(reference_state_tensors(reference))
    model_state = {
        name: policy_state + (reference_state if uses_reference[name] else 0) for name in ROWS
    }
    reference_forward = reference_forward_bytes(reference, batch)
    transient = {name: reference_forward if uses_reference[name] else 0 for name in ROWS}
    # On a GPU the wall clock is the measure; on a (shared) CPU the process's own CPU time is far
    # less disturbed by other processes' load, so ratios use it there.
    ratio_times = times if on_gpu else cpu_times
    report(
        bench,
        times,
        ratio_times,
        peak,
        saved,
        model_state,
        transient,
        tokens_per_step,
        device,
        cpu_compat_active(),
    )


def report(
    bench, times, ratio_times, peak, saved, model_state, transient, tokens_per_step, device, compat
):
    on_gpu = device.type == "cuda"
    # The peak-memory figure: the real allocator peak on GPU; on CPU saved activations (the
    # forward/backward boundary) plus the model state held all run long, plus the online
    # reference's forward temporaries (alive at that boundary too).
    total = {
        name: peak[name] if on_gpu else saved[name][0] + model_state[name] + transient[name]
        for name in ROWS
    }
    rows = []
    for name in ROWS:
        tps = tokens_per_step / statistics.median(times[name])
        # Median over rounds of (sft step time / this objective's step time in the same round).
        ratio = statistics.median(s / t for s, t in zip(ratio_times[BASELINE], ratio_times[name]))
        row = {
            "objective": name,
            "tokens_per_s": tps,
            "tokens_per_s_vs_sft": ratio,
            "step_time_vs_sft": 1.0 / ratio,
            "saved_for_backward_mib": saved[name][0] / 2**20,
            "saved_vs_sft": saved[name][0] / saved[BASELINE][0],
            "loss_path_saved_kib": saved[name][1] / 2**10,
            "model_state_mib": model_state[name] / 2**20,
            "reference_forward_mib": transient[name] / 2**20,
            "peak_measure": (
                "max_memory_allocated" if on_gpu else "saved + model state + reference forward"
            ),
            "peak_mib": total[name] / 2**20,
            "peak_vs_sft": total[name] / total[BASELINE],
            "steps_timed": len(times[name]),
        }
        rows.append(row)
    print(
        f"# {bench.num_layers} layers, hidden {bench.hidden_size}, vocab {bench.vocab_size}, "
        f"micro-batch {bench.micro_batch_size} x seq {bench.seq_length} (preference rows: "
        f"{bench.micro_batch_size // 2} pairs/units of 2 rows); {bench.rounds} "
        f"interleaved steps per objective; device {device}"
        + (
            ""
            if on_gpu
            else f", {bench.threads} thread(s); 'vs sft' of tokens/s and step time "
            "from per-round CPU-time ratios"
        )
        + (" (CUDA->CPU remap active)" if compat else "")
    )
    if on_gpu:
        print(
            "# peak memory = torch.cuda.max_memory_allocated over the row's steps (the reference "
            "model's weights counted for dpo (online) only)"
        )
    else:
        print(
            "# peak memory = saved-for-backward activations + model state (policy parameters, "
            "gradient buffers, optimizer state; + frozen reference parameters for dpo (online)) "
            "+ reference forward (dpo (online): transient peak of its no_grad scoring)"
        )
    head = (
        "| objective | tokens/s | tokens/s vs sft | step time vs sft | "
        "saved for backward (MiB) | vs sft | loss path (KiB) | model state (MiB) | "
        "reference forward (MiB) | "
        + ("peak allocated (MiB)" if on_gpu else "peak = saved + state + ref fwd (MiB)")
        + " | peak vs sft |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        print(
            f"| {r['objective']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s_vs_sft']:.3f} | "
            f"{r['step_time_vs_sft']:.3f} | {r['saved_for_backward_mib']:.2f} | "
            f"{r['saved_vs_sft']:.4f} | {r['loss_path_saved_kib']:.1f} | "
            f"{r['model_state_mib']:.2f} | {r['reference_forward_mib']:.2f} | "
            f"{r['peak_mib']:.2f} | {r['peak_vs_sft']:.4f} |"
        )
    target = next(r for r in rows if r["objective"] == TARGET_ROW)
    verdict = "PASS" if target["peak_vs_sft"] <= TARGET_RATIO else "FAIL"
    print(
        f"{verdict}: {TARGET_ROW} peak memory = {target['peak_vs_sft']:.4f}x sft "
        f"({rows[0]['peak_measure']}; target <= {TARGET_RATIO:.2f}x); saved activations "
        f"{target['saved_vs_sft']:.4f}x sft"
    )
    if bench.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
