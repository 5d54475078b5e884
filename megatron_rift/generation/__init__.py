"""K sampled responses per problem from an HF checkpoint folder, scored by a verifier: the rollouts.

Backends (:mod:`~megatron_rift.generation.backends`): ``transformers`` (``generate`` in batches,
left padding, ``num_return_sequences=K``; CPU or GPU) and ``vllm`` (imported only when chosen;
``auto`` picks it when it is installed and a GPU is present). Sampling defaults follow the RIFT
paper: K=8, temperature 0.7, top-p 0.8 (top-k off). With the transformers backend the same seed,
batch size and device give identical outputs.

Prompts (:mod:`~megatron_rift.generation.prompts`): a problem's ``prompt`` is used verbatim; a
``question`` alone is rendered with ``--prompt-template`` when given, else as a conversation
(``--system-prompt``, the question as a user turn) in the tokenizer's chat template, else with
:data:`DEFAULT_PROMPT_TEMPLATE`. Sampling stops at EOS and, for chat prompts, at the template's
end-of-turn (the token the pack tool trains as the end of the response).

A rollout record (one JSON line; what the pack tool reads)::

    {"prompt_id", "prompt", "response", "answer", "reward", "correct", "sample_index",
     "finish_reason": "eos" | "length", "num_response_tokens", "question" (when given),
     "messages" (chat prompts: the conversation plus the response as the assistant turn)}

The pack tool reads ``messages`` when present (the chat template renders it again, to the same
prompt tokens) and ``prompt`` / ``response`` otherwise.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from megatron_rift.generation.backends import (
    BACKENDS,
    SampledResponse,
    SamplingConfig,
    resolve_backend,
    sample_with_transformers,
    sample_with_vllm,
    vllm_available,
)
from megatron_rift.generation.prompts import (
    DEFAULT_PROMPT_TEMPLATE,
    GenerationProblem,
    ProblemsInputError,
    chat_format,
    load_prompt_tokenizer,
    read_generation_problems,
    render_question,
)
from megatron_rift.rewards import Verifier

__all__ = [
    "BACKENDS",
    "DEFAULT_PROMPT_TEMPLATE",
    "GenerationProblem",
    "ProblemsInputError",
    "SampledResponse",
    "SamplingConfig",
    "check_references",
    "end_of_turn_ids",
    "generate_rollouts",
    "load_prompt_tokenizer",
    "read_generation_problems",
    "render_question",
    "resolve_backend",
    "vllm_available",
    "write_jsonl",
]
logger = logging.getLogger(__name__)


def check_references(problems: list[GenerationProblem], verifier: Verifier) -> list[str]:
    """Score each reference answer against itself before spending time on sampling.

    Raises ValueError (naming the problem) when the verifier rejects a reference outright (e.g. a
    non-integer answer for the ``integer`` verifier); returns the prompt_ids whose reference does not
    even match itself (every rollout of those would score 0), for the caller to warn about.
    """
    unmatched = []
    for problem in problems:
        try:
            reward = verifier.verify(f"\\boxed{{{problem.answer}}}", problem.answer)
        except ValueError as error:
            raise ValueError(f"problem {problem.prompt_id!r}: {error}") from None
        if reward != 1.0:
            unmatched.append(problem.prompt_id)
    return unmatched


def end_of_turn_ids(tokenizer_dir: str | Path) -> list[int]:
    """[the chat template's end-of-turn token] of the tokenizer in ``tokenizer_dir`` (what the
    pack tool ends a response with), or [] without a template."""
    chat = chat_format(load_prompt_tokenizer(tokenizer_dir))
    return [] if chat is None else [chat.stop_token_id]


def generate_rollouts(
    model_dir: str | Path,
    problems: list[GenerationProblem],
    verifier: Verifier,
    config: SamplingConfig | None = None,
    backend: str = "auto",
    tokenizer_dir: str | Path | None = None,
    batch_size: int = 16,
    device: str = "auto",
    show_progress: bool = True,
) -> list[dict]:
    """Sample K responses per problem and score each; returns rollout records, problem-major."""
    config = config or SamplingConfig()
    unmatched = check_references(problems, verifier)
    if unmatched:
        logger.warning(
            "%d reference answer(s) do not verify against themselves with the %r verifier "
            "(their rollouts will all score 0), e.g. prompt_id %r",
            len(unmatched),
            verifier.name,
            unmatched[0],
        )
    prompts = [problem.prompt for problem in problems]
    # A chat prompt holds its template's special tokens already; it stops at the end-of-turn.
    add_special = [problem.messages is None for problem in problems]
    stop = end_of_turn_ids(tokenizer_dir or model_dir) if not all(add_special) else []
    if resolve_backend(backend) == "vllm":
        samples = sample_with_vllm(model_dir, prompts, config, tokenizer_dir, add_special, stop)
    else:
        samples = sample_with_transformers(
            model_dir,
            prompts,
            config,
            tokenizer_dir,
            batch_size,
            device,
            show_progress=show_progress,
            add_special_tokens=add_special,
            extra_stop_ids=stop,
        )
    records = []
    for problem, responses in zip(problems, samples):
        for sample_index, response in enumerate(responses):
            reward = verifier.verify(response.text, problem.answer)
            record = {
                "prompt_id": problem.prompt_id,
                "prompt": problem.prompt,
                "response": response.text,
                "answer": problem.answer,
                "reward": reward,
                "correct": reward > 0,
                "sample_index": sample_index,
                "finish_reason": response.finish_reason,
                "num_response_tokens": response.num_tokens,
            }
            if problem.question is not None:
                record["question"] = problem.question
            if problem.messages is not None:
                turn = {"role": "assistant", "content": response.text}
                record["messages"] = [*problem.messages, turn]
            records.append(record)
    return records


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    """Write records as JSON lines via a temporary file renamed into place (no half-written output)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
