"""Where a run's model comes from, checked without torch: the parallel layout against the world size,
the architecture (a checkpoint's ``model_config.json`` or explicit fields) and whether it splits
over TP/PP and covers the dataset's vocabulary.

Shared by the trainer's preflight and the reference log-prob tool, so both refuse the same
configurations with the same words, on every rank, before any process group exists.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_rift.checkpoint_layout import MODEL_CONFIG_FILE, read_tracker

# The fields a model from scratch must be given (GPTArchitecture has no defaults for them).
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads")


class ConfigError(ValueError):
    """A configuration the trainer cannot run; the message says what to change."""


def fail(message: str) -> None:
    raise ConfigError(message)


def checkpoint_iteration(root: str | None) -> int | str | None:
    """The iteration a checkpoint root's tracker names, "release", or None (ConfigError when the
    tracker is unreadable)."""
    try:
        return read_tracker(root)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_parallel(tp: int, pp: int, world_size: int) -> tuple[int, int, int]:
    """(TP, PP, DP) for ``world_size`` processes."""
    if tp < 1 or pp < 1:
        fail(
            f"--tensor-model-parallel-size ({tp}) and --pipeline-model-parallel-size ({pp}) "
            "must be at least 1"
        )
    if world_size % (tp * pp):
        fail(
            f"world size {world_size} is not divisible by tensor-model-parallel-size {tp} x "
            f"pipeline-model-parallel-size {pp} = {tp * pp}; launch a multiple of {tp * pp} "
            "processes or change the parallel sizes"
        )
    return tp, pp, world_size // (tp * pp)


def resolve_architecture(
    given: dict, dataset_vocab: int, config_dir: str | None
) -> tuple[dict, str]:
    """GPTArchitecture fields from a checkpoint's model_config.json (which ``given`` fields must
    not contradict), else from ``given`` (which must hold :data:`SHAPE_FIELDS`)."""
    if config_dir is not None:
        path = Path(config_dir) / MODEL_CONFIG_FILE
        if not path.is_file():
            fail(
                f"{path} not found: {config_dir} is not a megatron-rift checkpoint "
                "(convert a model with tools/convert_hf_to_megatron.py)"
            )
        try:
            fields = json.loads(path.read_text())
        except ValueError as err:
            fail(f"{path}: not valid JSON ({err})")
        clashes = [
            f"--{name.replace('_', '-')}={value} but {path} says {fields.get(name)}"
            for name, value in given.items()
            if name in fields and fields[name] != value
        ]
        if clashes:
            fail(
                "architecture flags contradict the checkpoint: "
                + "; ".join(clashes)
                + ". Drop these flags (the checkpoint defines the model)."
            )
        return fields, str(path)
    missing = [f"--{name.replace('_', '-')}" for name in SHAPE_FIELDS if name not in given]
    if missing:
        fail(
            "no model to start from: no checkpoint in --load and no --pretrained-checkpoint, "
            f"and the shape of a new model is not given ({', '.join(missing)} missing). "
            "Pass --pretrained-checkpoint (a converted model), or give the architecture flags "
            "to train from randomly initialized weights"
        )
    fields = dict(given)
    fields.setdefault("vocab_size", dataset_vocab)
    return fields, "flags"


def check_architecture(fields: dict, tp: int, pp: int, dataset_vocab: int, source: str) -> None:
    """The model splits over TP/PP and its vocabulary covers the dataset's token ids."""
    heads = fields["num_attention_heads"]
    hidden = fields["hidden_size"]
    # GPTArchitecture's derived defaults (model/config.py), without importing Megatron.
    groups = fields.get("num_query_groups") or heads
    ffn = fields.get("ffn_hidden_size") or 4 * hidden
    problems = []
    for name, value, size, kind in (
        ("num_attention_heads", heads, tp, "tensor"),
        ("num_query_groups", groups, tp, "tensor"),
        ("ffn_hidden_size", ffn, tp, "tensor"),
        ("num_layers", fields["num_layers"], pp, "pipeline"),
    ):
        if value % size:
            problems.append(
                f"{name}={value} is not divisible by --{kind}-model-parallel-size {size}"
            )
    if problems:
        fail(f"the model ({source}) cannot be split: " + "; ".join(problems))
    vocab = fields.get("vocab_size") or dataset_vocab
    if vocab < dataset_vocab:
        fail(
            f"the model's vocab_size {vocab} ({source}) is smaller than the dataset "
            f"tokenizer's {dataset_vocab}: token ids would fall outside the embedding. Use the "
            "tokenizer the model was converted with, or raise --vocab-size"
        )


def expert_parallel_problems(
    num_experts: int | None, ep: int, world_size: int, tp: int, pp: int, etp: int | None = None
) -> list[str]:
    """Why ``ep`` ranks per layer's experts (expert tensor parallel ``etp``, default TP) cannot split
    a model of ``num_experts`` experts (None: dense) in ``world_size`` processes; empty when they can."""
    etp = tp if etp is None else etp
    if ep == 1 and etp == tp:
        return []
    if num_experts is None:
        return [
            f"--expert-model-parallel-size {ep} / --expert-tensor-parallel-size {etp} need a "
            "mixture-of-experts model; this one is dense (model_config.json has no num_moe_experts)"
        ]
    problems = []
    if ep < 1 or etp < 1:
        problems.append(f"expert parallel sizes must be at least 1 (EP={ep}, expert TP={etp})")
    elif num_experts % ep:
        problems.append(
            f"--expert-model-parallel-size {ep} does not divide the model's {num_experts} experts"
        )
    # Megatron's expert layout: expert-TP x EP x expert-DP ranks make up each pipeline stage.
    stage = world_size // pp if world_size % pp == 0 else None
    if ep >= 1 and etp >= 1 and (stage is None or stage % (ep * etp)):
        problems.append(
            f"--expert-model-parallel-size {ep} x expert tensor-parallel size {etp} = {ep * etp} "
            f"does not divide the {world_size} processes (per pipeline stage: {world_size}/{pp}); "
            f"launch a multiple of {ep * etp * pp} processes or change the sizes"
        )
    return problems
