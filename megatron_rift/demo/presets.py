"""Named demo configurations (``megatron-rift demo --preset NAME``); explicit flags override them.

``evidence`` is the configuration for issue 19's question (does RIFT beat RFT here, with intervals
that can say so?). Its values come from the base's behaviour and the validation split, never the
test splits (docs/demo_results.md has the measurements):

* the base: competence appears abruptly while it pretrains (one seed's held-out share of right
  samples: 21% at step 1500, 50% at 1750, 64% at 2000, 76% at 2484), so a fixed step count lands
  seeds at different points of the rise (the default's bases: 18% / 37% / 89%). The base trains
  2 epochs, saving every 100 steps, and the demo takes the newest checkpoint with at most 40% of
  held-out pretraining problems' samples right (demo/base_selection.py);
* post-training: from such a base (46% of rollouts right) RFT gained 1.9-3.8 validation points on
  384 problems at 2 epochs whatever the lr (1e-4-1e-3) or batch (16, 64), and 4.6 on 768 problems
  at 1 epoch (same cost): more problems is what moves it, so 1024 problems at 1 epoch;
* rates: per method on the first seed's validation split over 1e-4 / 3e-4 / 1e-3 (fine-tuning
  starts from a base still training at ~1e-3), extended past an edge when the best sits on it;
  the other seeds reuse them; RIFT's variants and the naive loss train at RIFT's rate.
* 300 ID test problems resolve about 3 points per seed; OOD (which the base barely solves) 200.
"""

from __future__ import annotations

from megatron_rift.demo.config import DEFAULT_METHODS
from megatron_rift.demo.methods import TABLE6

# KTO and SimPO (the paper's tables 9-10) are left out to keep one seed under ~30 minutes on 2 cores;
# `--methods` adds them.
EVIDENCE_METHODS = (
    *DEFAULT_METHODS,
    "rift-divergent",
    *(m for m in TABLE6 if m not in DEFAULT_METHODS),
)

PRESETS: dict[str, dict] = {
    "default": {},
    "evidence": dict(
        seeds=3,
        methods=EVIDENCE_METHODS,
        base_epochs=2.0,  # ~2480 steps at batch 16; the base is chosen among its checkpoints
        base_competence_ceiling=0.40,
        base_checkpoint_interval=100,
        train_problems=1024,
        val_problems=128,
        test_problems=300,
        ood_problems=200,
        finetune_epochs=1.0,
        sweep_lr=True,
        sweep_lrs=(1e-4, 3e-4, 1e-3),
        sweep_extensions=1,  # issue item 3: a best rate on the grid's edge is bracketed
        # Naive also runs at RIFT's rate; these show where it collapses if it does not there.
        naive_collapse_lrs=(1e-3, 3e-3),
    ),
}
# Keys of a preset that are not DemoConfig fields (the CLI reads them).
RUN_KEYS = ("seeds", "methods")
