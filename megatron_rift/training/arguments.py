"""Command-line flags of ``megatron-rift train``: Megatron-LM's names where they exist, ours otherwise.

This module imports nothing heavy (no torch, no Megatron): every rank parses and validates its flags
before it initializes anything, so a bad configuration fails in a second on every rank.

Defaults follow the paper's recipe (section 4.1) where it gives one, and say where they come from
where it does not (see ``docs/training.md``, "Defaults").
"""

from __future__ import annotations

import argparse

# Kept in sync with megatron_rift.losses (importing it would import torch); a test checks equality.
OBJECTIVES = ("sft", "dft", "rft", "rift", "naive", "dpo", "kto", "simpo")
PREFERENCE_OBJECTIVES = ("dpo", "kto", "simpo")
REFERENCE_MODES = ("precomputed", "online")
NEGATIVE_MODES = ("token", "sequence", "geometric")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")

# Paper section 4.1 recipe.
PAPER_GLOBAL_BATCH_SIZE = 64
PAPER_EPOCHS = 3
PAPER_WARMUP_FRACTION = 0.05
PAPER_DECAY_STYLE = "cosine"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-rift train",
        description="Fine-tune a GPT model with RIFT (or SFT/DFT/RFT/naive) on Megatron-Core. "
                    "Launch with torchrun; data parallel size = world size / (TP x PP).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_data_and_objective(parser)
    _add_preference(parser)
    _add_parallel_and_batch(parser)
    _add_optimizer(parser)
    _add_precision(parser)
    _add_checkpointing(parser)
    _add_logging(parser)
    _add_architecture(parser)
    return parser


def _add_data_and_objective(parser):
    g = parser.add_argument_group("data and objective")
    g.add_argument("--data-path", required=True, metavar="PREFIX",
                   help="packed rollout dataset written by tools/pack_rollouts.py "
                        "(PREFIX.bin/.idx/.rewards.npy/.json)")
    g.add_argument("--objective", default="rift", choices=OBJECTIVES,
                   help="training objective (megatron_rift/losses.py)")
    g.add_argument("--negative-mode", default="token", choices=NEGATIVE_MODES,
                   help="how RIFT scores negative samples: per token p_t (default, paper's "
                        "practical form), whole-sequence probability, or geometric mean")
    g.add_argument("--sequence-packing", action="store_true",
                   help="pack several rollouts into each row of seq-length tokens "
                        "(block-causal attention; TE uses the THD packed format)")
    g.add_argument("--no-shuffle", action="store_true",
                   help="read the dataset in order instead of a seeded shuffle per epoch")


def _add_preference(parser):
    g = parser.add_argument_group(
        "preference baselines (dpo, kto, simpo); batch sizes count pairs (dpo, simpo) or "
        "samples (kto), each trained together with its partner sequence")
    g.add_argument("--beta", type=float, default=None,
                   help="inverse temperature (default: dpo/kto 0.1, simpo 2.0)")
    g.add_argument("--simpo-gamma", type=float, default=1.0, help="SimPO target reward margin")
    g.add_argument("--kto-desirable-weight", type=float, default=1.0, help="KTO lambda_D")
    g.add_argument("--kto-undesirable-weight", type=float, default=1.0, help="KTO lambda_U")
    g.add_argument("--reference", choices=REFERENCE_MODES, default="precomputed",
                   help="dpo/kto reference log-probs: read from --ref-logprobs (written once by "
                        "tools/compute_ref_logprobs.py; memory as SFT), or computed by a frozen "
                        "copy of the starting model kept in memory (PP=1 only)")
    g.add_argument("--ref-logprobs", default=None, metavar="PATH",
                   help="precomputed reference log-probs (default: DATA_PATH.ref_logprobs)")


def _add_parallel_and_batch(parser):
    g = parser.add_argument_group("parallelism and batch")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--micro-batch-size", type=int, default=1,
                   help="rollouts per micro-batch on each data-parallel rank")
    g.add_argument("--global-batch-size", type=int, default=PAPER_GLOBAL_BATCH_SIZE,
                   help="rollouts per optimizer step over all ranks (paper: 64)")
    g.add_argument("--seq-length", type=int, default=None,
                   help="tokens per row; default: the longest rollout, rounded up to 16")
    g.add_argument("--train-iters", type=int, default=None,
                   help="optimizer steps; overrides --epochs")
    g.add_argument("--epochs", type=float, default=PAPER_EPOCHS,
                   help="passes over the dataset when --train-iters is not given (paper: 3)")
    g.add_argument("--seed", type=int, default=1234)


def _add_optimizer(parser):
    g = parser.add_argument_group("optimizer (AdamW) and learning-rate schedule")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate; default per objective (paper: 2e-6 for rift/naive, "
                        "1e-5 for sft/dft/rft)")
    g.add_argument("--min-lr", type=float, default=0.0,
                   help="learning rate at the end of the decay")
    g.add_argument("--lr-decay-style", default=PAPER_DECAY_STYLE, choices=LR_DECAY_STYLES)
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help=f"fraction of steps for linear warmup (default {PAPER_WARMUP_FRACTION}, "
                        "paper: 5%%)")
    g.add_argument("--lr-warmup-iters", type=int, default=None,
                   help="warmup steps (instead of --lr-warmup-fraction)")
    g.add_argument("--lr-decay-iters", type=int, default=None,
                   help="steps over which the lr decays; default: all training steps")
    g.add_argument("--weight-decay", type=float, default=0.0,
                   help="decoupled (AdamW) weight decay; the paper gives none")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0, help="global gradient-norm clip")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard optimizer state over data-parallel ranks (ZeRO-1)")


def _add_precision(parser):
    g = parser.add_argument_group("precision")
    p = g.add_mutually_exclusive_group()
    p.add_argument("--bf16", action="store_true", help="bf16 weights/activations, fp32 master")
    p.add_argument("--fp16", action="store_true", help="fp16 with dynamic loss scaling")
    g.add_argument("--fp8-format", choices=("e4m3", "hybrid"), default=None,
                   help="FP8 GEMMs through Transformer Engine (needs TE and a GPU with FP8)")
    g.add_argument("--fp8-recipe", choices=("delayed", "tensorwise", "mxfp8", "blockwise"),
                   default="delayed", help="TE FP8 scaling recipe")
    g.add_argument("--transformer-impl", choices=("auto", "transformer_engine", "local"),
                   default="auto", help="layer implementation; auto = TE when it runs here")


def _add_checkpointing(parser):
    g = parser.add_argument_group("checkpointing")
    g.add_argument("--load", default=None,
                   help="checkpoint root to start from: a trainer checkpoint resumes exactly; a "
                        "converted model (tracker 'release') starts fine-tuning at step 0; an "
                        "empty or missing folder falls back to --pretrained-checkpoint")
    g.add_argument("--pretrained-checkpoint", default=None,
                   help="converted model to fine-tune from when --load holds no checkpoint "
                        "(so --load = --save restarts a crashed job from its last save)")
    g.add_argument("--ckpt-step", type=int, default=None,
                   help="load this iteration from --load instead of the tracker's")
    g.add_argument("--finetune", action="store_true",
                   help="take only the model weights from --load and start at step 0")
    g.add_argument("--no-load-optim", action="store_true",
                   help="do not load optimizer and scheduler state when resuming")
    g.add_argument("--no-load-rng", action="store_true", help="do not restore RNG states")
    g.add_argument("--save", default=None, help="checkpoint root to write")
    g.add_argument("--save-interval", type=int, default=None,
                   help="save every N steps (and always at the end when --save is given)")
    g.add_argument("--keep-last-checkpoints", type=int, default=None,
                   help="delete older iter_* folders after each save, keeping this many")


def _add_logging(parser):
    g = parser.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=1,
                   help="print the progress line every N steps (metrics.jsonl gets every step)")
    g.add_argument("--log-file", default=None, metavar="metrics.jsonl",
                   help="one JSON object per step: step, loss, lr, grad_norm, tokens, "
                        "tokens_per_s and the objective's metrics")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--wandb-project", default=None)
    g.add_argument("--wandb-exp-name", default=None)


def _add_architecture(parser):
    g = parser.add_argument_group(
        "architecture (from-scratch models; a checkpoint's model_config.json wins, and a flag "
        "that contradicts it is an error)")
    for flag, kind in (("--num-layers", int), ("--hidden-size", int),
                       ("--num-attention-heads", int), ("--num-query-groups", int),
                       ("--ffn-hidden-size", int), ("--kv-channels", int),
                       ("--max-position-embeddings", int), ("--rotary-base", float),
                       ("--norm-epsilon", float)):
        g.add_argument(flag, type=kind, default=None)
    g.add_argument("--vocab-size", type=int, default=None,
                   help="tokenizer vocabulary before padding (default: the dataset's PREFIX.json)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                   help="pad the vocabulary to a multiple of this x TP (default 128)")
    g.add_argument("--normalization", choices=("RMSNorm", "LayerNorm"), default=None)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None)
    g.add_argument("--add-qkv-bias", action="store_true", default=None)
    g.add_argument("--qk-layernorm", action="store_true", default=None)
    g.add_argument("--swiglu", action=argparse.BooleanOptionalAction, default=None)


# Flag name (argparse dest) -> GPTArchitecture field, for the from-scratch architecture.
ARCH_FLAGS = {
    "num_layers": "num_layers", "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads", "num_query_groups": "num_query_groups",
    "ffn_hidden_size": "ffn_hidden_size", "kv_channels": "kv_channels",
    "max_position_embeddings": "max_position_embeddings", "rotary_base": "rotary_base",
    "norm_epsilon": "norm_epsilon", "vocab_size": "vocab_size",
    "make_vocab_size_divisible_by": "make_vocab_size_divisible_by",
    "normalization": "normalization", "add_qkv_bias": "add_qkv_bias",
    "qk_layernorm": "qk_layernorm", "swiglu": "swiglu",
}


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)
