#!/usr/bin/env python
"""Convert a Megatron-Core checkpoint (converted or trained, saved at any TP/PP) into a Hugging Face folder.

    python tools/convert_megatron_to_hf.py --megatron-path runs/rift/checkpoints --output hf/rift --verify

``--megatron-path`` is a checkpoint root (its latest_checkpointed_iteration.txt is followed) or one
iteration folder (release/, iter_0000100/). The output loads with transformers.AutoModelForCausalLM
and vLLM. Exit status: 0 success, 2 bad input or failed --verify (nothing is written then).
"""

import argparse
import os
import sys

from megatron_rift.convert_args import add_verify_arguments


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--megatron-path", required=True, help="checkpoint root or iteration folder")
    p.add_argument("--output", required=True, help="HF folder to create")
    p.add_argument(
        "--target-dtype",
        choices=["fp32", "bf16"],
        default=None,
        help="dtype of the safetensors (default: the checkpoint's stored dtype)",
    )
    p.add_argument("--max-shard-size-gb", type=float, default=5.0, help="largest safetensors file")
    add_verify_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Exit status; leaves the process group to the caller."""
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        print(
            "error: run this tool as one process (it reshards on load), not under torchrun",
            file=sys.stderr,
        )
        return 2
    from megatron_rift.convert import ConversionError, convert_megatron_to_hf

    try:
        result = convert_megatron_to_hf(
            args.megatron_path,
            args.output,
            target_dtype=args.target_dtype,
            overwrite=args.overwrite,
            verify=args.verify,
            verify_dtype=args.verify_dtype,
            verify_tolerance=args.verify_tolerance,
            max_shard_bytes=int(args.max_shard_size_gb * 2**30),
        )
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {result.output} ({result.arch.hf_model_type}, {str(result.dtype).removeprefix('torch.')})"
    )
    return 0


if __name__ == "__main__":  # keep entry scripts import-safe: dist_checkpointing may re-import them
    status = main()
    from megatron_rift.parallel import destroy_distributed

    destroy_distributed()
    sys.exit(status)
