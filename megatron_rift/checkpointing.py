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

import errno
import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

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
    try:
        megatron_compat.save_distributed(sharded_state_dict, str(tmp))
        if global_rank() == 0:  # all ranks' writes are gathered by now: record what they wrote
            _write_record(tmp)
        failure = None
    # Megatron raises a writer's failure on every rank, as torch's CheckpointException (a
    # BaseException) or whatever the failing call raised.
    except (Exception, CheckpointException) as err:
        failure = err
    _give_up_on_failure(failure, root, tmp, iteration)
    if before_publish is not None:
        before_publish(tmp)
    if global_rank() == 0:
        replace_folder(tmp, final)
        _write_text_atomically(root / TRACKER_FILE, str(iteration))
        if keep_last:
            _prune(root, keep_last, keep=final.name)
    barrier()
    return final


class CheckpointSaveError(RuntimeError):
    """A save that failed on some rank; the partial folder is removed, the tracker unchanged."""


def _write_record(tmp: Path) -> None:
    """Which versions wrote the folder (the format differs between them) and every file with its
    size, so a missing or truncated file is found before loading (checkpoint_layout)."""
    record = writer_record()
    record["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / WRITER_FILE).write_text(json.dumps(record, indent=2) + "\n")


def describe_save_failure(error: BaseException) -> str:
    """One line for a failed save: "no space left on device (PATH)" when a full disk is anywhere
    in the exception chain (Megatron wraps a writer's OSError twice), else the error itself."""
    seen, stack = set(), [error]
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return f"no space left on device ({err.filename or 'writing the checkpoint'})"
        # Exceptions gathered from other ranks arrive pickled, without their causes: the text.
        found = re.search(r"No space left on device(?:: '([^']*)')?", str(err))
        if found:
            return f"no space left on device ({found.group(1) or 'writing the checkpoint'})"
        stack += [err.__cause__, err.__context__]
        for failure in getattr(
            err, "failures", {}
        ).values():  # CheckpointException: rank -> (exc, tb)
            stack.append(failure[0] if isinstance(failure, tuple) else failure)
    return f"{type(error).__name__}: {error}"


def _give_up_on_failure(failure, root: Path, tmp: Path, iteration) -> None:
    """Every rank learns whether any rank failed (and why); on failure rank 0 removes the partial
    folder and every rank raises CheckpointSaveError, so no rank waits in a later collective."""
    mine = None if failure is None else describe_save_failure(failure)
    reasons = [mine]
    if dist.is_initialized():
        reasons = [None] * dist.get_world_size()
        dist.all_gather_object(reasons, mine)
    failed = [(rank, reason) for rank, reason in enumerate(reasons) if reason is not None]
    if not failed:
        return
    # The most telling reason: a full disk, else the first rank's.
    rank, reason = next((f for f in failed if f[1].startswith("no space")), failed[0])
    if global_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    kept = read_tracker(root)
    kept_text = (
        f"{root / TRACKER_FILE} still names {iteration_dir_name(kept)}, which is intact"
        if kept is not None
        else "there is no earlier checkpoint"
    )
    raise CheckpointSaveError(
        f"saving checkpoint {iteration_dir_name(iteration)} under {root} failed on rank {rank}: "
        f"{reason}. The partial save {tmp} was removed; {kept_text}. Free space (or choose "
        "another --save) and restart with the same --load to resume from the last checkpoint"
    ) from failure


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
