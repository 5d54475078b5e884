"""Names in a checkpoint root (Megatron-LM's layout plus ours), readable without torch.

    CKPT/
      model_config.json                  GPTArchitecture: the model's shape
      tokenizer/, hf_config/             carried from the HF model (converted checkpoints)
      latest_checkpointed_iteration.txt  "release" (a converted model) or the last saved iteration
      release/  or  iter_0000100/        a dist_checkpointing folder

The trainer's preflight reads trackers before torch is imported; :mod:`megatron_rift.checkpointing`
writes them.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

from packaging.version import InvalidVersion, Version

from megatron_rift.megatron_compat import COMMON_STATE_EMBEDDED_SINCE, installed_version

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RELEASE = "release"
MODEL_CONFIG_FILE = "model_config.json"
# The HF model's files a converted root carries (written by the HF -> Megatron converter, read back
# on export); the trainer carries both into its own checkpoint root.
TOKENIZER_DIR = "tokenizer"
HF_CONFIG_DIR = "hf_config"  # the source config.json / generation_config.json, reused on export
# In every iteration folder: the versions that wrote it (dist_checkpointing's own metadata does not
# say which megatron-core wrote it, and its format changed in 0.19).
WRITER_FILE = "megatron_rift_writer.json"
COMMON_STATE_FILE = "common.pt"  # dist_checkpointing's separate common state, before 0.19


def iteration_dir_name(iteration: int | str) -> str:
    return RELEASE if iteration == RELEASE else f"iter_{int(iteration):07d}"


def read_tracker(ckpt_root: str | Path | None) -> int | str | None:
    """The iteration the tracker points at: an int, ``"release"``, or None when there is none.
    Raises ValueError (naming the file) when the tracker holds anything else."""
    if not ckpt_root:
        return None
    path = Path(ckpt_root) / TRACKER_FILE
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if text == RELEASE:
        return RELEASE
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"{path}: expected an iteration number or 'release', found {text!r}"
        ) from None


def writer_record() -> dict:
    """What :data:`WRITER_FILE` holds for a checkpoint written by this process."""

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "megatron_core": version("megatron-core"),
        "torch": version("torch"),
        "megatron_rift": version("megatron-rift"),
    }


def written_by(folder: str | Path) -> str | None:
    """The megatron-core version recorded in an iteration folder, or None (an older writer)."""
    try:
        return json.loads((Path(folder) / WRITER_FILE).read_text()).get("megatron_core")
    except (OSError, ValueError, AttributeError):
        return None


def unreadable_reason(folder: str | Path) -> str | None:
    """Why the installed megatron-core cannot read the dist_checkpointing folder, or None.

    Checkpoints are forward-compatible only: megatron-core 0.19 reads what 0.16-0.18 wrote, but
    0.19 keeps the common state inside the torch_dist files, which 0.16-0.18 cannot read.
    """
    folder = Path(folder)
    if not (folder / ".metadata").is_file() or (folder / COMMON_STATE_FILE).is_file():
        return None
    installed = installed_version()
    if installed >= COMMON_STATE_EMBEDDED_SINCE:
        return None
    writer = written_by(folder)
    who = f"megatron-core {writer}" if writer else f"megatron-core >= {COMMON_STATE_EMBEDDED_SINCE}"
    return (
        f"{folder} was written by {who}, whose format (no {COMMON_STATE_FILE}: the common "
        f"state is inside the torch_dist files) megatron-core {installed} cannot read; load it "
        f"with megatron-core >= {COMMON_STATE_EMBEDDED_SINCE} (bash scripts/setup_venv.sh "
        f"--python 3.12), or convert / save it again under megatron-core {installed} "
        "(checkpoints are forward-compatible only, docs/training.md)"
    )


def saved_files(folder: str | Path) -> dict[str, int] | None:
    """{file name: size} the save recorded in :data:`WRITER_FILE`, or None (an older writer)."""
    try:
        files = json.loads((Path(folder) / WRITER_FILE).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    return files if isinstance(files, dict) else None


def incomplete_reason(folder: str | Path) -> str | None:
    """What is missing or cut short in a dist_checkpointing iteration folder, or None.

    Checks the files the save recorded (name and size, see :func:`saved_files`), the
    ``.metadata`` and, for writers before megatron-core 0.19, the separate common state. Reads no
    tensor data (a checkpoint can be hundreds of GB)."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} does not exist"
    recorded = saved_files(folder)
    for name, size in (recorded or {}).items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} is {path.stat().st_size} bytes, the save wrote {size} (truncated)"
    if not (folder / ".metadata").is_file():
        return f"{folder / '.metadata'} is missing (an interrupted save or an incomplete copy)"
    try:
        before_embedded = Version(written_by(folder) or "0.19") < COMMON_STATE_EMBEDDED_SINCE
    except InvalidVersion:
        before_embedded = False
    if before_embedded and not (folder / COMMON_STATE_FILE).is_file():
        return f"{folder / COMMON_STATE_FILE} (the common state) is missing"
    return None


def previous_complete(root: str | Path, before: int) -> int | None:
    """The newest iteration below ``before`` whose folder in ``root`` is complete, or None."""
    iterations = []
    for path in Path(root).glob("iter_*"):
        suffix = path.name[len("iter_") :]
        if path.is_dir() and suffix.isdigit() and int(suffix) < before:
            iterations.append(int(suffix))
    for iteration in sorted(iterations, reverse=True):
        if incomplete_reason(Path(root) / iteration_dir_name(iteration)) is None:
            return iteration
    return None
