"""Checkpoint folders in Megatron-LM's layout, written with ``dist_checkpointing`` and published atomically.

Layout (what Megatron-LM users expect)::

    CKPT/
      model_config.json                  GPTArchitecture: the model's shape, read back by every tool
      tokenizer/                         tokenizer files (optional)
      latest_checkpointed_iteration.txt  "release" (a converted model) or the last saved iteration
      release/  or  iter_0000100/        a dist_checkpointing (torch_dist) folder

Inside an iteration folder the sharded state dict has a ``model`` entry (the unwrapped GPTModel's
``sharded_state_dict()``, reshardable across TP/PP) and, in training checkpoints, more entries
(optimizer, scheduler, RNG, data position) that model-only readers simply do not request.

Crash safety: each save goes to a hidden temporary folder, is renamed into place once every rank has
finished writing, and only then does the tracker file move (write + ``os.replace``). A crash at any
point leaves the previous checkpoint and tracker intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_rift import megatron_compat
from megatron_rift.checkpoint_layout import (  # noqa: F401  (re-exported)
    RELEASE,
    TRACKER_FILE,
    WRITER_FILE,
    iteration_dir_name,
    read_tracker,
    unreadable_reason,
    writer_record,
)


class CheckpointFormatError(ValueError):
    """A checkpoint the installed megatron-core cannot read (the message says what to do)."""


def latest_checkpoint_dir(ckpt_root: str | Path) -> Path | None:
    """Folder of the checkpoint the tracker names, or None when the root has no checkpoint."""
    iteration = read_tracker(ckpt_root)
    if iteration is None:
        return None
    folder = Path(ckpt_root) / iteration_dir_name(iteration)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{ckpt_root}/{TRACKER_FILE} names {iteration!r} but {folder} is missing"
        )
    return folder


def global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def replace_folder(staged: Path, final: Path) -> None:
    """Move a fully written folder into place; an existing ``final`` is moved aside first and
    deleted only after the swap, so at every instant one complete version exists."""
    if final.exists():
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    ckpt_root: str | Path,
    iteration: int | str,
    sharded_state_dict: dict,
    keep_last: int | None = None,
    before_publish=None,
) -> Path:
    """Save ``sharded_state_dict`` (collective: every rank calls it) and publish it atomically.

    Returns the published folder. ``keep_last`` prunes older ``iter_*`` folders after publishing.
    ``before_publish(tmp_folder)``, if given, runs on every rank once all ranks have written the
    temporary folder and before it is published (the trainer's crash-during-save test hook).
    """
    root = Path(ckpt_root)
    final = root / iteration_dir_name(iteration)
    tmp = root / f".tmp_{final.name}"
    if global_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a save that crashed
        tmp.mkdir()
    barrier()
    megatron_compat.save_distributed(sharded_state_dict, str(tmp))
    if global_rank() == 0:  # which versions wrote it: the format differs between them
        (tmp / WRITER_FILE).write_text(json.dumps(writer_record(), indent=2) + "\n")
    barrier()
    if before_publish is not None:
        before_publish(tmp)
    if global_rank() == 0:
        replace_folder(tmp, final)
        _write_text_atomically(root / TRACKER_FILE, str(iteration))
        if keep_last:
            _prune(root, keep_last, keep=final.name)
    barrier()
    return final


def _prune(root: Path, keep_last: int, keep: str) -> None:
    iters = sorted(p for p in root.glob("iter_*") if p.is_dir())
    for old in iters[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(checkpoint_dir: str | Path, sharded_state_dict: dict) -> dict:
    """Load the entries of ``sharded_state_dict`` from one iteration folder (any TP/PP it was saved at)."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    reason = unreadable_reason(folder)
    if reason:
        raise CheckpointFormatError(reason)
    return megatron_compat.load_distributed(sharded_state_dict, str(folder))


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers (their sharded keys would carry ``module.``)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def model_state_keys(num_chunks: int) -> list[str]:
    """Megatron-LM's entries: ``model`` for one chunk, ``model0``, ``model1``, ... for virtual
    pipeline chunks. The sharded keys inside carry global layer numbers, so a checkpoint loads
    at any number of chunks."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def model_sharded_state_dict(model_chunks) -> dict:
    """``{"model": ...}`` for one model chunk, ``{"model0": ..., "model1": ...}`` for several."""
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    keys = model_state_keys(len(chunks))
    return {key: unwrap_model(chunk).sharded_state_dict() for key, chunk in zip(keys, chunks)}


def load_model_state(model_chunks, loaded: dict) -> None:
    """Put the model entries of a loaded :func:`model_sharded_state_dict` into the chunks."""
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    for key, chunk in zip(model_state_keys(len(chunks)), chunks):
        unwrap_model(chunk).load_state_dict(loaded[key], strict=True)


def load_model_weights(ckpt_root_or_dir: str | Path, model_chunks) -> Path:
    """Load only the model weights into ``model_chunks`` from a checkpoint root (its tracker's
    iteration) or an iteration folder. Returns the folder read."""
    path = Path(ckpt_root_or_dir)
    folder = latest_checkpoint_dir(path) if (path / TRACKER_FILE).exists() else path
    if folder is None:
        raise FileNotFoundError(f"no checkpoint in {path}")
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    loaded = load_checkpoint(folder, model_sharded_state_dict(chunks))
    load_model_state(chunks, loaded)
    return folder
