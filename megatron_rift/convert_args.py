"""Flags shared by tools/convert_hf_to_megatron.py and tools/convert_megatron_to_hf.py.

Kept out of megatron_rift.convert (which imports torch and Megatron-Core) so the CLIs parse and
reject bad flags before any heavy import.
"""

from __future__ import annotations


def add_verify_arguments(parser) -> None:
    """The --verify flags both converter CLIs share."""
    parser.add_argument(
        "--verify",
        action="store_true",
        help="run both models on the same token ids; print max_abs_logit_diff=; "
        "fail above the tolerance",
    )
    parser.add_argument(
        "--verify-dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="precision both models compute in for --verify (weights at the stored "
        "precision); bf16 halves the memory, with a looser tolerance",
    )
    parser.add_argument(
        "--verify-tolerance",
        type=float,
        default=None,
        help="default: 1e-4 in fp32; in bf16 5%% of the HF model's max |logit|",
    )
