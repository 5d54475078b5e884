"""Resolve the flags into a :class:`RunPlan` and reject bad configurations before any heavy work.

Every rank runs :func:`resolve_plan` on the same flags and the same files, before torch.distributed
or Megatron is initialized, so every rank reaches the same verdict: a bad configuration ends each
rank with one message and a non-zero exit instead of a hang in the first collective. Only the
standard library (and torch, for the FP8 check) is imported here.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
from pathlib import Path

from megatron_rift.training.arguments import ARCH_FLAGS, OBJECTIVES, PREFERENCE_OBJECTIVES

# Same names as megatron_rift.checkpointing / megatron_rift.model.config (not imported here:
# they import Megatron). tests/test_train_validation.py checks they agree.
TRACKER_FILE = "latest_checkpointed_iteration.txt"
MODEL_CONFIG_FILE = "model_config.json"
DEFAULT_LR = {"sft": 1e-5, "dft": 1e-5, "rft": 1e-5, "rift": 2e-6, "naive": 2e-6, "dpo": 2e-6,
              "kto": 2e-6, "simpo": 2e-6}
DATA_SUFFIXES = (".bin", ".idx", ".rewards.npy", ".json")


class ConfigError(ValueError):
    """A configuration the trainer cannot run; the message says what to change."""


@dataclasses.dataclass
class RunPlan:
    """Everything the trainer derives from flags and files before it starts."""

    world_size: int
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    num_microbatches: int
    lr: float
    train_iters: int
    warmup_iters: int
    decay_iters: int
    num_samples: int
    dataset_info: dict
    arch_fields: dict  # GPTArchitecture(**arch_fields)
    arch_source: str  # where the architecture came from (a model_config.json, or "flags")
    start: str  # "resume", "finetune" or "scratch"
    start_dir: str | None  # checkpoint root to read weights (and state, when resuming) from
    start_iteration: int | str | None  # iteration to read, "release", or None


def _fail(message: str) -> None:
    raise ConfigError(message)


def read_tracker(root: str | None) -> int | str | None:
    """The iteration a checkpoint root's tracker names, "release", or None."""
    if not root:
        return None
    path = Path(root) / TRACKER_FILE
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if text == "release":
        return text
    if not text.isdigit():
        _fail(f"{path}: expected an iteration number or 'release', found {text!r}")
    return int(text)


def _check_parallel(args, world_size: int) -> tuple[int, int, int]:
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        _fail(f"--tensor-model-parallel-size ({tp}) and --pipeline-model-parallel-size ({pp}) "
              "must be at least 1")
    if world_size % (tp * pp):
        _fail(f"world size {world_size} is not divisible by tensor-model-parallel-size {tp} x "
              f"pipeline-model-parallel-size {pp} = {tp * pp}; launch a multiple of {tp * pp} "
              "processes or change the parallel sizes")
    return tp, pp, world_size // (tp * pp)


def _check_batch(args, dp: int) -> int:
    mbs, gbs = args.micro_batch_size, args.global_batch_size
    if mbs < 1 or gbs < 1:
        _fail(f"--micro-batch-size ({mbs}) and --global-batch-size ({gbs}) must be at least 1")
    if gbs % (mbs * dp):
        _fail(f"--global-batch-size {gbs} is not divisible by --micro-batch-size {mbs} x "
              f"data-parallel size {dp} = {mbs * dp}; choose a global batch that is a multiple "
              f"of {mbs * dp}")
    return gbs // (mbs * dp)


def _read_dataset_info(prefix: str) -> dict:
    missing = [prefix + s for s in DATA_SUFFIXES if not os.path.isfile(prefix + s)]
    if missing:
        _fail(f"--data-path {prefix}: missing {', '.join(missing)}; pack rollouts with "
              "tools/pack_rollouts.py --output-prefix PREFIX and pass that PREFIX")
    try:
        info = json.loads(Path(prefix + ".json").read_text())
        int(info["rollouts"]), int(info["tokenizer"]["vocab_size"])
    except (ValueError, KeyError, TypeError) as err:
        _fail(f"{prefix}.json is not a packed-dataset description ({err!r}); re-pack the data")
    return info


def _architecture(args, dataset_vocab: int, config_dir: str | None) -> tuple[dict, str]:
    """GPTArchitecture fields from a checkpoint's model_config.json, else from the flags."""
    given = {field: getattr(args, flag) for flag, field in ARCH_FLAGS.items()
             if getattr(args, flag) is not None}
    if args.untie_embeddings_and_output_weights:
        given["tie_word_embeddings"] = False
    if config_dir is not None:
        path = Path(config_dir) / MODEL_CONFIG_FILE
        if not path.is_file():
            _fail(f"{path} not found: {config_dir} is not a megatron-rift checkpoint "
                  "(convert a model with tools/convert_hf_to_megatron.py)")
        try:
            fields = json.loads(path.read_text())
        except ValueError as err:
            _fail(f"{path}: not valid JSON ({err})")
        clashes = [f"--{name.replace('_', '-')}={value} but {path} says {fields.get(name)}"
                   for name, value in given.items() if name in fields and fields[name] != value]
        if clashes:
            _fail("architecture flags contradict the checkpoint: " + "; ".join(clashes)
                  + ". Drop these flags (the checkpoint defines the model).")
        return fields, str(path)
    fields = dict(given)
    fields.setdefault("vocab_size", dataset_vocab)
    return fields, "flags"


def _check_architecture(fields: dict, tp: int, pp: int, dataset_vocab: int, source: str) -> None:
    # Mirrors GPTArchitecture's defaults (None -> these) without importing Megatron.
    heads = fields.get("num_attention_heads") or 4
    hidden = fields.get("hidden_size") or 64
    groups = fields.get("num_query_groups") or heads
    ffn = fields.get("ffn_hidden_size") or 4 * hidden
    layers = fields.get("num_layers") or 2
    vocab = fields.get("vocab_size") or dataset_vocab
    problems = []
    for name, value, size, flag in (("num_attention_heads", heads, tp, "tensor"),
                                    ("num_query_groups", groups, tp, "tensor"),
                                    ("ffn_hidden_size", ffn, tp, "tensor"),
                                    ("num_layers", layers, pp, "pipeline")):
        if value % size:
            problems.append(f"{name}={value} is not divisible by --{flag}-model-parallel-size "
                            f"{size}")
    if problems:
        _fail(f"the model ({source}) cannot be split: " + "; ".join(problems))
    if vocab < dataset_vocab:
        _fail(f"the model's vocab_size {vocab} ({source}) is smaller than the dataset "
              f"tokenizer's {dataset_vocab}: token ids would fall outside the embedding. Use the "
              "tokenizer the model was converted with, or raise --vocab-size")


def _check_precision(args) -> None:
    if args.fp8_format is None:
        return
    if args.transformer_impl == "local":
        _fail("--fp8-format needs Transformer Engine layers; drop --transformer-impl local")
    if importlib.util.find_spec("transformer_engine") is None:
        _fail("--fp8-format needs Transformer Engine (pip install transformer-engine[pytorch], "
              "or use NVIDIA's PyTorch container); it is not installed here")
    import torch

    if not torch.cuda.is_available():
        _fail("--fp8-format needs a CUDA GPU; none is visible")
    if torch.cuda.get_device_capability() < (8, 9):
        _fail(f"--fp8-format needs an FP8-capable GPU (Ada/Hopper or newer, compute capability "
              f">= 8.9); this one is {torch.cuda.get_device_capability()}")
    if not (args.bf16 or args.fp16):
        _fail("--fp8-format runs FP8 GEMMs inside a bf16/fp16 model: add --bf16")


def _check_outputs(args) -> None:
    if args.tensorboard_dir and importlib.util.find_spec("tensorboard") is None:
        _fail("--tensorboard-dir needs the tensorboard package (pip install tensorboard, or megatron-rift[monitor])")
    if args.wandb_project and importlib.util.find_spec("wandb") is None:
        _fail("--wandb-project needs the wandb package (pip install wandb, or megatron-rift[monitor])")
    if args.save_interval is not None and args.save_interval < 1:
        _fail(f"--save-interval must be at least 1, got {args.save_interval}")
    if args.save_interval is not None and not args.save:
        _fail("--save-interval needs --save DIR")


def _start_point(args) -> tuple[str, str | None, int | str | None]:
    """(start, dir, iteration): resume a trainer checkpoint, fine-tune from weights, or scratch."""
    loaded = read_tracker(args.load)
    if args.load and args.ckpt_step is not None:
        loaded = args.ckpt_step
        if not (Path(args.load) / f"iter_{loaded:07d}").is_dir():
            _fail(f"--ckpt-step {loaded}: {args.load}/iter_{loaded:07d} does not exist")
    if loaded is not None:
        if loaded == "release" or args.finetune:
            return "finetune", args.load, loaded
        return "resume", args.load, loaded
    if args.pretrained_checkpoint:
        pre = read_tracker(args.pretrained_checkpoint)
        if pre is None:
            _fail(f"--pretrained-checkpoint {args.pretrained_checkpoint} has no {TRACKER_FILE}: "
                  "not a checkpoint root (convert one with tools/convert_hf_to_megatron.py)")
        return "finetune", args.pretrained_checkpoint, pre
    if args.load and not Path(args.load).exists() and args.load != args.save:
        # A typo in --load must not silently train from random weights.
        _fail(f"--load {args.load} does not exist (to restart a job from its own saves, pass the "
              "same folder to --load and --save)")
    return "scratch", None, None


def _schedule(args, num_samples: int, world: str) -> tuple[int, int, int]:
    batches_per_epoch = num_samples // args.global_batch_size
    if batches_per_epoch == 0:
        _fail(f"the dataset has {num_samples} rollouts, fewer than one global batch of "
              f"{args.global_batch_size}; lower --global-batch-size")
    if args.train_iters is not None:
        iters = args.train_iters
    else:
        iters = int(math.ceil(args.epochs * batches_per_epoch))
    if iters < 1:
        _fail(f"nothing to train: {iters} steps ({world})")
    decay = args.lr_decay_iters or iters
    if args.lr_warmup_iters is not None and args.lr_warmup_fraction is not None:
        _fail("give --lr-warmup-iters or --lr-warmup-fraction, not both")
    if args.lr_warmup_iters is not None:
        warmup = args.lr_warmup_iters
    else:
        fraction = 0.05 if args.lr_warmup_fraction is None else args.lr_warmup_fraction
        if not 0.0 <= fraction < 1.0:
            _fail(f"--lr-warmup-fraction must be in [0, 1), got {fraction}")
        warmup = int(round(fraction * decay))
    if warmup >= decay and args.lr_decay_style != "constant":
        _fail(f"warmup ({warmup} steps) must be shorter than the decay ({decay} steps)")
    return iters, warmup, decay


def _training_units(args, info: dict, pp: int, start: str) -> tuple[int, str]:
    """How many units the sampler draws from, and their name: rollouts, pairs or samples."""
    if args.objective not in PREFERENCE_OBJECTIVES:
        return int(info["rollouts"]), "rollouts"
    if args.objective in ("dpo", "kto") and args.reference == "online":
        if pp > 1:
            _fail("--reference online keeps a frozen copy of the model next to the policy and "
                  "runs it inside each micro-batch, which needs the whole model on each rank: "
                  "use --pipeline-model-parallel-size 1, or --reference precomputed")
        if start == "scratch" or (start == "resume" and not args.pretrained_checkpoint):
            _fail("--reference online freezes the model fine-tuning started from: give it with "
                  "--pretrained-checkpoint (also when resuming from --load)")
    if args.beta is not None and not args.beta > 0:
        _fail(f"--beta must be positive, got {args.beta}")
    if args.kto_desirable_weight < 0 or args.kto_undesirable_weight < 0:
        _fail("--kto-desirable-weight and --kto-undesirable-weight must be >= 0")
    if args.objective in ("dpo", "simpo"):
        if not info.get("pairs"):
            _fail(f"--objective {args.objective} trains on (chosen, rejected) pairs, but "
                  f"{args.data_path} is a plain rollout dataset: pack it with "
                  "tools/pack_rollouts.py --pairs ground-truth (rollouts with a 'solution' field) "
                  "or --pairs given (records with chosen/rejected)")
        return int(info["num_pairs"]), "pairs"
    import numpy as np  # kto: samples with a non-zero training reward

    rewards = np.load(args.data_path + ".rewards.npy", mmap_mode="r")["reward"]
    return int(np.count_nonzero(rewards)), "samples with a non-zero reward"


def resolve_plan(args: argparse.Namespace, world_size: int) -> RunPlan:
    """Validate ``args`` for ``world_size`` processes; raise :class:`ConfigError` on the first
    problem. Reads only small files (PREFIX.json, model_config.json, tracker files)."""
    if args.objective not in OBJECTIVES:
        _fail(f"--objective {args.objective!r}: choose one of {', '.join(OBJECTIVES)}")
    tp, pp, dp = _check_parallel(args, world_size)
    num_micro = _check_batch(args, dp)
    info = _read_dataset_info(args.data_path)
    _check_precision(args)
    _check_outputs(args)
    if args.seq_length is not None and args.seq_length < 2:
        _fail(f"--seq-length must be at least 2, got {args.seq_length}")
    start, start_dir, start_iter = _start_point(args)
    dataset_vocab = int(info["tokenizer"]["vocab_size"])
    fields, source = _architecture(args, dataset_vocab, start_dir)
    _check_architecture(fields, tp, pp, dataset_vocab, source)
    num_samples, unit = _training_units(args, info, pp, start)
    iters, warmup, decay = _schedule(args, num_samples, f"{num_samples} {unit}")
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.objective]
    if args.min_lr > lr:
        _fail(f"--min-lr {args.min_lr} is above the peak lr {lr}")
    return RunPlan(world_size, tp, pp, dp, num_micro, lr, iters, warmup, decay, num_samples, info,
                   fields, source, start, start_dir, start_iter)
