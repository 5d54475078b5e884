"""The demo's settings: sizes, the tiny model, and each method's data and learning rate.

Every number here is a CPU-sized default chosen so the whole pipeline fits in minutes on 2 cores;
``megatron-rift demo --help`` lists the ones a user can change.
"""

from __future__ import annotations

import dataclasses

from megatron_rift.objectives import Objective, Unit, objective_names, objectives


# Each method is a registered objective; what it trains on follows from the objective's entry.
# "expert": the train problems' ground-truth solutions written in an expert style of their own (as
# MATH's reference solutions differ from a model's own), for objectives that use no rewards;
# "positives": only the correct rollouts (RFT's dataset); "pairs": each rollout against its
# problem's expert solution, the rollout preferred when correct (paper section 4.1's DPO pairs);
# "rollouts": the base model's own K samples with constant rewards +1 / -0.2. DPO and KTO use
# reference log-probs of the base, precomputed once per dataset (tools/compute_ref_logprobs.py).
def training_data(objective: Objective) -> str:
    """Which of the demo's datasets ``objective`` trains on."""
    if objective.unit is Unit.PAIR:
        return "pairs"
    if not objective.uses_rewards:
        return "expert"
    return "positives" if objective.positives_only else "rollouts"


METHODS = objective_names()
# The default run: the objectives marked ``in_demo`` in the registry (the paper's main comparison,
# tables 2-3, plus the naive loss). KTO and SimPO (its tables 9-10) are opt-in (`--methods all`),
# which keeps the default run within 15 minutes on 2 cores.
DEFAULT_METHODS = tuple(o.name for o in objectives() if o.in_demo)

# Every method's learning rate, chosen by `--sweep-lr` on the validation split of the built-in
# task (seed 0; never the test splits). Validation Mean@8 (%) at 3e-5 / 1e-4 / 3e-4:
#   sft 39.3 / 37.3 / 28.5, dft 39.1 / 37.5 / 31.1, rft 38.5 / 38.3 / 38.1, rift 38.1 / 35.4 / 28.7.
# Every method chose the smallest rate: on this task fine-tuning mostly costs accuracy (README, "The
# demo"). The paper's values (2e-6 / 1e-5) are for billion-parameter models and far too small for
# this ~1M-parameter model.
DEFAULT_METHOD_LR = 3e-5
# The grid `--sweep-lr` tries (`--sweep-lrs` changes it). At 3e-4 (the base's final lr) every method
# fell below the base on the built-in task, so the grid reaches a decade lower.
SWEEP_LRS = (3e-5, 1e-4, 3e-4)


@dataclasses.dataclass
class DemoConfig:
    output_dir: str
    seed: int = 0
    # Task sizes (problems per split).
    base_problems: int = 20000
    train_problems: int = 128
    val_problems: int = 64
    test_problems: int = 100
    ood_problems: int = 100
    problems_file: str | None = None  # a user's problems instead of the built-in task
    # Rollouts and evaluation.
    samples_per_problem: int = 8  # K
    temperature: float = 0.7
    top_p: float = 0.8
    max_new_tokens: int = 96
    positive_reward: float = 1.0
    negative_reward: float = -0.2
    # The tiny base model (Llama-style: RMSNorm, SwiGLU, RoPE, GQA).
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 352
    vocab_size: int = 384
    seq_length: int = 160
    # Base pretraining: to convergence with cosine decay (a partly competent base because the task
    # is hard for it, not because it was stopped early).
    # Competence appears abruptly after ~1000-1500 optimizer steps at batch 16 (measured with a
    # plain-PyTorch proxy of this model: 14% ID accuracy at 1000 steps, 65% at 1500), so the base
    # takes many small steps: 1.2 epochs of 20k problems at batch 16 = 1500 steps.
    base_epochs: float = 1.2
    base_lr: float = 3e-3
    base_global_batch: int = 16
    # None: the base is the run's last checkpoint. A share (e.g. 0.5): the newest checkpoint, one
    # every base_checkpoint_interval steps, whose competence on base_holdout_problems pretraining
    # problems held out of its data is at most this (demo/base_selection.py says why).
    base_competence_ceiling: float | None = None
    base_checkpoint_interval: int = 250
    base_holdout_problems: int = 128
    # Fine-tuning, the paper's recipe scaled down: AdamW, cosine, 5% warmup, global batch 64, 3 epochs.
    finetune_epochs: float = 3.0
    finetune_global_batch: int = 64
    micro_batch_size: int = 16
    method_lr: dict = dataclasses.field(
        default_factory=lambda: dict.fromkeys(objective_names(), DEFAULT_METHOD_LR)
    )
    methods: tuple = DEFAULT_METHODS
    sweep_lr: bool = False
    sweep_lrs: tuple = SWEEP_LRS
    sweep_extensions: int = 0  # rates tried past the grid's edge when the best sits on it
    # With several seeds: False sweeps on the first seed's validation split and reuses its rates
    # for the others (the paper's practice: one rate per method); True sweeps every seed.
    sweep_every_seed: bool = False
    tensor_parallel: int = 1
    rounds: int = 1  # 2: iterative RIFT (paper appendix A.2)
    # With `naive` among the methods: more runs of it at these lrs (and at RIFT's, if its own
    # differs), to show where the unbounded loss collapses (their loss curves are in the plot).
    naive_collapse_lrs: tuple = ()
