"""The recipes in examples/recipes/ call our tools with flags those tools accept: each command's
arguments (shell variables filled with placeholders) go through the tool's own argument parser."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from tests.torchrun_utils import REPO

RECIPES = sorted((REPO / "examples" / "recipes").glob("*.sh"))


def _parser_main(relative: str):
    spec = importlib.util.spec_from_file_location(Path(relative).stem, REPO / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args


def _trainer_parse(argv):
    from megatron_rift.training.arguments import parse_train_config

    return parse_train_config(argv)


PARSERS = {
    "-m megatron_rift.train": _trainer_parse,
    "tools/pack_rollouts.py": _parser_main("tools/pack_rollouts.py"),
    "tools/compute_ref_logprobs.py": _parser_main("tools/compute_ref_logprobs.py"),
    "tools/convert_hf_to_megatron.py": _parser_main("tools/convert_hf_to_megatron.py"),
    "tools/convert_megatron_to_hf.py": _parser_main("tools/convert_megatron_to_hf.py"),
}


def _commands(script: Path) -> list[str]:
    """Logical lines (continuations joined) with ${VAR...} / $VAR replaced by a placeholder ("8")."""
    text = script.read_text().replace("\\\n", " ")
    text = re.sub(r"\$\{[^}]*\}|\$[A-Za-z_]+", "8", text)  # numeric: fits int flags and paths
    return [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


@pytest.mark.parametrize("script", RECIPES, ids=lambda p: p.name)
def test_recipe_commands_parse(script):
    checked = 0
    for line in _commands(script):
        for marker, parse in PARSERS.items():
            if marker in line:
                argv = shlex.split(line.split(marker, 1)[1])
                parse(argv)  # argparse exits (SystemExit) on an unknown or malformed flag
                checked += 1
    assert checked >= 3, f"{script.name}: found only {checked} tool commands"
