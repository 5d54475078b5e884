#!/usr/bin/env python
"""Pack rollouts (JSONL / JSON / Parquet / saved datasets) into a Megatron indexed dataset with rewards.

    python tools/pack_rollouts.py --input rollouts.jsonl --output-prefix data/math_k8 \
        --tokenizer path/to/hf_tokenizer --chat-template --max-seq-length 2048

Records hold prompt/response, or a chat conversation in 'messages' (rendered with the tokenizer's
chat template; the loss covers the assistant turns' content and end-of-turn only).

Writes PREFIX.bin, PREFIX.idx, PREFIX.rewards.npy and PREFIX.json (see docs/packing.md).
A thin CLI over megatron_rift.data.packing.pack_rollouts; bad input exits with status 2 and a
message naming the file and line, and leaves no PREFIX.* files behind.
"""

import argparse
import os
import sys

# Keep module level light: worker processes ("spawn") re-import this file.
SCHEMES = ("constant", "raw", "gaussian", "gpg-mean", "gpg-scaled")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE",
        help=".jsonl/.ndjson(.gz), .json (array) or .parquet files, glob patterns, or folders "
        "written by datasets' save_to_disk; read in order",
    )
    p.add_argument("--output-prefix", required=True, metavar="PREFIX")
    p.add_argument(
        "--tokenizer",
        required=True,
        help="HF tokenizer folder (loaded locally) or SentencePiece .model file",
    )
    p.add_argument(
        "--chat-template",
        action="store_true",
        help="pack prompt/response records as one-turn conversations in the HF tokenizer's "
        "chat template (its end-of-turn ends the response, not EOS); 'messages' records "
        "always use the template",
    )
    p.add_argument(
        "--train-on",
        choices=("last-assistant", "all-assistant"),
        default="last-assistant",
        help="which assistant turns of a conversation the loss covers: the last one (the "
        "rewarded response, which must end the conversation) or all of them",
    )
    p.add_argument(
        "--max-seq-length",
        type=int,
        default=None,
        help="longest rollout (prompt + response + EOS, or the whole conversation) in tokens; "
        "use the trainer's --seq-length",
    )
    p.add_argument(
        "--overlong",
        choices=("error", "drop", "truncate"),
        default="error",
        help="what to do with a rollout longer than --max-seq-length",
    )
    p.add_argument("--reward-scheme", choices=SCHEMES, default="constant")
    p.add_argument("--positive-reward", type=float, default=1.0, help="constant scheme")
    p.add_argument("--negative-reward", type=float, default=-0.2, help="constant scheme")
    p.add_argument(
        "--keep",
        choices=("all", "positive"),
        default="all",
        help="'positive' keeps only positive rollouts (an RFT dataset)",
    )
    p.add_argument(
        "--pairs",
        choices=("none", "ground-truth", "given"),
        default="none",
        help="write (chosen, rejected) pairs for dpo/simpo: 'ground-truth' pairs each "
        "rollout with its record's solution (the rollout is chosen when correct, "
        "paper section 4.1); 'given' reads records with chosen/rejected",
    )
    for name in (
        "prompt",
        "response",
        "reward",
        "correct",
        "prompt-id",
        "solution",
        "chosen",
        "rejected",
        "messages",
    ):
        p.add_argument(
            f"--{name}-key",
            default=name.replace("-", "_"),
            metavar="FIELD",
            help=f"record field holding the {name.replace('-', ' ')}",
        )
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--chunk-size", type=int, default=1024, help="rollouts per tokenizer task")
    p.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.*")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="recorded in PREFIX.json; packing itself is deterministic",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tokenizers and files are local only
    import warnings

    # Megatron-Core warns at import about missing TE/Apex, which packing never uses.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megatron_rift.data.errors import RolloutDataError
    from megatron_rift.data.packing import PackConfig, pack_rollouts
    from megatron_rift.data.rollout_reader import RolloutFields

    config = PackConfig(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer=args.tokenizer,
        chat_template=args.chat_template,
        train_on=args.train_on,
        max_seq_length=args.max_seq_length,
        overlong=args.overlong,
        reward_scheme=args.reward_scheme,
        positive_reward=args.positive_reward,
        negative_reward=args.negative_reward,
        keep=args.keep,
        fields=RolloutFields(
            prompt=args.prompt_key,
            response=args.response_key,
            reward=args.reward_key,
            correct=args.correct_key,
            prompt_id=args.prompt_id_key,
            solution=args.solution_key,
            chosen=args.chosen_key,
            rejected=args.rejected_key,
            messages=args.messages_key,
        ),
        pairs=args.pairs,
        workers=args.workers,
        overwrite=args.overwrite,
        seed=args.seed,
        chunk_size=args.chunk_size,
        progress=not args.no_progress,
    )
    try:
        summary = pack_rollouts(config)
    except RolloutDataError as exc:
        print(f"pack_rollouts: error: {exc}", file=sys.stderr)
        return 2
    keys = (
        "problems",
        "rollouts",
        "positive",
        "negative",
        "positive_fraction",
        "mixed_problems",
        "mixed_fraction",
        "prompt_tokens",
        "response_tokens",
        "total_tokens",
        "loss_tokens",
        "overlong",
        "overlong_dropped",
        "overlong_truncated",
        "removed_by_keep",
    )
    if args.pairs != "none":
        keys += ("num_pairs", "pairs_dropped")
    spans = ",loss_spans.npy" if summary["loss_spans"] else ""
    print(f"wrote {args.output_prefix}.{{bin,idx,rewards.npy{spans},shared_prefix.npy,json}}")
    if summary["chat_template"]:
        chat = summary["chat_template"]
        print(f"  chat template sha256 {chat['sha256'][:12]}, end-of-turn {chat['end_of_turn']!r}")
    for key in keys:
        value = summary[key]
        print(f"  {key:20s} {value:.4f}" if isinstance(value, float) else f"  {key:20s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
