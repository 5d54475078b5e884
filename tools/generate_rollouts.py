#!/usr/bin/env python
"""Sample K responses per problem from an HF checkpoint folder and score them: rollout JSONL.

    python tools/generate_rollouts.py --model hf_model/ --problems train.jsonl --output rollouts.jsonl \\
        --num-samples 8 --temperature 0.7 --top-p 0.8 --max-new-tokens 256 --seed 0 --verifier math

Problems JSONL: ``prompt`` (verbatim) or ``question``, ``answer``, optional ``prompt_id``.
A question is rendered with --prompt-template when given, else as a conversation (--system-prompt,
then the question as a user turn) in the tokenizer's chat template with the assistant header,
sampled until the template's end-of-turn; else with the default --prompt-template for tokenizers
without one. Output records: prompt (the rendered text), response, reward, correct, prompt_id,
answer, sample_index, finish_reason, num_response_tokens, question (when given) and, for chat
prompts, messages (the conversation with the response as its assistant turn). Pack them as they
are: tools/pack_rollouts.py renders messages with the same template.
"""

import argparse
import logging
import sys
import time
from pathlib import Path

from megatron_rift.generation import (
    BACKENDS,
    DEFAULT_PROMPT_TEMPLATE,
    SamplingConfig,
    check_references,
    generate_rollouts,
    load_prompt_tokenizer,
    read_generation_problems,
    write_jsonl,
)
from megatron_rift.rewards import available_verifiers, get_verifier


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="HF checkpoint folder")
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="tokenizer folder (default: the model folder)"
    )
    parser.add_argument("--problems", type=Path, required=True, help="problems JSONL")
    parser.add_argument("--output", type=Path, required=True, help="rollouts JSONL to write")
    parser.add_argument(
        "--num-samples", "-k", type=int, default=8, help="responses per problem (K)"
    )
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.8)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="problems per generate call (x K sequences); transformers backend",
    )
    parser.add_argument("--verifier", default="math", choices=available_verifiers())
    parser.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="auto: vllm when installed and a GPU is present, else transformers",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--prompt-template",
        default=None,
        help="renders records with 'question' but no 'prompt'; a Python format "
        "string with a {question} field.\nDefault: the tokenizer's chat "
        "template (the question as one user turn, then the assistant "
        f"header),\nor {DEFAULT_PROMPT_TEMPLATE!r} for a tokenizer "
        "without one.",
    )
    parser.add_argument(
        "--system-prompt",
        default=None,
        help="a system turn before each question (needs the tokenizer's chat template)",
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (1 is best for tiny models on a busy machine)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        config = SamplingConfig(
            num_samples=args.num_samples,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
        )
        if not args.model.is_dir():
            raise ValueError(f"{args.model}: no such model folder")
        tokenizer = None  # the chat template is needed only without --prompt-template
        if args.prompt_template is None:
            tokenizer = load_prompt_tokenizer(args.tokenizer or args.model)
        problems = read_generation_problems(
            args.problems, args.prompt_template, tokenizer, args.system_prompt
        )
    except ValueError as error:  # ProblemsInputError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 1
    problems = problems[: args.limit] if args.limit else problems
    verifier = get_verifier(args.verifier)
    try:
        check_references(problems, verifier)
    except ValueError as error:
        print(f"error: {args.problems}: {error}", file=sys.stderr)
        return 1
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    start = time.time()
    records = generate_rollouts(
        args.model,
        problems,
        verifier,
        config,
        backend=args.backend,
        tokenizer_dir=args.tokenizer,
        batch_size=args.batch_size,
        device=args.device,
    )
    write_jsonl(records, args.output)
    correct = sum(record["correct"] for record in records)
    print(
        f"wrote {len(records)} rollouts for {len(problems)} problems to {args.output} "
        f"({correct} correct, {100 * correct / len(records):.1f}%) in {time.time() - start:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
