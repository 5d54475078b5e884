"""Write an output folder under a temporary sibling name and publish it by renaming at the end.

A failure at any point (bad weights, a failed ``--verify``, a crash) leaves no half-written output
folder behind, and an existing output folder is replaced only with ``overwrite``. Collective under
torch.distributed: rank 0 touches the file system, every rank gets the same temporary path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch.distributed as dist

from megatron_rift.convert.errors import ConversionError


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def check_output_dir(output: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output folder unless ``overwrite``; returns the resolved path."""
    output = Path(output).resolve()
    if output.exists() and not overwrite:
        raise ConversionError(f"output folder {output} already exists; pass --overwrite to replace it")
    if output.exists() and not output.is_dir():
        raise ConversionError(f"output {output} exists and is not a folder")
    return output


@contextlib.contextmanager
def staged_output_dir(output: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield ``.<name>.partial`` next to ``output``; rename it to ``output`` when the block succeeds."""
    final = check_output_dir(output, overwrite)
    tmp = final.parent / f".{final.name}.partial"
    if _rank() == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run that was killed
        tmp.mkdir()
    _barrier()
    try:
        yield tmp
        _barrier()
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if _rank() == 0:
        if final.exists():
            old = final.parent / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    _barrier()
