#!/usr/bin/env python
"""Score a packed dataset once with a frozen reference model: DPO/KTO then train at SFT's memory.

    torchrun --nproc-per-node 8 tools/compute_ref_logprobs.py --load ckpt/base \
        --data-path data/math_pairs --tensor-model-parallel-size 2 --bf16

Writes PREFIX.ref_logprobs.npy (per document: response log-prob sum and token count, and the same
for its KTO mismatched sample) and PREFIX.ref_logprobs.json (the dataset's fingerprint, the
reference checkpoint). The trainer (--objective dpo/kto, --reference precomputed) reads them and
refuses a file computed for another dataset. Model flags are the trainer's: the architecture comes
from the checkpoint's model_config.json. Exit status 2 on bad input, on every rank.
"""

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--load",
        required=True,
        help="reference checkpoint root (converted or trained) or iteration folder",
    )
    p.add_argument("--data-path", required=True, metavar="PREFIX", help="packed dataset")
    p.add_argument(
        "--output",
        default=None,
        metavar="PATH",
        help="output prefix (default: PREFIX.ref_logprobs, where the trainer looks)",
    )
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument(
        "--context-parallel-size",
        type=int,
        default=1,
        help="split each sequence into 2 x CP chunks over CP ranks (as the trainer's flag)",
    )
    p.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument(
        "--seq-length",
        type=int,
        default=None,
        help="tokens per row (default: the longest document, rounded up to 16)",
    )
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true")
    precision.add_argument("--fp16", action="store_true")
    p.add_argument(
        "--transformer-impl", choices=("auto", "transformer_engine", "local"), default="auto"
    )
    p.add_argument(
        "--cross-entropy-loss-fusion",
        action="store_true",
        help="output layer + cross-entropy in chunks of tokens, never the whole micro-batch's "
        "logits (the trainer's flag; same log-probs)",
    )
    p.add_argument(
        "--cross-entropy-fusion-chunk-size",
        type=int,
        default=512,
        help="tokens per chunk of --cross-entropy-loss-fusion",
    )
    p.add_argument(
        "--skip-kl-samples",
        action="store_true",
        help="score only the documents (enough for dpo; kto also needs the "
        "mismatched samples, which double the work)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing reference log-probs")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _error(message: str) -> int:
    rank = os.environ.get("RANK", "0")
    print(f"compute_ref_logprobs: error (rank {rank}): {message}", file=sys.stderr, flush=True)
    return 2


def _model_fields(args: argparse.Namespace, world_size: int, dataset_vocab: int) -> dict:
    """The reference model's GPTArchitecture fields, checked against the layout and the data
    (the trainer's own checks). Raises ConfigError."""
    from megatron_rift.model_source import (
        ConfigError,
        check_architecture,
        check_parallel,
        checkpoint_iteration,
        resolve_architecture,
    )

    tp, pp, cp = (
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        args.context_parallel_size,
    )
    if cp < 1 or world_size % cp:
        raise ConfigError(
            f"--context-parallel-size {cp} does not divide the world size {world_size}"
        )
    check_parallel(tp, pp, world_size // cp)
    if checkpoint_iteration(args.load) is None:
        raise ConfigError(
            f"--load {args.load} has no latest_checkpointed_iteration.txt: not a "
            "checkpoint root (convert one with tools/convert_hf_to_megatron.py)"
        )
    fields, source = resolve_architecture({}, dataset_vocab, args.load)
    check_architecture(fields, tp, pp, dataset_vocab, source)
    return fields


def main(argv=None) -> int:
    from megatron_rift.megatron_compat import quiet_known_messages

    quiet_known_messages()
    args = parse_args(argv)
    from megatron_rift.data.preference import ref_paths

    output = args.output or ref_paths(args.data_path)["npy"][: -len(".npy")]
    if args.micro_batch_size < 1:
        return _error("--micro-batch-size must be at least 1")
    if args.cross_entropy_fusion_chunk_size < 1:
        return _error("--cross-entropy-fusion-chunk-size must be at least 1")
    existing = [p for p in (output + ".npy", output + ".json") if os.path.exists(p)]
    if existing and not args.overwrite:
        return _error(f"{', '.join(existing)} already exist(s); pass --overwrite to replace them")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    from megatron_rift.data.dataset import RewardDataset, fit_seq_length
    from megatron_rift.data.errors import RolloutDataError
    from megatron_rift.data.integrity import check_packed_dataset
    from megatron_rift.model_source import ConfigError

    try:  # every rank checks the same files before any process group exists
        check_packed_dataset(args.data_path)
        dataset = RewardDataset(args.data_path)
        seq_length = fit_seq_length(dataset, args.seq_length)
        if seq_length % (2 * args.context_parallel_size):
            raise ConfigError(
                f"sequence length {seq_length} does not split into 2 x --context-parallel-size "
                f"= {2 * args.context_parallel_size} chunks; pass --seq-length as a multiple"
            )
        vocab = int(dataset.info["tokenizer"]["vocab_size"])
        fields = _model_fields(args, world_size, vocab)
    except (ConfigError, RolloutDataError) as err:
        return _error(str(err))
    # Heavy imports only once the configuration is good.
    from megatron_rift.model import GPTArchitecture
    from megatron_rift.parallel import destroy_distributed, init_distributed
    from megatron_rift.reference import compute_reference_logprobs

    layout = {"context_parallel_size": args.context_parallel_size}
    init_distributed(
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        1234,
        **(layout if args.context_parallel_size > 1 else {}),
    )
    try:
        summary = compute_reference_logprobs(
            args.data_path,
            args.load,
            output,
            GPTArchitecture(**fields),
            seq_length,
            args.micro_batch_size,
            dtype="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
            transformer_impl=args.transformer_impl,
            with_kl=not args.skip_kl_samples,
            progress=not args.no_progress,
            cross_entropy_chunk=(
                args.cross_entropy_fusion_chunk_size if args.cross_entropy_loss_fusion else None
            ),
        )
    finally:
        destroy_distributed()
    if summary is not None:
        print(
            f"wrote {output}.npy and .json: {summary['documents']} documents"
            f"{' (+ KTO mismatched samples)' if summary['kl_samples'] else ''} in "
            f"{summary['seconds']} s, mean log-prob per token {summary['mean_logprob_per_token']:.4f}"
        )
    return 0


# dist_checkpointing may start a spawn-context process that re-imports __main__.
if __name__ == "__main__":
    sys.exit(main())
