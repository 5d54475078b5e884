"""The trainer's command line, generated from :mod:`megatron_rift.training.config`.

This is the only place that sees the argparse namespace: :func:`parse_train_config` turns argv into
a :class:`TrainConfig` and everything after it takes typed sections. ``--config FILE.json`` starts
from a saved configuration (:func:`megatron_rift.training.config.save_config`); flags given beside
it override its values. ``--plugin MODULE`` imports a module first, so an objective it registers
is a valid ``--objective``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import types
import typing

from megatron_rift.objectives import objective_names, objectives
from megatron_rift.training import config as config_module
from megatron_rift.training.config import SECTIONS, TrainConfig, load_config

_GROUP_TITLES = {
    "data": "data",
    "objective": "objective (preference baselines dpo, kto, simpo: batch sizes "
    "count pairs or samples, each trained together with its partner sequence)",
    "parallel": "parallelism",
    "schedule": "batch and schedule",
    "optimizer": "optimizer (AdamW) and learning-rate schedule",
    "precision": "precision and kernels",
    "architecture": "architecture (from-scratch models; a checkpoint's model_config.json wins, "
    "and a flag that contradicts it is an error)",
    "checkpoint": "checkpointing",
    "logging": "logging",
    "memory": "activation memory (recompute)",
    "reliability": "faults: NaN/Inf steps, lost ranks (docs/reliability.md)",
    "moe": "mixture of experts (MoE models; docs/moe.md)",
}


def _flag_type(section_cls, field: dataclasses.Field):
    """(python type, may be None) of a field from its annotation."""
    hint = typing.get_type_hints(section_cls, vars(config_module))[field.name]
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return hint, False


def _dest(section: str, field: str) -> str:
    return f"{section}.{field}"


def _add_field(group, section: str, section_cls, field: dataclasses.Field) -> None:
    meta = field.metadata
    kind, optional = _flag_type(section_cls, field)
    name = meta["name"] or "--" + field.name.replace("_", "-")
    common = dict(dest=_dest(section, field.name), help=meta["help"], default=argparse.SUPPRESS)
    if kind is bool:
        if meta["negate"]:
            group.add_argument(name, action="store_false", **common)
        elif optional:
            group.add_argument(name, action=argparse.BooleanOptionalAction, **common)
        else:
            group.add_argument(name, action="store_true", **common)
        return
    choices = meta["choices"]
    if section == "objective" and field.name == "name":
        choices = objective_names()
    shown = "" if field.default is None else f" (default: {field.default})"
    common["help"] = meta["help"] + shown
    group.add_argument(name, type=kind, choices=choices, metavar=meta["metavar"], **common)


def build_parser() -> argparse.ArgumentParser:
    listing = "; ".join(f"{o.name}: {o.summary}" for o in objectives())
    parser = argparse.ArgumentParser(
        prog="megatron-rift train",
        description="Fine-tune a GPT model with RIFT or a baseline on Megatron-Core. Launch with "
        "torchrun; data parallel size = world size / (TP x PP). Objectives: " + listing,
    )
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE.json",
        help="start from a saved TrainConfig; flags given here override it",
    )
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first (it may register objectives); repeatable",
    )
    for section, section_cls in SECTIONS.items():
        group = parser.add_argument_group(_GROUP_TITLES[section])
        for field in dataclasses.fields(section_cls):
            if "help" in field.metadata:
                _add_field(group, section, section_cls, field)
    return parser


def _import_plugins(names) -> None:
    for name in names:
        importlib.import_module(name)


def parse_train_config(argv=None) -> TrainConfig:
    """argv -> TrainConfig (``argparse`` exits with status 2 on a malformed command line)."""
    early = argparse.ArgumentParser(prog="megatron-rift train", add_help=False)
    early.add_argument("--config", default=None)
    early.add_argument("--plugin", action="append", default=[])
    known, _ = early.parse_known_args(argv)
    try:
        base = load_config(known.config) if known.config else TrainConfig()
    except ValueError as err:
        early.error(str(err))
    plugins = tuple(dict.fromkeys([*base.plugins, *known.plugin]))
    try:
        _import_plugins(plugins)  # before the parser: their objectives are --objective choices
    except ImportError as err:
        early.error(f"--plugin: {err}")
    parser = build_parser()
    config = _apply(base, vars(parser.parse_args(argv)))
    config.plugins = plugins
    missing = _required_missing(config)
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    if config.objective.name not in objective_names():  # from a --config file
        parser.error(
            f"--objective {config.objective.name!r}: choose one of {', '.join(objective_names())}"
        )
    return config


def _apply(base: TrainConfig, given: dict) -> TrainConfig:
    sections = {name: dataclasses.replace(getattr(base, name)) for name in SECTIONS}
    for dest, value in given.items():
        if "." not in dest:
            continue
        section, field = dest.split(".", 1)
        setattr(sections[section], field, value)
    return TrainConfig(**sections, plugins=base.plugins)


def _required_missing(config: TrainConfig) -> list[str]:
    missing = []
    for section, section_cls in SECTIONS.items():
        for field in dataclasses.fields(section_cls):
            if (
                field.metadata.get("required")
                and getattr(getattr(config, section), field.name) is None
            ):
                missing.append(field.metadata["name"] or "--" + field.name.replace("_", "-"))
    return missing


def config_to_argv(config: TrainConfig) -> list[str]:
    """Flags that reproduce ``config`` (the fields that differ from the defaults), e.g. for a log
    line a user can paste."""
    argv: list[str] = []
    for plugin in config.plugins:
        argv += ["--plugin", plugin]
    default = TrainConfig()
    for section, section_cls in SECTIONS.items():
        for field in dataclasses.fields(section_cls):
            value = getattr(getattr(config, section), field.name)
            if value == getattr(getattr(default, section), field.name):
                continue
            name = field.metadata["name"] or "--" + field.name.replace("_", "-")
            if isinstance(value, bool):
                if field.metadata["negate"]:
                    argv.append(name)  # only a False differs from the default True
                elif value:
                    argv.append(name)
                else:
                    argv.append("--no-" + name[2:])
            elif value is not None:
                argv += [name, str(value)]
    return argv
