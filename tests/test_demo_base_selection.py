"""The demo's base chosen by held-out competence (demo/base_selection.py): which checkpoint the
tracker ends on, and how many checkpoints were scored to find it."""

import pytest

from megatron_rift.checkpoint_layout import TRACKER_FILE
from megatron_rift.demo import base_selection
from megatron_rift.demo.config import DemoConfig


@pytest.mark.parametrize(
    "scores, ceiling, chosen, scored",
    [
        # Rising competence: the newest checkpoint at or under the ceiling, found from the end.
        ({250: 0.05, 500: 0.30, 750: 0.48, 1000: 0.81}, 0.5, 750, [1000, 750]),
        ({250: 0.05, 500: 0.30, 750: 0.48, 1000: 0.81}, 0.48, 750, [1000, 750]),
        ({250: 0.05, 500: 0.30, 750: 0.48, 1000: 0.81}, 0.2, 250, [1000, 750, 500, 250]),
        # The last checkpoint is already in the band: one evaluation.
        ({250: 0.05, 500: 0.30}, 0.5, 500, [500]),
        # Every checkpoint above the ceiling: the earliest, all of them scored.
        ({250: 0.70, 500: 0.90}, 0.5, 250, [500, 250]),
        # Not monotone: the newest under the ceiling, not the best under it.
        ({250: 0.45, 500: 0.20, 750: 0.60}, 0.5, 500, [750, 500]),
    ],
)
def test_the_newest_checkpoint_under_the_ceiling_becomes_the_base(
    tmp_path, monkeypatch, scores, ceiling, chosen, scored
):
    root = tmp_path / "ckpt"
    for step in scores:
        (root / f"iter_{step:07d}").mkdir(parents=True)
    (root / TRACKER_FILE).write_text(f"{max(scores)}\n")
    seen = []

    def competence(folder, problems, cfg, seed, scratch):  # stands in for sampling the model
        step = int(folder.name.removeprefix("iter_"))
        seen.append(step)
        return scores[step]

    monkeypatch.setattr(base_selection, "held_out_competence", competence)
    cfg = DemoConfig(output_dir=str(tmp_path), base_competence_ceiling=ceiling)
    record = base_selection.select_base_checkpoint(root, [], cfg, 0, tmp_path / "scratch")
    assert seen == scored
    assert (root / TRACKER_FILE).read_text().strip() == str(chosen)
    assert record["chosen_iteration"] == chosen and record["final_iteration"] == max(scores)
    assert record["held_out_competence"] == {str(s): scores[s] for s in sorted(scored)}


def test_a_base_run_without_checkpoints_is_an_error(tmp_path):
    (tmp_path / "ckpt").mkdir()
    cfg = DemoConfig(output_dir=str(tmp_path), base_competence_ceiling=0.5)
    with pytest.raises(base_selection.stages.StageError, match="saved no checkpoint"):
        base_selection.select_base_checkpoint(tmp_path / "ckpt", [], cfg, 0, tmp_path / "s")
