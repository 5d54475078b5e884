"""Check a :class:`TrainConfig` against the world size and the files, and derive the :class:`RunPlan`.

Every rank runs :func:`preflight` on the same configuration and the same files, before
torch.distributed or Megatron is initialized, so every rank reaches the same verdict: a bad
configuration ends each rank with one message and a non-zero exit instead of a hang in the first
collective. Only the standard library and numpy are imported here (torch only for the FP8 check).
The objective's own needs come from its registry entry (:class:`megatron_rift.objectives.Objective`):
its unit, whether it needs reference log-probs, and its extra rules.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path

from packaging.specifiers import SpecifierSet

from megatron_rift.checkpoint_layout import (
    TRACKER_FILE,
    incomplete_reason,
    iteration_dir_name,
    previous_complete,
    unreadable_reason,
)
from megatron_rift.data.errors import RolloutDataError
from megatron_rift.data.format import REF_SUFFIX
from megatron_rift.data.integrity import check_packed_dataset, check_reference_logprobs
from megatron_rift.megatron_compat import installed_version
from megatron_rift.model_source import (
    SHAPE_FIELDS,
    ConfigError,
    check_architecture,
    check_parallel,
    checkpoint_iteration,
    fail,
    resolve_architecture,
)
from megatron_rift.objectives import Objective, Unit, get_objective
from megatron_rift.training.config import (
    CROSS_ENTROPY_FUSIONS,
    CheckpointConfig,
    ObjectiveConfig,
    OptimConfig,
    PrecisionConfig,
    ScheduleConfig,
    TrainConfig,
)
from megatron_rift.training.layout import Layout, check_layout, check_model_layout
from megatron_rift.training.moe_preflight import check_moe


@dataclasses.dataclass
class RunPlan:
    """Everything the trainer derives from the configuration and the files before it starts."""

    world_size: int
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    num_microbatches: int
    lr: float
    train_iters: int
    warmup_iters: int
    decay_iters: int
    num_samples: int  # units the sampler draws from (rollouts, pairs or samples)
    dataset_info: dict
    arch_fields: dict  # GPTArchitecture(**arch_fields)
    arch_source: str  # where the architecture came from (a model_config.json, or "flags")
    start: str  # "resume", "finetune" or "scratch"
    start_dir: str | None  # checkpoint root to read weights (and state, when resuming) from
    start_iteration: int | str | None  # iteration to read, "release", or None
    # Context parallelism and virtual pipeline stages (megatron_rift/training/layout.py).
    layout: Layout = dataclasses.field(default_factory=Layout)
    start_note: str = ""  # why another checkpoint than the tracker's is read (--load-fallback)

    @property
    def loads_weights(self) -> bool:
        """Every weight comes from a checkpoint (so the random initialization can be skipped)."""
        return self.start != "scratch"


def _check_batch(schedule: ScheduleConfig, dp: int) -> int:
    mbs, gbs = schedule.micro_batch_size, schedule.global_batch_size
    if mbs < 1 or gbs < 1:
        fail(f"--micro-batch-size ({mbs}) and --global-batch-size ({gbs}) must be at least 1")
    if gbs % (mbs * dp):
        fail(
            f"--global-batch-size {gbs} is not divisible by --micro-batch-size {mbs} x "
            f"data-parallel size {dp} = {mbs * dp}; choose a global batch that is a multiple "
            f"of {mbs * dp}"
        )
    return gbs // (mbs * dp)


def read_dataset_info(prefix: str) -> dict:
    """The packed dataset's PREFIX.json, after checking every file of it (data/integrity.py)."""
    try:
        return check_packed_dataset(prefix)
    except RolloutDataError as err:
        raise ConfigError(str(err)) from None


def check_precision(precision: PrecisionConfig) -> None:
    if precision.bf16 and precision.fp16:
        fail("give --bf16 or --fp16, not both")
    if precision.fp8_format is None:
        return
    if precision.transformer_impl == "local":
        fail("--fp8-format needs Transformer Engine layers; drop --transformer-impl local")
    if importlib.util.find_spec("transformer_engine") is None:
        fail(
            "--fp8-format needs Transformer Engine (pip install transformer-engine[pytorch], "
            "or use NVIDIA's PyTorch container); it is not installed here"
        )
    import torch

    if not torch.cuda.is_available():
        fail("--fp8-format needs a CUDA GPU; none is visible")
    if torch.cuda.get_device_capability() < (8, 9):
        fail(
            f"--fp8-format needs an FP8-capable GPU (Ada/Hopper or newer, compute capability "
            f">= 8.9); this one is {torch.cuda.get_device_capability()}"
        )
    if not (precision.bf16 or precision.fp16):
        fail("--fp8-format runs FP8 GEMMs inside a bf16/fp16 model: add --bf16")


# GPTModel versions whose output path the fused output layer + CE was checked against: each calls
# output_layer(hidden, weight=...) once and returns its output transposed when labels are None.
CROSS_ENTROPY_FUSION_CHECKED = ">=0.16.1,<=0.19.2"


def check_cross_entropy_fusion(precision: PrecisionConfig) -> None:
    chunk = precision.cross_entropy_fusion_chunk_size
    if not precision.cross_entropy_loss_fusion:
        if chunk is not None:
            fail(
                "--cross-entropy-fusion-chunk-size has no effect without "
                "--cross-entropy-loss-fusion; add it, or drop the chunk size"
            )
        return
    if precision.cross_entropy_fusion_impl not in CROSS_ENTROPY_FUSIONS:
        fail(
            f"--cross-entropy-fusion-impl {precision.cross_entropy_fusion_impl!r}: this trainer "
            f"offers {', '.join(CROSS_ENTROPY_FUSIONS)} (Megatron-LM's native and te fuse only the "
            "softmax and still build the whole micro-batch's logits)"
        )
    if chunk is not None and chunk < 1:
        fail(f"--cross-entropy-fusion-chunk-size must be at least 1 token, got {chunk}")
    version = installed_version()
    if not SpecifierSet(CROSS_ENTROPY_FUSION_CHECKED).contains(version, prereleases=True):
        fail(
            f"--cross-entropy-loss-fusion: megatron-core {version} is installed; the fused output "
            "layer + CE attaches to GPTModel's output layer as megatron-core "
            f"{CROSS_ENTROPY_FUSION_CHECKED} calls it and was not checked against this one: "
            "install a megatron-core in that range, or run without --cross-entropy-loss-fusion"
        )


def _check_outputs(config: TrainConfig) -> None:
    logging, ckpt = config.logging, config.checkpoint
    if logging.tensorboard_dir and importlib.util.find_spec("tensorboard") is None:
        fail(
            "--tensorboard-dir needs the tensorboard package (pip install tensorboard, or "
            "megatron-rift[monitor])"
        )
    if logging.wandb_project and importlib.util.find_spec("wandb") is None:
        fail(
            "--wandb-project needs the wandb package (pip install wandb, or megatron-rift[monitor])"
        )
    if ckpt.save_interval is not None and ckpt.save_interval < 1:
        fail(f"--save-interval must be at least 1, got {ckpt.save_interval}")
    if ckpt.save_interval is not None and not ckpt.save:
        fail("--save-interval needs --save DIR")


def start_point(ckpt: CheckpointConfig) -> tuple[str, str | None, int | str | None]:
    """(start, dir, iteration): resume a trainer checkpoint, fine-tune from weights, or scratch."""
    if ckpt.from_scratch and ckpt.pretrained_checkpoint:
        fail(
            "--from-scratch and --pretrained-checkpoint contradict each other: drop one "
            "(--from-scratch trains randomly initialized weights)"
        )
    loaded = checkpoint_iteration(ckpt.load)
    if ckpt.load and ckpt.ckpt_step is not None:
        loaded = ckpt.ckpt_step
        if not (Path(ckpt.load) / f"iter_{loaded:07d}").is_dir():
            fail(f"--ckpt-step {loaded}: {ckpt.load}/iter_{loaded:07d} does not exist")
    if loaded is not None:
        if loaded == "release" or ckpt.finetune:
            return "finetune", ckpt.load, loaded
        return "resume", ckpt.load, loaded
    if ckpt.pretrained_checkpoint:
        pre = checkpoint_iteration(ckpt.pretrained_checkpoint)
        if pre is None:
            fail(
                f"--pretrained-checkpoint {ckpt.pretrained_checkpoint} has no {TRACKER_FILE}: "
                "not a checkpoint root (convert one with tools/convert_hf_to_megatron.py)"
            )
        return "finetune", ckpt.pretrained_checkpoint, pre
    if ckpt.load and not Path(ckpt.load).exists() and ckpt.load != ckpt.save:
        # A typo in --load must not silently train from random weights.
        fail(
            f"--load {ckpt.load} does not exist (to restart a job from its own saves, pass the "
            "same folder to --load and --save)"
        )
    return "scratch", None, None


def checked_start_point(ckpt: CheckpointConfig) -> tuple[str, str | None, int | str | None, str]:
    """:func:`start_point`, then the checkpoint it names checked for missing or truncated files;
    with ``--load-fallback previous`` an incomplete one gives way to the newest complete one
    before it. Returns (start, dir, iteration, note)."""
    start, start_dir, iteration = start_point(ckpt)
    if start_dir is None:
        return start, start_dir, iteration, ""
    folder = Path(start_dir) / iteration_dir_name(iteration)
    problem = incomplete_reason(folder)
    if problem is None:
        return start, start_dir, iteration, ""
    previous = None
    if isinstance(iteration, int) and start_dir == ckpt.load:
        previous = previous_complete(start_dir, iteration)
    if ckpt.load_fallback == "previous" and previous is not None:
        note = (
            f"checkpoint {folder} is incomplete ({problem}); resuming from the previous complete "
            f"one, {iteration_dir_name(previous)} (--load-fallback previous)"
        )
        return start, start_dir, previous, note
    hint = (
        f" Pass --load-fallback previous to start from {iteration_dir_name(previous)}, the newest "
        "complete checkpoint before it"
        if previous is not None
        else ""
    )
    if not hint:
        hint = " Restore that checkpoint, or point --load / --pretrained-checkpoint elsewhere"
    raise ConfigError(
        f"cannot load {folder} (named by {Path(start_dir) / TRACKER_FILE}): {problem}.{hint}"
    )


def check_model_source(ckpt: CheckpointConfig, given: dict) -> None:
    """A run that starts from no checkpoint must say so: ``--from-scratch`` or the shape flags
    (an empty --load, a typo'd path in a job script, must not train a random model unnoticed)."""
    missing = [f"--{name.replace('_', '-')}" for name in SHAPE_FIELDS if name not in given]
    if not missing:
        return
    if ckpt.from_scratch:
        fail(f"--from-scratch needs the new model's shape: {', '.join(missing)} missing")
    where = (
        f"--load {ckpt.load} holds no checkpoint (no {TRACKER_FILE})"
        if ckpt.load
        else "no --load checkpoint"
    )
    fail(
        f"no model to start from: {where} and no --pretrained-checkpoint. Pass "
        "--pretrained-checkpoint (a converted model), fix the --load path, or train from "
        f"randomly initialized weights with --from-scratch and {', '.join(missing)}"
    )


def check_reference_files(
    objective: Objective, settings: ObjectiveConfig, data_path: str, info: dict
) -> None:
    """Precomputed reference log-probs exist and belong to this dataset (data/integrity.py)."""
    if not objective.reference or settings.reference != "precomputed":
        return
    path = settings.ref_logprobs or data_path + REF_SUFFIX
    try:
        check_reference_logprobs(
            path, data_path, int(info["rollouts"]), need_kl=objective.unit is Unit.MISMATCHED
        )
    except RolloutDataError as err:
        raise ConfigError(str(err)) from None


def _schedule(
    schedule: ScheduleConfig, optim: OptimConfig, num_samples: int, world: str
) -> tuple[int, int, int]:
    batches_per_epoch = num_samples // schedule.global_batch_size
    if batches_per_epoch == 0:
        fail(
            f"the dataset has {world}, fewer than one global batch of "
            f"{schedule.global_batch_size}; lower --global-batch-size"
        )
    if schedule.train_iters is not None:
        iters = schedule.train_iters
    else:
        iters = int(math.ceil(schedule.epochs * batches_per_epoch))
    if iters < 1:
        fail(f"nothing to train: {iters} steps ({world})")
    decay = optim.lr_decay_iters or iters
    if optim.lr_warmup_iters is not None and optim.lr_warmup_fraction is not None:
        fail("give --lr-warmup-iters or --lr-warmup-fraction, not both")
    if optim.lr_warmup_iters is not None:
        warmup = optim.lr_warmup_iters
    else:
        fraction = optim.warmup_fraction
        if not 0.0 <= fraction < 1.0:
            fail(f"--lr-warmup-fraction must be in [0, 1), got {fraction}")
        warmup = int(round(fraction * decay))
    if warmup >= decay and optim.lr_decay_style != "constant":
        fail(f"warmup ({warmup} steps) must be shorter than the decay ({decay} steps)")
    return iters, warmup, decay


def _check_reference(
    objective: Objective, settings: ObjectiveConfig, pp: int, start: str, ckpt: CheckpointConfig
) -> None:
    if not objective.reference or settings.reference != "online":
        return
    if pp > 1:
        fail(
            "--reference online keeps a frozen copy of the model next to the policy and runs "
            "it inside each micro-batch, which needs the whole model on each rank: use "
            "--pipeline-model-parallel-size 1, or --reference precomputed"
        )
    if start == "scratch" or (start == "resume" and not ckpt.pretrained_checkpoint):
        fail(
            "--reference online freezes the model fine-tuning started from: give it with "
            "--pretrained-checkpoint (also when resuming from --load)"
        )


def count_units(objective: Objective, data_path: str, info: dict) -> tuple[int, str]:
    """How many units the sampler draws from, and their name, for ``objective``'s unit."""
    if objective.unit is Unit.ROLLOUT:
        return int(info["rollouts"]), "rollouts"
    if objective.unit is Unit.PAIR:
        if not info.get("pairs"):
            fail(
                f"--objective {objective.name} trains on (chosen, rejected) pairs, but "
                f"{data_path} is a plain rollout dataset: pack it with "
                "tools/pack_rollouts.py --pairs ground-truth (rollouts with a 'solution' field) "
                "or --pairs given (records with chosen/rejected)"
            )
        return int(info["num_pairs"]), "pairs"
    import numpy as np  # mismatched units: samples with a non-zero training reward

    rewards = np.load(data_path + ".rewards.npy", mmap_mode="r")["reward"]
    return int(np.count_nonzero(rewards)), "samples with a non-zero reward"


def check_objective(objective: Objective, settings: ObjectiveConfig, info: dict) -> None:
    if settings.beta is not None and not settings.beta > 0:
        fail(f"--beta must be positive, got {settings.beta}")
    if settings.kto_desirable_weight < 0 or settings.kto_undesirable_weight < 0:
        fail("--kto-desirable-weight and --kto-undesirable-weight must be >= 0")
    for rule in objective.rules:
        message = rule(objective, info)
        if message:
            fail(message)


def preflight(config: TrainConfig, world_size: int) -> RunPlan:
    """Check ``config`` for ``world_size`` processes; raise :class:`ConfigError` on the first
    problem. Reads only small files (PREFIX.json, model_config.json, tracker files)."""
    try:
        objective = get_objective(config.objective.name)
    except KeyError as err:
        raise ConfigError(str(err.args[0])) from None
    parallel = config.parallel
    cp = check_layout(config, world_size)
    tp, pp, dp = check_parallel(
        parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size, world_size // cp
    )
    num_micro = _check_batch(config.schedule, dp)
    info = read_dataset_info(config.data.data_path)
    check_precision(config.precision)
    check_cross_entropy_fusion(config.precision)
    _check_outputs(config)
    if config.data.seq_length is not None and config.data.seq_length < 2:
        fail(f"--seq-length must be at least 2, got {config.data.seq_length}")
    start, start_dir, start_iter, start_note = checked_start_point(config.checkpoint)
    if start_dir is not None:  # e.g. written under a newer megatron-core than this one
        reason = unreadable_reason(Path(start_dir) / iteration_dir_name(start_iter))
        if reason:
            fail(reason)
    if start == "scratch":
        check_model_source(config.checkpoint, config.architecture.given())
    dataset_vocab = int(info["tokenizer"]["vocab_size"])
    fields, source = resolve_architecture(config.architecture.given(), dataset_vocab, start_dir)
    check_architecture(fields, tp, pp, dataset_vocab, source)
    fields = check_moe(config, fields, world_size, tp, pp)
    layout = check_model_layout(config, int(fields["num_layers"]), num_micro)
    check_objective(objective, config.objective, info)
    _check_reference(objective, config.objective, pp, start, config.checkpoint)
    num_samples, unit = count_units(objective, config.data.data_path, info)
    check_reference_files(objective, config.objective, config.data.data_path, info)
    iters, warmup, decay = _schedule(
        config.schedule, config.optimizer, num_samples, f"{num_samples} {unit}"
    )
    lr = config.optimizer.lr if config.optimizer.lr is not None else objective.default_lr
    if config.optimizer.min_lr > lr:
        fail(f"--min-lr {config.optimizer.min_lr} is above the peak lr {lr}")
    return RunPlan(
        world_size,
        tp,
        pp,
        dp,
        num_micro,
        lr,
        iters,
        warmup,
        decay,
        num_samples,
        info,
        fields,
        source,
        start,
        start_dir,
        start_iter,
        layout,
        start_note,
    )
