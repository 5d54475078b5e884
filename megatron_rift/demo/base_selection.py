"""The base checkpoint chosen by its competence on held-out pretraining problems.

Competence appears abruptly while the tiny base pretrains: at the same step count the default
demo's bases got 18%, 37% and 89% of their rollouts right on three seeds, so a fixed number of steps
lands each seed at a different point of that rise, and seeds compare a nearly useless base with a
nearly perfect one. With ``base_competence_ceiling`` set, the base saves a checkpoint every
``base_checkpoint_interval`` steps and the demo takes the newest one whose share of right samples
on problems held out of the pretraining split is at most the ceiling. Every seed then starts from
a partly competent base. The held-out problems are never trained on, and neither the validation
nor the test splits take part in the choice.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from megatron_rift.checkpoint_layout import TRACKER_FILE
from megatron_rift.demo import stages
from megatron_rift.demo.config import DemoConfig
from megatron_rift.demo.task import Problem


def _iteration(folder: Path) -> int:
    return int(folder.name.removeprefix("iter_"))


def held_out_competence(
    iteration_dir: Path, problems: list[Problem], cfg: DemoConfig, seed: int, scratch: Path
) -> float:
    """Share of right samples (K per problem) of one checkpoint on ``problems``."""
    hf = stages.export_hf(iteration_dir, scratch / iteration_dir.name, scratch)
    records = stages.sample(
        hf, problems, cfg, scratch / f"{iteration_dir.name}.jsonl", seed=seed, show_progress=False
    )
    shutil.rmtree(hf)  # only its samples are kept
    return sum(bool(r["correct"]) for r in records) / max(1, len(records))


def select_base_checkpoint(
    ckpt_root: Path, holdout: list[Problem], cfg: DemoConfig, seed: int, scratch: Path
) -> dict:
    """Point ``ckpt_root``'s tracker at the newest checkpoint whose held-out competence is at most
    ``cfg.base_competence_ceiling`` (the earliest one when every checkpoint is above it).

    Checkpoints are scored newest first and the search stops at the first one under the ceiling,
    so a base that ends in the band costs one evaluation. Returns what was measured, for run.json.
    """
    ceiling = cfg.base_competence_ceiling
    iterations = sorted(ckpt_root.glob("iter_*"), key=_iteration)
    if not iterations:
        raise stages.StageError(f"{ckpt_root}: the base run saved no checkpoint")
    scores: dict[int, float] = {}
    chosen = iterations[0]
    for folder in reversed(iterations):
        scores[_iteration(folder)] = held_out_competence(folder, holdout, cfg, seed, scratch)
        if scores[_iteration(folder)] <= ceiling:
            chosen = folder
            break
    # Fine-tuning, the reference log-probs and the HF export all follow the tracker.
    (ckpt_root / TRACKER_FILE).write_text(f"{_iteration(chosen)}\n")
    return {
        "ceiling": ceiling,
        "held_out_problems": len(holdout),
        "chosen_iteration": _iteration(chosen),
        "final_iteration": _iteration(iterations[-1]),
        "held_out_competence": {str(k): round(v, 4) for k, v in sorted(scores.items())},
    }
