"""The one place that knows which Megatron-Core versions megatron-rift runs on, and how their APIs
differ.

* :data:`MEGATRON_CORE` is the installed version; :data:`SUPPORTED` the range this package declares
  (its ``megatron-core`` requirement, read from the installed package's metadata, so
  pyproject.toml stays the one source) and that CI tests: 0.16.1 on Python 3.11 and 0.19.2 on
  Python 3.12 (``scripts/test.sh --python 3.12``).
* :class:`Patch` describes a workaround that replaces a Megatron-Core internal: the versions it
  was checked against and the signature it expects. :meth:`Patch.verify` runs before the patch is
  applied and raises :class:`UnsupportedMegatronCore` (one line, naming the version and the patch)
  when the target is missing, has another signature, or the version was never checked. A patch
  never silently stops applying.
* The call spellings that moved between 0.16 and 0.19 (parallel-state initialization,
  dist_checkpointing save/load, the context-parallel batch split) are wrapped here with keyword
  arguments, so the rest of the code has one spelling.

Importing this module imports Megatron-Core lazily: only the functions that call it do.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

# The legs of the tested matrix (scripts/setup_venv.sh pins them; README "Versions").
TESTED = ("0.16.1", "0.19.2")
# From this version on dist_checkpointing keeps the common (non-sharded) state inside the torch_dist
# files instead of a separate common.pt; older versions cannot read such a checkpoint.
COMMON_STATE_EMBEDDED_SINCE = Version("0.19.0")


class UnsupportedMegatronCore(RuntimeError):
    """The installed Megatron-Core is outside what a workaround (or the package) was checked on."""


def installed_version() -> Version:
    return Version(importlib.metadata.version("megatron-core"))


def supported_range() -> SpecifierSet:
    """The ``megatron-core`` requirement of the installed megatron-rift (pyproject.toml)."""
    for line in importlib.metadata.requires("megatron-rift") or ():
        requirement = Requirement(line)
        if requirement.name == "megatron-core" and requirement.marker is None:
            return requirement.specifier
    raise RuntimeError(
        "megatron-rift's metadata names no megatron-core requirement; reinstall it "
        "(pip install -e .)"
    )


MEGATRON_CORE = installed_version()
SUPPORTED = supported_range()


def check_supported(version: Version | None = None) -> None:
    """Raise :class:`UnsupportedMegatronCore` unless ``version`` (default: installed) is in range."""
    version = MEGATRON_CORE if version is None else version
    if not SUPPORTED.contains(version, prereleases=True):
        raise UnsupportedMegatronCore(
            f"megatron-core {version} is not supported: megatron-rift is tested with "
            f"{' and '.join(TESTED)} (requirement megatron-core{SUPPORTED}); install one of them, "
            "e.g. bash scripts/setup_venv.sh (--python 3.12)"
        )


@dataclasses.dataclass(frozen=True)
class Patch:
    """A workaround that replaces ``target`` ("package.module:attribute.path")."""

    name: str  # what it fixes, in a few words
    target: str
    versions: str  # PEP 440 specifier of the versions the bug was seen in and the patch checked on
    parameters: tuple[str, ...] | None = None  # the target's expected parameter names

    def resolve(self):
        module, _, path = self.target.partition(":")
        obj = importlib.import_module(module)
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    def verify(self, version: Version | None = None):
        """The patched object, after checking version and shape; raises UnsupportedMegatronCore."""
        version = MEGATRON_CORE if version is None else version
        where = f"patch '{self.name}' ({self.target})"
        if not SpecifierSet(self.versions).contains(version, prereleases=True):
            raise UnsupportedMegatronCore(
                f"{where} was written for megatron-core {self.versions}, not {version}: check "
                "whether the bug is still there and update megatron_rift before using this version"
            )
        try:
            obj = self.resolve()
        except (ImportError, AttributeError) as err:
            raise UnsupportedMegatronCore(
                f"{where}: megatron-core {version} has no such attribute ({err}); the code it "
                "patches moved"
            ) from None
        if self.parameters is not None:
            found = tuple(inspect.signature(obj).parameters)
            if found != self.parameters:
                raise UnsupportedMegatronCore(
                    f"{where}: megatron-core {version} changed its signature to {found}, the patch "
                    f"expects {self.parameters}"
                )
        return obj


def initialize_model_parallel(
    tensor_model_parallel_size: int, pipeline_model_parallel_size: int, **kwargs
) -> None:
    """``parallel_state.initialize_model_parallel`` by keyword (0.18 and 0.19 inserted and removed
    positional parameters)."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        **kwargs,
    )


def save_distributed(sharded_state_dict: dict, folder: str) -> None:
    """``dist_checkpointing.save`` with the default (torch_dist) strategies; 0.17-0.19 removed
    ``common_strategy`` and the ``(backend, version)`` tuples, so nothing else is passed."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(sharded_state_dict=sharded_state_dict, checkpoint_dir=folder)


def load_distributed(sharded_state_dict: dict, folder: str, **kwargs) -> dict:
    """``dist_checkpointing.load`` by keyword (``validate_access_integrity`` etc. pass through)."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load(
        sharded_state_dict=sharded_state_dict, checkpoint_dir=folder, **kwargs
    )


def load_common_state(folder: str) -> dict:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(folder)


def batch_on_this_cp_rank(batch: dict, cp_group=None) -> dict:
    """Megatron's context-parallel split of a batch (2·CP load-balanced chunks per sequence).
    0.18 made ``is_hybrid_cp`` a required positional argument."""
    from megatron.core import utils

    if MEGATRON_CORE >= Version("0.18.0"):
        return utils.get_batch_on_this_cp_rank(batch, False, cp_group=cp_group)
    return utils.get_batch_on_this_cp_rank(batch)


# What Megatron-Core prints that says nothing about a megatron-rift run, and why it is expected.
# Filtered by quiet_known_messages() in the trainer, the demo and the tools, so that what remains
# in a log (or would break into a progress bar) is news.
KNOWN_WARNINGS = {
    r"(Transformer Engine and )?Apex (are|is) not installed": "CPU machines have neither; the "
    "torch fallbacks are what runs there",
    r"MimoModelConfig is experimental": "0.19 import; multimodal models are not used",
    r"absl.logging is not installed": "0.19 import; the standard logging is used",
    r"Could not determine rank from torch.distributed": "0.19 import, before the process group",
    r"full scope is deprecated": "0.19 TransformerConfig default; CUDA graphs are not used",
}
KNOWN_LOG_RECORDS = {  # logger name -> message pattern
    "megatron.core.models.gpt.gpt_model": r"GPTModel IS DEPRECATED",  # 0.19: every model build
    "megatron.core.dist_checkpointing.strategies.torch": r"MCore's async save is deprecated",
    "megatron.core.distributed.distributed_data_parallel": r"full_param_layout not provided",
    "megatron.core.rerun_state_machine": r"Rerun State Machine|RerunStateMachine initialized",
}


class _DropMatching:
    def __init__(self, pattern: str):
        import re

        self.pattern = re.compile(pattern)

    def filter(self, record) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_known_messages() -> None:
    """Filter :data:`KNOWN_WARNINGS` and :data:`KNOWN_LOG_RECORDS` (idempotent; call it before
    Megatron-Core is imported so its import-time warnings are caught too)."""
    import logging
    import warnings

    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
    for name, pattern in KNOWN_LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) for f in logger.filters):
            logger.addFilter(_DropMatching(pattern))
