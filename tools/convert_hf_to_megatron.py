#!/usr/bin/env python
"""Convert a Hugging Face model folder (Llama / Qwen2 / Qwen3, safetensors) into a Megatron-Core checkpoint.

    python tools/convert_hf_to_megatron.py --hf-path Qwen2.5-Math-1.5B --output ckpt/qwen-math --verify
    torchrun --nproc_per_node=2 tools/convert_hf_to_megatron.py --hf-path ... --output ... \
        --tensor-model-parallel-size 2 --verify

The checkpoint is reshardable: converted once (default TP=PP=1, one process), it loads at any TP/PP.
Exit status: 0 success, 2 bad input or failed --verify (nothing is written then).
"""

import argparse
import sys

from megatron_rift.convert_args import add_verify_arguments

# Heavy imports happen inside main(): dist_checkpointing.save starts a spawn-context helper process
# that re-imports this file, and it should not pay for torch and Megatron.


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-path", required=True, help="HF folder with config.json and *.safetensors")
    p.add_argument("--output", required=True, help="checkpoint root to create")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument(
        "--expert-model-parallel-size",
        type=int,
        default=1,
        help="MoE models: ranks sharing each layer's experts (the checkpoint reshards to any EP)",
    )
    p.add_argument(
        "--target-dtype",
        choices=["fp32", "bf16"],
        default=None,
        help="stored dtype (default: bf16 if config.json says bfloat16, else fp32)",
    )
    add_verify_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Exit status; leaves the process group to the caller (tests call this under torchrun)."""
    args = parse_args(argv)
    from megatron_rift.convert import ConversionError, convert_hf_to_megatron

    try:
        result = convert_hf_to_megatron(
            args.hf_path,
            args.output,
            target_dtype=args.target_dtype,
            tensor_parallel=args.tensor_model_parallel_size,
            pipeline_parallel=args.pipeline_model_parallel_size,
            expert_parallel=args.expert_model_parallel_size,
            overwrite=args.overwrite,
            verify=args.verify,
            verify_dtype=args.verify_dtype,
            verify_tolerance=args.verify_tolerance,
        )
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {result.output} ({result.arch.hf_model_type}, {result.arch.num_layers} layers, "
        f"{str(result.dtype).removeprefix('torch.')})"
    )
    return 0


# Required: dist_checkpointing.save re-imports the entry script in a helper process.
if __name__ == "__main__":
    status = main()
    from megatron_rift.parallel import destroy_distributed

    destroy_distributed()
    sys.exit(status)
