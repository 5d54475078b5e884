"""The demo's outputs: ``results.json``, a markdown table (mean ± std over seeds) and a PNG."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from megatron_rift.demo.statistics import comparisons

SPLIT_LABELS = {"test": "ID test", "ood": "OOD"}


def aggregate(per_seed: list[dict], k: int) -> dict:
    """``{method: {split: {"mean@k": mean, "mean@k_std": std, "pass@k": ..., "pass@k_std": ...}}}``
    in percent, over seeds (std is 0 with one seed)."""
    methods: dict[str, dict] = {}
    for run in per_seed:
        for method, result in run["results"].items():
            for split, score in result["benchmarks"].items():
                cell = methods.setdefault(method, {}).setdefault(split, {"mean": [], "pass": []})
                cell["mean"].append(100 * score["mean_at_k"])
                cell["pass"].append(100 * score["pass_at_k"])
    out: dict[str, dict] = {}
    for method, splits in methods.items():
        out[method] = {}
        for split, cell in splits.items():
            entry = {}
            for name, values in (("mean", cell["mean"]), ("pass", cell["pass"])):
                entry[f"{name}@{k}"] = round(statistics.fmean(values), 2)
                entry[f"{name}@{k}_std"] = (
                    round(statistics.stdev(values), 2) if len(values) > 1 else 0.0
                )
                entry[f"{name}@{k}_per_seed"] = [round(v, 2) for v in values]
            out[method][split] = entry
    _add_change_from_base(out, k)
    return out


def _add_change_from_base(out: dict, k: int) -> None:
    """Each method's Mean@k minus the base's, seed by seed, then mean ± std: the base's own spread
    over seeds (large on the built-in task) cancels in the difference."""
    base = out.get("base", {})
    for method, splits in out.items():
        for split, entry in splits.items():
            reference = base.get(split, {}).get(f"mean@{k}_per_seed")
            values = entry[f"mean@{k}_per_seed"]
            if method == "base" or not reference or len(reference) != len(values):
                continue
            deltas = [v - b for v, b in zip(values, reference)]
            entry[f"mean@{k}_change_from_base"] = round(statistics.fmean(deltas), 2)
            entry[f"mean@{k}_change_from_base_std"] = (
                round(statistics.stdev(deltas), 2) if len(deltas) > 1 else 0.0
            )


def markdown(summary: dict, k: int, num_seeds: int) -> str:
    """Mean@k / Pass@k per split (± std over seeds); with several seeds also each split's Mean@k
    change from the base, paired by seed."""
    splits = [s for s in SPLIT_LABELS if any(s in v for v in summary.values())]
    pm = num_seeds > 1
    head = " | ".join(f"{SPLIT_LABELS[s]} Mean@{k} | {SPLIT_LABELS[s]} Pass@{k}" for s in splits)
    if pm:
        head += " | " + " | ".join(f"{SPLIT_LABELS[s]} Mean@{k} − base" for s in splits)
    columns = (3 if pm else 2) * len(splits)
    lines = [f"| method | {head} |", "|---|" + "---:|" * columns]
    for method, per_split in summary.items():
        cells = []
        for s in splits:
            e = per_split.get(s)
            for name in ("mean", "pass"):
                if e is None:
                    cells.append("-")
                else:
                    value = f"{e[f'{name}@{k}']:.1f}"
                    cells.append(value + (f" ± {e[f'{name}@{k}_std']:.1f}" if pm else ""))
        if pm:
            for s in splits:
                e = per_split.get(s) or {}
                change = e.get(f"mean@{k}_change_from_base")
                cells.append(
                    "-"
                    if change is None
                    else f"{change:+.1f} ± {e[f'mean@{k}_change_from_base_std']:.1f}"
                )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_markdown(paired: dict, k: int, references: tuple[str, ...] = ("base", "rft")) -> str:
    """Each method's Mean@k change from each reference, paired by seed and problem, with its 95%
    bootstrap interval; an interval containing 0 reads "tie"."""
    splits = [s for s in SPLIT_LABELS if any(s in v for v in paired.values())]
    columns = [(s, r) for s in splits for r in references]
    head = " | ".join(f"{SPLIT_LABELS[s]} Mean@{k} − {r}" for s, r in columns)
    lines = [f"| method | {head} |", "|---|" + "---:|" * len(columns)]
    for method, per_split in paired.items():
        cells = []
        for split, reference in columns:
            c = per_split.get(split, {}).get(f"vs_{reference}")
            cells.append(
                "-"
                if c is None
                else f"{c['change']:+.1f} [{c['low']:+.1f}, {c['high']:+.1f}] {c['verdict']}"
            )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seeds_markdown(per_seed: list[dict], k: int) -> str:
    """One row per seed: the base's competence on its rollouts (and the checkpoint chosen, when
    the base was chosen by held-out competence) and RFT's ID change from that base."""
    lines = [
        f"| seed | base: rollouts right | problems mixed | base step | base ID Mean@{k} "
        f"| rft − base, ID Mean@{k} |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for run in per_seed:
        c, results = run.get("competence") or {}, run["results"]
        selection = run.get("base_selection") or {}
        step = selection.get("chosen_iteration", "last")
        base = results.get("base", {}).get("benchmarks", {}).get("test", {}).get("mean_at_k")
        rft = results.get("rft", {}).get("benchmarks", {}).get("test", {}).get("mean_at_k")
        change = "-" if base is None or rft is None else f"{100 * (rft - base):+.1f}"
        base_cell = "-" if base is None else f"{100 * base:.1f}"
        lines.append(
            f"| {c.get('seed', '?')} | {100 * c.get('correct_fraction', 0):.1f}% "
            f"| {100 * c.get('mixed_fraction', 0):.1f}% | {step} | {base_cell} | {change} |"
        )
    return "\n".join(lines)


def write_results(
    out_dir: Path,
    summary: dict,
    per_seed: list[dict],
    config: dict,
    k: int,
    paired: dict | None = None,
    wall_s: float | None = None,
) -> Path:
    path = out_dir / "results.json"
    payload = {
        "k": k,
        "seeds": len(per_seed),
        "methods": summary,
        # method - base and method - rft, paired by seed and problem, 95% bootstrap intervals.
        "paired": paired or {},
        "competence": [run.get("competence") for run in per_seed],
        "wall_s": None if wall_s is None else round(wall_s, 1),
        "config": config,
        "per_seed": [
            {key: run.get(key) for key in ("lrs", "data", "timings_s", "skipped", "base_selection")}
            for run in per_seed
        ],
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path


def _loss_curves(seed_dir: Path) -> dict[str, list[tuple[int, float]]]:
    curves = {}
    for metrics in sorted(seed_dir.glob("methods/*/metrics.jsonl")):
        points = []
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if "loss" in record and "step" in record:
                points.append((record["step"], record["loss"]))
        curves[metrics.parent.name] = points
    return curves


def plot(out_dir: Path, summary: dict, k: int, seed_dir: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    methods = list(summary)
    splits = [s for s in SPLIT_LABELS if any(s in v for v in summary.values())]
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    # With several seeds the bases differ, so the change from the same seed's base is what compares.
    paired = any(f"mean@{k}_change_from_base" in e for v in summary.values() for e in v.values())
    if paired:
        methods = [m for m in methods if m != "base"]
    key = f"mean@{k}_change_from_base" if paired else f"mean@{k}"
    width = 0.8 / max(1, len(splits))
    for i, split in enumerate(splits):
        values = [summary[m].get(split, {}).get(key, 0.0) for m in methods]
        errors = [
            summary[m].get(split, {}).get(f"{key}_std" if paired else f"mean@{k}_std", 0.0)
            for m in methods
        ]
        xs = [j + (i - (len(splits) - 1) / 2) * width for j in range(len(methods))]
        acc.bar(xs, values, width, yerr=errors, capsize=3, label=SPLIT_LABELS[split])
    acc.set_xticks(range(len(methods)), methods, rotation=20)
    if paired:
        acc.axhline(0, color="black", linewidth=0.8)
        acc.set_ylabel(f"Mean@{k} − base of the same seed (points)")
        acc.set_title("Change from the base (mean ± std over seeds)")
    else:
        acc.set_ylabel(f"Mean@{k} (%)")
        acc.set_title("Accuracy per method")
    acc.legend()
    for method, points in _loss_curves(seed_dir).items():
        if points:
            loss.plot([p[0] for p in points], [p[1] for p in points], label=method)
    loss.set_xlabel("step")
    loss.set_ylabel("training loss (per token; dpo, simpo per pair; kto per sample)")
    loss.set_yscale("symlog", linthresh=1.0)
    loss.set_title("Fine-tuning loss (first seed)")
    loss.legend()
    fig.tight_layout()
    path = out_dir / "results.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_reports(
    out_dir: Path, per_seed: list[dict], config: dict, k: int, wall_s: float | None = None
) -> tuple[str, Path | None]:
    """``results.md`` (the table, then the paired differences), ``results.json`` and
    ``results.png`` from the seeds' run records (each seed's ``run.json``, so seeds run as separate
    jobs can be reported together). Returns the markdown and the plot's path."""
    summary = aggregate(per_seed, k)
    paired = comparisons(per_seed, ("base", "rft"), tuple(SPLIT_LABELS))
    table = markdown(summary, k, len(per_seed))
    if paired:
        table += (
            f"\n\nMean@{k} change (points), paired by seed and problem, with its 95% bootstrap "
            "interval over problems; an interval containing 0 is a tie:\n\n"
            + paired_markdown(paired, k)
        )
    table += "\n\nPer seed:\n\n" + seeds_markdown(per_seed, k)
    (out_dir / "results.md").write_text(table + "\n")
    write_results(out_dir, summary, per_seed, config, k, paired, wall_s)
    first_seed = out_dir / f"seed{config.get('seed', 0)}"
    return table, plot(out_dir, summary, k, first_seed)
