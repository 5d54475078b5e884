"""Write an output folder under a temporary sibling name and publish it by renaming at the end.

A failure at any point (bad weights, a failed ``--verify``, a crash) leaves no half-written output
folder behind, and an existing output folder is replaced only with ``overwrite``. Collective under
torch.distributed: rank 0 touches the file system, every rank gets the same temporary path.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from megatron_rift.checkpointing import barrier, global_rank, replace_folder
from megatron_rift.convert.errors import ConversionError


def check_output_dir(output: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output folder unless ``overwrite``; returns the resolved path."""
    output = Path(output).resolve()
    if output.exists() and not overwrite:
        raise ConversionError(
            f"output folder {output} already exists; pass --overwrite to replace it"
        )
    if output.exists() and not output.is_dir():
        raise ConversionError(f"output {output} exists and is not a folder")
    return output


@contextlib.contextmanager
def staged_output_dir(output: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield ``.<name>.partial`` next to ``output``; rename it to ``output`` when the block succeeds."""
    final = check_output_dir(output, overwrite)
    tmp = final.parent / f".{final.name}.partial"
    if global_rank() == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run that was killed
        tmp.mkdir()
    barrier()
    try:
        yield tmp
        barrier()
    except BaseException:
        if global_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if global_rank() == 0:
        replace_folder(tmp, final)
    barrier()
