"""``megatron-rift demo``: RIFT against its baselines, end to end, on a laptop-sized CPU machine.

Runs the whole pipeline with the project's own tools (task -> tokenizer -> tiny Megatron GPT base ->
K rollouts -> packing -> SFT/DFT/RFT/RIFT/naive/DPO fine-tuning (KTO and SimPO with --methods all)
-> HF export -> Mean@K/Pass@K) and writes ``results.json``, ``results.md`` and ``results.png`` into
the output folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

from megatron_rift.demo.config import DEFAULT_METHODS, DemoConfig
from megatron_rift.demo.methods import TABLE6, method_names
from megatron_rift.demo.presets import PRESETS, RUN_KEYS
from megatron_rift.megatron_compat import quiet_known_messages
from megatron_rift.objectives import RFT, RIFT, objective_names

METHODS = method_names()

# `--miniature`: the whole pipeline in about a minute on 2 cores (a smoke test, e.g. in CI).
MINIATURE = dict(
    base_problems=600,
    train_problems=24,
    val_problems=8,
    test_problems=16,
    ood_problems=16,
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=176,
    base_epochs=1.0,
    finetune_epochs=1.0,
    base_global_batch=32,
    finetune_global_batch=32,
    micro_batch_size=16,
    max_new_tokens=64,
)
# The miniature's default comparison; every other method adds ~11 s (DPO/KTO ~8 s more for the
# reference log-probs).
MINIATURE_METHODS = (RFT.name, RIFT.name)


def build_parser() -> argparse.ArgumentParser:
    d = DemoConfig(output_dir="")
    p = argparse.ArgumentParser(
        prog="megatron-rift demo",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--output-dir",
        default=None,
        help="folder for every stage's artifacts (default: a fresh demo_runs/<timestamp>)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="repeat with seeds 0..N-1; report mean ± std and paired 95%% intervals "
        "(default 1; the evidence preset 3)",
    )
    p.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default=None,
        help="a named configuration (megatron_rift/demo/presets.py); 'evidence': the long run "
        "for RIFT against RFT with intervals (hours on 2 cores); explicit flags override it",
    )
    p.add_argument(
        "--table6",
        action="store_true",
        help="add the paper's table 6 ablation: RIFT with constant negative rewards -0.5 and "
        "-0.8 (rift itself: -0.2) and with gaussian and gpg-mean group normalization",
    )
    p.add_argument(
        "--naive-collapse-lrs",
        default=None,
        help="with naive among the methods: comma-separated extra lrs to run it at (and at "
        "RIFT's lr), to show where it collapses",
    )
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument(
        "--problems",
        default=None,
        metavar="FILE.jsonl",
        help="your own problems: records with question, answer, optional solution, and "
        "split in {train, val, test, ood}",
    )
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated subset of {', '.join(METHODS)}, or 'all' (every objective; "
        "default: "
        f"{','.join(DEFAULT_METHODS)}; with --miniature {','.join(MINIATURE_METHODS)})",
    )
    p.add_argument(
        "--sweep-lr",
        action="store_true",
        help="choose each method's lr on the validation split (slower)",
    )
    p.add_argument(
        "--sweep-lrs",
        default=None,
        help="comma-separated learning rates that --sweep-lr tries (default "
        f"{','.join(f'{lr:g}' for lr in d.sweep_lrs)})",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        choices=(1, 2),
        help="2: iterative RIFT (new rollouts from the RIFT model, train again)",
    )
    p.add_argument(
        "--tensor-model-parallel-size",
        type=int,
        default=d.tensor_parallel,
        help="TP for every training run (2 runs under torchrun on gloo)",
    )
    p.add_argument("--samples-per-problem", type=int, default=d.samples_per_problem, help="K")
    p.add_argument(
        "--miniature",
        action="store_true",
        help="a ~1-minute pipeline on 2 cores (smaller model, fewer problems, RFT "
        "against RIFT unless --methods says otherwise): a smoke test",
    )
    for name in (
        "base_problems",
        "train_problems",
        "test_problems",
        "ood_problems",
        "val_problems",
        "num_layers",
        "hidden_size",
        "max_new_tokens",
        "base_checkpoint_interval",
    ):
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            default=None,
            help=f"default {getattr(d, name)}",
        )
    p.add_argument(
        "--base-competence-ceiling",
        type=_share,
        default=None,
        metavar="SHARE",
        help="choose the base among checkpoints saved every --base-checkpoint-interval steps: "
        "the newest whose share of right samples on pretraining problems held out of its data "
        "is at most SHARE (e.g. 0.5), so every seed starts from a partly competent base "
        f"(default {d.base_competence_ceiling}: the last checkpoint)",
    )
    for name in ("base_epochs", "finetune_epochs", "base_lr"):
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=float,
            default=None,
            help=f"default {getattr(d, name)}",
        )
    return p


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share between 0 and 1")
    return value


def _parse_lrs(text: str, flag: str = "--sweep-lrs") -> tuple[float, ...]:
    try:
        lrs = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SystemExit(
            f"megatron-rift demo: {flag} {text!r} is not a comma-separated list "
            "of numbers (e.g. 3e-5,1e-4,3e-4)"
        ) from None
    if not lrs or any(not lr > 0 for lr in lrs):
        raise SystemExit(f"megatron-rift demo: {flag} {text!r}: give one or more positive rates")
    return lrs


def config_from_args(args) -> DemoConfig:
    out = args.output_dir or f"demo_runs/{datetime.datetime.now():%Y%m%d-%H%M%S}"
    preset = PRESETS[args.preset] if args.preset else {}
    default_methods = preset.get("methods", DEFAULT_METHODS)
    text = args.methods or ",".join(MINIATURE_METHODS if args.miniature else default_methods)
    methods = (
        objective_names()  # every objective; the RIFT variants by name, --table6 or a preset
        if text.strip() == "all"
        else tuple(m.strip() for m in text.split(",") if m.strip())
    )
    if args.table6:
        methods += tuple(m for m in TABLE6 if m not in methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(
            f"megatron-rift demo: unknown method(s) {unknown}; choose from {list(METHODS)}"
        )
    cfg = DemoConfig(
        output_dir=out,
        seed=args.seed,
        problems_file=args.problems,
        methods=methods,
        rounds=args.rounds,
        tensor_parallel=args.tensor_model_parallel_size,
        samples_per_problem=args.samples_per_problem,
    )
    cfg = dataclasses.replace(cfg, **{k: v for k, v in preset.items() if k not in RUN_KEYS})
    if args.sweep_lrs is not None:
        cfg = dataclasses.replace(cfg, sweep_lrs=_parse_lrs(args.sweep_lrs))
    if args.sweep_lr:
        cfg = dataclasses.replace(cfg, sweep_lr=True)
    if args.naive_collapse_lrs is not None:
        lrs = _parse_lrs(args.naive_collapse_lrs, "--naive-collapse-lrs")
        cfg = dataclasses.replace(cfg, naive_collapse_lrs=lrs)
    if args.miniature:
        cfg = dataclasses.replace(cfg, **MINIATURE)
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(DemoConfig)
        if getattr(args, f.name, None) is not None and f.name not in ("output_dir", "seed")
    }
    overrides.pop("methods", None)
    return dataclasses.replace(
        cfg,
        **{
            k: v
            for k, v in overrides.items()
            if k not in ("problems_file", "sweep_lr", "sweep_lrs", "rounds", "naive_collapse_lrs")
        },
    )


def num_seeds(args) -> int:
    if args.seeds is not None:
        return args.seeds
    return PRESETS[args.preset].get("seeds", 1) if args.preset else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Megatron-Core's expected warnings (no TE/Apex on CPU, 0.19's deprecations) would break into
    # the progress bar; megatron_compat.KNOWN_WARNINGS says why each is expected.
    quiet_known_messages()
    cfg = config_from_args(args)
    if args.problems:
        from megatron_rift.demo.task import ProblemsFileError, load_problems_file

        try:
            load_problems_file(args.problems)  # fail before any heavy work
        except ProblemsFileError as error:
            print(f"megatron-rift demo: {error}", file=sys.stderr)
            return 2
    from megatron_rift.demo.pipeline import DemoRun
    from megatron_rift.demo.report import write_reports
    from megatron_rift.demo.stages import StageError

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"megatron-rift demo: writing to {out}/", flush=True)
    start = time.perf_counter()
    per_seed = []
    try:
        seed_cfg = cfg
        for seed in range(cfg.seed, cfg.seed + num_seeds(args)):
            per_seed.append(DemoRun(seed_cfg, seed, out / f"seed{seed}").run())
            if cfg.sweep_lr and not cfg.sweep_every_seed:
                # The first seed's validation split chose the rates; the other seeds reuse them.
                seed_cfg = dataclasses.replace(
                    cfg, sweep_lr=False, method_lr={**cfg.method_lr, **per_seed[0]["lrs"]}
                )
            # Each seed's own record, so seeds run as separate jobs can be aggregated later.
            (out / f"seed{seed}" / "run.json").write_text(json.dumps(per_seed[-1], indent=1) + "\n")
    except StageError as error:
        print(f"megatron-rift demo: {error}", file=sys.stderr)
        return 1
    k = cfg.samples_per_problem
    elapsed = time.perf_counter() - start
    table, png = write_reports(out, per_seed, dataclasses.asdict(cfg), k, elapsed)
    print(f"\nMean@{k} / Pass@{k} (%), {len(per_seed)} seed(s), {elapsed:.0f} s:\n\n{table}\n")
    for run in per_seed:
        c = run["competence"]
        print(
            f"base (seed {c['seed']}): {100 * c['correct_fraction']:.1f}% of rollouts right, "
            f"{100 * c['mixed_fraction']:.1f}% of problems mixed"
            + ("  (outside the band: see the warning above)" if c["warnings"] else "")
        )
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}" + (f", {png}" if png else ""))
    print(json.dumps({"lrs": per_seed[0]["lrs"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
