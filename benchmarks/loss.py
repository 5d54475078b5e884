"""Forward+backward time and peak memory of each objective against Megatron's plain CE.

For each logits shape ([tokens, vocab]), every variant computes a token-mean loss from the same
fp32 logits and backpropagates to them:

- ``megatron_ce`` (the baseline): ``tensor_parallel.vocab_parallel_cross_entropy`` masked mean;
- ``torch_log_softmax``: ``log_softmax`` + ``gather`` over the full logits, what a TRL-style
  trainer does;
- one row per token objective of the registry (``megatron_rift.objectives``): its loss, loaded as
  the trainer loads it (``get_objective(name).load_loss()``), on Megatron's CE; plus RIFT with
  the ``geometric`` negative mode.

Time: all variants interleaved round-robin in one process (the same machine load for each), the
order rotated every round, median of ``--repeats``. Peak memory: each variant in a fresh process,
the growth of peak RSS (``ru_maxrss``) over a baseline taken once the inputs exist (and the loss
module is imported), so it counts exactly the fwd+bwd working set (logit gradient included). On a
GPU the same script reports ``torch.cuda.max_memory_allocated``.

    .venv/bin/python benchmarks/loss.py            # both shapes from the issue
    .venv/bin/python benchmarks/loss.py --shapes 1024x32000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from megatron_rift.objectives import RIFT, Unit, get_objective, objectives

BASELINE = "megatron_ce"
RIFT_GEOMETRIC = f"{RIFT.name}_geometric"  # RIFT with negative_mode="geometric"
# Variant -> (objective, negative mode), the token objectives in registry order.
OBJECTIVE_VARIANTS = {}
for _objective in objectives():
    if _objective.unit is Unit.ROLLOUT:
        OBJECTIVE_VARIANTS[_objective.name] = (_objective.name, "token")
        if _objective is RIFT:
            OBJECTIVE_VARIANTS[RIFT_GEOMETRIC] = (RIFT.name, "geometric")
VARIANTS = [BASELINE, "torch_log_softmax", *OBJECTIVE_VARIANTS]
_LOSSES = {}  # objective name -> its loss function, loaded once (outside the timed calls)


def _loss_of(objective: str):
    if objective not in _LOSSES:
        _LOSSES[objective] = get_objective(objective).load_loss()
    return _LOSSES[objective]


def _inputs(tokens: int, vocab: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    # Filled in place: a freed temporary of logits' size would sit inside the RSS baseline and
    # hide later allocations from the peak measurement.
    logits = torch.empty(tokens, vocab).normal_(generator=g).mul_(2).to(device)
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    mask = (torch.rand(tokens, generator=g) > 0.2).float().to(device)
    # Half the rows positive (+1), half negative (-0.2), as in the paper's constant scheme.
    rewards = torch.where(torch.arange(tokens, device=device) % 2 == 0, 1.0, -0.2)
    return logits, labels, mask, rewards


def _fwd_bwd(variant: str, logits, labels, mask, rewards) -> torch.Tensor:
    from megatron.core import tensor_parallel

    from megatron_rift.losses import LossSettings

    x = logits.detach().clone().requires_grad_(True)
    if variant == "torch_log_softmax":
        logp = torch.log_softmax(x.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        loss = -(logp * mask).sum() / mask.sum()
    else:
        # Megatron's layout is [s, b, v]; one sequence of `tokens` positions.
        ce = tensor_parallel.vocab_parallel_cross_entropy(
            x.unsqueeze(1), labels.unsqueeze(1)
        ).squeeze(1)
        if variant == BASELINE:
            loss = (ce * mask).sum() / mask.sum()
        else:
            objective, mode = OBJECTIVE_VARIANTS[variant]
            batch = {"loss_mask": mask.unsqueeze(0), "rewards": rewards.unsqueeze(0)}
            loss_sum, n, _ = _loss_of(objective)(
                ce.unsqueeze(0), batch, LossSettings(negative_mode=mode)
            )
            loss = loss_sum / n
    loss.backward()
    return x.grad


def _setup():
    from megatron_rift.parallel import init_distributed

    init_distributed(1, 1)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_time(tokens: int, vocab: int, repeats: int) -> dict:
    device = _setup()
    inputs = _inputs(tokens, vocab, device)
    times = {v: [] for v in VARIANTS}
    for v in VARIANTS:  # warm-up (and the objectives' losses loaded)
        _fwd_bwd(v, *inputs)
    for round_index in range(repeats):
        # Rotate the order each round: whichever variant runs first after the previous round's
        # large frees pays for fresh pages, which biased a fixed order by ~20% at vocab 152k.
        shift = round_index % len(VARIANTS)
        for v in VARIANTS[shift:] + VARIANTS[:shift]:
            _sync(device)
            t0 = time.perf_counter()
            _fwd_bwd(v, *inputs)
            _sync(device)
            times[v].append(time.perf_counter() - t0)
    return {v: statistics.median(t) for v, t in times.items()}


def measure_peak(tokens: int, vocab: int, variant: str) -> float:
    """Peak extra bytes of one fwd+bwd (run in a fresh process)."""
    device = _setup()
    inputs = _inputs(tokens, vocab, device)
    if variant in OBJECTIVE_VARIANTS:  # import the loss module before the baseline
        _loss_of(OBJECTIVE_VARIANTS[variant][0])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _fwd_bwd(variant, *inputs)
        return torch.cuda.max_memory_allocated() - base
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _fwd_bwd(variant, *inputs)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024.0


def _in_subprocess(mode: str, tokens: int, vocab: int, extra: list[str]):
    cmd = [sys.executable, __file__, "--child", mode, "--shapes", f"{tokens}x{vocab}", *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--shapes",
        default="4096x32000,2048x152064",
        help="comma-separated TOKENSxVOCAB (default: the issue's two shapes)",
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    if args.child == "time":
        print(json.dumps(measure_time(*shapes[0], args.repeats)))
        return
    if args.child == "peak":
        print(json.dumps(measure_peak(*shapes[0], args.variant)))
        return

    results = []
    for tokens, vocab in shapes:
        times = _in_subprocess("time", tokens, vocab, ["--repeats", str(args.repeats)])
        peaks = {v: _in_subprocess("peak", tokens, vocab, ["--variant", v]) for v in VARIANTS}
        results.append({"tokens": tokens, "vocab": vocab, "time_s": times, "peak_bytes": peaks})
    device = "GPU " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"\nLoss forward+backward, fp32 logits, {device}, {torch.get_num_threads()} threads; "
        f"ratios against Megatron's vocab_parallel_cross_entropy ({BASELINE}) in the same run\n"
    )
    print(
        "| logits [tokens, vocab] | variant | time (ms) | time ratio | peak extra (MiB) | memory ratio |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        t0, m0 = r["time_s"][BASELINE], r["peak_bytes"][BASELINE]
        for v in VARIANTS:
            t, m = r["time_s"][v], r["peak_bytes"][v]
            print(
                f"| [{r['tokens']}, {r['vocab']}] | {v} | {t * 1e3:.1f} | {t / t0:.2f}x | "
                f"{m / 2**20:.0f} | {m / m0:.2f}x |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
