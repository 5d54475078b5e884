"""What both converters return: where they wrote, the model's architecture, the stored dtype and,
with ``verify``, the measured logit parity."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from megatron_rift.convert.verify import Parity
from megatron_rift.model.config import GPTArchitecture


@dataclasses.dataclass
class ConversionResult:
    output: Path
    arch: GPTArchitecture
    dtype: torch.dtype  # of the written weights
    parity: Parity | None = None  # set by verify

    @property
    def max_abs_logit_diff(self) -> float | None:
        return None if self.parity is None else self.parity.max_abs_logit_diff
