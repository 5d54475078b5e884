"""Named demo configurations (``megatron-rift demo --preset NAME``); explicit flags override them.

``evidence`` is the configuration for issue 19's question (does RIFT beat RFT here, with intervals
that can say so?). Its values were chosen from what the default run showed about the *base* and
about the validation split (never the test splits): the default base's competence jumped between
seeds (18% / 37% / 89% of rollouts right) because competence appears abruptly during
pretraining, so this base trains on more problems for longer, to a plateau rather than a knife-edge;
128 post-training problems moved no method by more than ~2 points, so it has three times as many;
100 test problems resolve about 5 points, so it has 300 per split; validation picked the old grid's
lowest lr for every method, so the grid reaches a decade lower. Whether RFT then gains >= 5 ID
Mean@8 points on every seed has **not** been measured (docs/demo_results.md).
"""

from __future__ import annotations

from megatron_rift.demo.config import DEFAULT_METHODS
from megatron_rift.demo.methods import TABLE6

EVIDENCE_METHODS = (
    *DEFAULT_METHODS,
    "rift-divergent",
    "kto",
    "simpo",
    *(m for m in TABLE6 if m not in DEFAULT_METHODS),
)

PRESETS: dict[str, dict] = {
    "default": {},
    "evidence": dict(
        seeds=3,
        methods=EVIDENCE_METHODS,
        base_problems=30000,
        base_epochs=2.0,  # ~3750 steps at batch 16, against the default's 1500
        train_problems=384,
        val_problems=128,
        test_problems=300,
        ood_problems=300,
        finetune_epochs=2.0,
        sweep_lr=True,
        sweep_lrs=(1e-5, 3e-5, 1e-4, 3e-4),
        sweep_extensions=2,  # issue item 3: a best rate on the grid's edge is bracketed
        # RIFT's lr is added by the demo; these show where naive collapses if it does not there.
        naive_collapse_lrs=(3e-4, 1e-3),
    ),
}
# Keys of a preset that are not DemoConfig fields (the CLI reads them).
RUN_KEYS = ("seeds", "methods")
