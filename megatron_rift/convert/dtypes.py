"""The dtype names the converters accept (``--target-dtype``, ``--verify-dtype``)."""

from __future__ import annotations

import torch

from megatron_rift.convert.errors import ConversionError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def dtype_from_name(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConversionError(f"dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]
