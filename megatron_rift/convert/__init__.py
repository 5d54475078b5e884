"""Hugging Face <-> Megatron-Core checkpoint conversion (Llama, Qwen2, Qwen3) that proves parity itself.

- :func:`convert_hf_to_megatron`: HF safetensors -> Megatron dist checkpoint (``release/``).
- :func:`convert_megatron_to_hf`: any Megatron checkpoint (release or training iteration) -> HF folder.
- :func:`verify_parity`: max |logit difference| between the two on the same tokens.

The weight-name tables live in :mod:`megatron_rift.convert.tables`, the transforms in
:mod:`megatron_rift.convert.transforms`.
"""

from megatron_rift.convert.errors import ConversionError
from megatron_rift.convert.hf_to_megatron import convert_hf_to_megatron
from megatron_rift.convert.megatron_to_hf import convert_megatron_to_hf
from megatron_rift.convert.result import ConversionResult
from megatron_rift.convert.tables import TABLES
from megatron_rift.convert.verify import verify_parity

__all__ = [
    "TABLES",
    "ConversionError",
    "ConversionResult",
    "convert_hf_to_megatron",
    "convert_megatron_to_hf",
    "verify_parity",
]
