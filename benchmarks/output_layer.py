"""The output layer + per-token cross-entropy, fused (``--cross-entropy-loss-fusion``) vs unfused.

From the final hidden states to the loss and back to the hidden states and the output weight, at
Qwen2.5-1.5B's shape (hidden 1536, vocabulary 151,936) by default:

- ``unfused`` (the baseline): Megatron's output layer (``ColumnParallelLinear``) then
  ``tensor_parallel.vocab_parallel_cross_entropy`` on the whole ``[tokens, vocab]`` logits, what
  ``GPTModel(..., labels=...)`` does;
- ``fused``: :func:`megatron_rift.model.linear_cross_entropy.linear_cross_entropy`, ``--chunk``
  tokens at a time.

Both get the weight as Megatron's DDP holds it: a parameter with an fp32 ``main_grad`` buffer (in
the baseline of the memory figure) and DDP's hook that moves ``param.grad`` into it. The loss is
RIFT-like: each token's CE weighted by its own factor (1 or -0.2 * p), so the upstream gradient
differs per token. Time: both variants alternately in one process, the order swapped every round;
the figure is the median over rounds of the fused/unfused time ratio. Peak memory: each variant in
a fresh process, the growth of peak RSS (``ru_maxrss``) over a baseline taken once the inputs,
the weight and its ``main_grad`` exist; on a GPU ``torch.cuda.max_memory_allocated``.

    .venv/bin/python benchmarks/output_layer.py                 # 2048 tokens, fp32 and bf16
    .venv/bin/python benchmarks/output_layer.py --tokens 512 --dtypes bf16 --rounds 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = ("unfused", "fused")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _setup():
    # Megatron's modules before the process group (their import-time torch.compile decorators).
    from megatron.core import tensor_parallel  # noqa: F401

    from megatron_rift.model import linear_cross_entropy  # noqa: F401
    from megatron_rift.parallel import init_distributed

    init_distributed(1, 1)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _inputs(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device):
    """Hidden states [tokens, 1, h], the output weight (with DDP's main_grad and hook), labels and
    per-token loss weights; filled in place (a freed temporary would raise the RSS baseline)."""
    g = torch.Generator().manual_seed(0)
    states = torch.empty(tokens, 1, hidden, dtype=dtype).normal_(generator=g).to(device)
    weight = torch.nn.Parameter(
        torch.empty(vocab, hidden, dtype=dtype).normal_(std=0.02, generator=g).to(device)
    )
    weight.main_grad = torch.zeros(vocab, hidden, dtype=torch.float32, device=device)
    weight.grad_added_to_main_grad = False

    def ddp_hook(param):  # Megatron DDP's backward hook (distributed_data_parallel.py)
        if param.grad is not None and not param.grad_added_to_main_grad:
            param.main_grad.add_(param.grad)
        param.grad = None

    weight.register_post_accumulate_grad_hook(ddp_hook)
    labels = torch.randint(0, vocab, (tokens, 1), generator=g).to(device)
    positive = (torch.arange(tokens, device=device) % 2 == 0).unsqueeze(1)
    return states, weight, labels, positive


def _output_layer(hidden: int, vocab: int, dtype: torch.dtype):
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    config = ModelParallelConfig(params_dtype=dtype, use_cpu_initialization=True)
    return ColumnParallelLinear(
        hidden,
        vocab,
        config=config,
        init_method=torch.nn.init.zeros_,
        bias=False,
        skip_weight_param_allocation=True,  # the weight is passed in, like a tied embedding's
    )


def _fwd_bwd(variant: str, layer, chunk: int, states, weight, labels, positive) -> None:
    from megatron.core import tensor_parallel

    from megatron_rift.model.linear_cross_entropy import linear_cross_entropy

    x = states.detach().requires_grad_(True)
    if variant == "unfused":
        logits, _ = layer(x, weight=weight)
        ce = tensor_parallel.vocab_parallel_cross_entropy(logits, labels)
        del logits
    else:
        ce = linear_cross_entropy(x, weight, labels, chunk)
    # RIFT's shape of gradient: r * ce on positives, -r * p on negatives (r = 1, -0.2).
    loss = torch.where(positive, ce, 0.2 * torch.exp(-ce)).mean()
    loss.backward()
    weight.grad_added_to_main_grad = False  # DDP's zero_grad_buffer does this every step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_time(args, dtype: torch.dtype) -> dict:
    device = _setup()
    inputs = _inputs(args.tokens, args.hidden, args.vocab, dtype, device)
    layer = _output_layer(args.hidden, args.vocab, dtype)
    times = {v: [] for v in VARIANTS}
    for round_index in range(args.rounds):
        order = VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            _sync(device)
            t0 = time.perf_counter()
            _fwd_bwd(variant, layer, args.chunk, *inputs)
            _sync(device)
            times[variant].append(time.perf_counter() - t0)
    ratios = [f / u for f, u in zip(times["fused"], times["unfused"])]
    return {
        "time_s": {v: statistics.median(t) for v, t in times.items()},
        "time_ratio": statistics.median(ratios),
        "rounds": times,
    }


def measure_peak(args, dtype: torch.dtype, variant: str) -> float:
    """Peak extra bytes of one fwd+bwd (called in a fresh process)."""
    device = _setup()
    inputs = _inputs(args.tokens, args.hidden, args.vocab, dtype, device)
    layer = _output_layer(args.hidden, args.vocab, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _fwd_bwd(variant, layer, args.chunk, *inputs)
        return torch.cuda.max_memory_allocated() - base
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _fwd_bwd(variant, layer, args.chunk, *inputs)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024.0


def _child(args, mode: str, dtype: str, variant: str = "") -> dict | float:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--dtypes",
        dtype,
        "--variant",
        variant,
        *(f"--tokens={args.tokens} --hidden={args.hidden} --vocab={args.vocab}".split()),
        f"--chunk={args.chunk}",
        f"--rounds={args.rounds}",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _machine() -> str:
    if torch.cuda.is_available():
        return "GPU " + torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}, {torch.get_num_threads()} threads"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--chunk", type=int, default=None, help="fused chunk (default: the module's)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds (each runs both)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.chunk is None:
        from megatron_rift.model.linear_cross_entropy import DEFAULT_CHUNK_TOKENS

        args.chunk = DEFAULT_CHUNK_TOKENS
    dtypes = args.dtypes.split(",")
    if args.child == "time":
        print(json.dumps(measure_time(args, DTYPES[dtypes[0]])))
        return
    if args.child == "peak":
        print(json.dumps(measure_peak(args, DTYPES[dtypes[0]], args.variant)))
        return

    results = []
    for dtype in dtypes:
        peaks = {v: _child(args, "peak", dtype, v) for v in VARIANTS}
        timing = _child(args, "time", dtype)
        results.append({"dtype": dtype, "peak_bytes": peaks, **timing})
    today = datetime.date.today().isoformat()
    print(
        f"\nOutput layer + per-token CE, forward+backward, {args.tokens} tokens, hidden "
        f"{args.hidden}, vocabulary {args.vocab}, fused chunk {args.chunk} tokens; "
        f"{_machine()}, {today}\n"
    )
    print(
        "| dtype | unfused peak (MiB) | fused peak (MiB) | memory ratio | unfused time (s) | "
        "fused time (s) | time ratio (median) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        pu, pf = r["peak_bytes"]["unfused"], r["peak_bytes"]["fused"]
        tu, tf = r["time_s"]["unfused"], r["time_s"]["fused"]
        print(
            f"| {r['dtype']} | {pu / 2**20:.0f} | {pf / 2**20:.0f} | {pf / pu:.2f}x | "
            f"{tu:.2f} | {tf:.2f} | {r['time_ratio']:.2f}x |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"machine": _machine(), "date": today, "args": vars(args), "results": results},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
