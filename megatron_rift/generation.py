"""K sampled responses per problem from an HF checkpoint folder, scored by a verifier: the rollouts.

Backends: ``transformers`` (``generate`` in batches, left padding, ``num_return_sequences=K``, stops at
EOS; CPU or GPU) and ``vllm`` (imported only when chosen; ``auto`` picks it when it is installed and a
GPU is present). Sampling defaults follow the RIFT paper: K=8, temperature 0.7, top-p 0.8 (top-k off).
With the transformers backend the same seed, batch size and device give identical outputs.

Prompts: a problem's ``prompt`` is used verbatim; a ``question`` alone is rendered by
:func:`render_question`: with ``--prompt-template`` when given, else as one user turn in the
tokenizer's chat template, else with :data:`DEFAULT_PROMPT_TEMPLATE`. The rendered text is the
record's ``prompt``, so pack such rollouts *without* ``--chat-template`` (it is applied already).

A rollout record (one JSON line; what the packing tool reads)::

    {"prompt_id", "prompt", "response", "answer", "reward", "correct", "sample_index",
     "finish_reason": "eos" | "length", "num_response_tokens", "question" (when given)}
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from megatron_rift.jsonl import iter_json_objects
from megatron_rift.rewards import Verifier

BACKENDS = ("auto", "transformers", "vllm")
# For a tokenizer without a chat template (a base model): the question and a line break, no
# invented "Q:/A:" framing that the model may never have seen.
DEFAULT_PROMPT_TEMPLATE = "{question}\n"
logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SamplingConfig:
    num_samples: int = 8  # K responses per problem
    temperature: float = 0.7
    top_p: float = 0.8
    max_new_tokens: int = 512
    seed: int = 0

    def __post_init__(self):
        if self.num_samples < 1 or self.max_new_tokens < 1:
            raise ValueError("num_samples and max_new_tokens must be >= 1")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be > 0 and top_p in (0, 1]")


@dataclasses.dataclass
class GenerationProblem:
    prompt_id: str
    prompt: str
    answer: str
    question: str | None = None


@dataclasses.dataclass
class SampledResponse:
    text: str
    finish_reason: str  # "eos" (stopped) or "length" (hit max_new_tokens)
    num_tokens: int


class ProblemsInputError(ValueError):
    """A bad problem record; the message names the file and line."""


def load_prompt_tokenizer(folder: str | Path):
    """The HF tokenizer of ``folder`` (local files), for :func:`render_question`."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:  # transformers raises many types for a bad folder
        raise ValueError(
            f"{folder}: could not load its tokenizer ({type(error).__name__}: "
            f"{error}); pass --tokenizer, or --prompt-template to do "
            "without"
        ) from None


def render_question(question: str, tokenizer=None, prompt_template: str | None = None) -> str:
    """The prompt text the model is sampled from for ``question``.

    ``prompt_template`` (with a ``{question}`` field) wins when given; else an HF ``tokenizer``
    with a chat template renders the question as one user turn followed by the assistant header
    (``apply_chat_template(..., add_generation_prompt=True)``); else
    :data:`DEFAULT_PROMPT_TEMPLATE`.
    """
    if prompt_template is not None:
        return prompt_template.format(question=question)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        return _without_added_bos(text, tokenizer)
    return DEFAULT_PROMPT_TEMPLATE.format(question=question)


def _without_added_bos(text: str, tokenizer) -> str:
    """``text`` minus a leading BOS when encoding adds one itself.

    Generation and packing encode a prompt with the tokenizer's special tokens; a chat template
    that writes BOS too (Llama 3's does) would otherwise give the model two.
    """
    bos = tokenizer.bos_token
    if not bos or not text.startswith(bos):
        return text
    adds_bos = tokenizer("", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]
    return text[len(bos) :] if adds_bos else text


def read_generation_problems(
    path: str | Path, prompt_template: str | None = None, tokenizer=None
) -> list[GenerationProblem]:
    """Problems JSONL -> problems. Each line needs ``prompt`` (used verbatim) or ``question``
    (rendered by :func:`render_question` with ``tokenizer`` and ``prompt_template``), and
    ``answer``; ``prompt_id`` is optional (default: the line number)."""
    path = Path(path)
    if not path.is_file():
        raise ProblemsInputError(f"{path}: no such problems file")
    problems, seen = [], {}
    for lineno, where, record in iter_json_objects(path, ProblemsInputError):
        question, prompt = record.get("question"), record.get("prompt")
        if not isinstance(prompt, str) and not isinstance(question, str):
            raise ProblemsInputError(f"{where}: needs a string field 'prompt' or 'question'")
        if record.get("answer") is None or isinstance(record["answer"], (dict, list, bool)):
            raise ProblemsInputError(
                f"{where}: needs field 'answer' (a string or number) to score the responses"
            )
        prompt_id = str(record.get("prompt_id", f"{path.stem}-{lineno:06d}"))
        if prompt_id in seen:
            raise ProblemsInputError(
                f"{where}: prompt_id {prompt_id!r} already used on line {seen[prompt_id]}"
            )
        seen[prompt_id] = lineno
        if not isinstance(prompt, str):
            prompt = render_question(question, tokenizer, prompt_template)
        problems.append(
            GenerationProblem(
                prompt_id,
                prompt,
                str(record["answer"]),
                question if isinstance(question, str) else None,
            )
        )
    if not problems:
        raise ProblemsInputError(f"{path}: no problems (the file is empty)")
    return problems


def _progress(total: int, description: str):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=description, unit="problem", disable=os.environ.get("TQDM_DISABLE") == "1"
    )


@contextlib.contextmanager
def _hf_progress_bars(enabled: bool):
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled and not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()


def sample_with_transformers(
    model_dir: str | Path,
    prompts: list[str],
    config: SamplingConfig,
    tokenizer_dir: str | Path | None = None,
    batch_size: int = 16,
    device: str = "auto",
    dtype: str = "auto",
    show_progress: bool = True,
) -> list[list[SampledResponse]]:
    """``config.num_samples`` responses for each prompt -> ``[len(prompts)][K]`` responses.

    Prompts are encoded with the tokenizer's defaults (the special tokens it adds, if any) and
    left-padded in batches of ``batch_size`` prompts (``batch_size * K`` sequences per generate call).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if dtype == "auto":
        dtype = (
            "bfloat16"
            if device.startswith("cuda") and torch.cuda.is_bf16_supported()
            else "float32"
        )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir, padding_side="left")
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"the tokenizer in {tokenizer_dir or model_dir} has no eos token; "
            "generation could not stop"
        )
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    with _hf_progress_bars(show_progress):  # its "Loading weights" bar, once per model
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    stop_ids = _stop_token_ids(model, tokenizer)
    generation_config = GenerationConfig(
        do_sample=True,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=0,
        max_new_tokens=config.max_new_tokens,
        num_return_sequences=config.num_samples,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
    )
    results: list[list[SampledResponse]] = []
    progress = _progress(len(prompts), "sampling") if show_progress else None
    for batch_index, start in enumerate(range(0, len(prompts), batch_size)):
        batch = prompts[start : start + batch_size]
        encoded = tokenizer(batch, return_tensors="pt", padding=True).to(device)
        # One seed per batch: a batch's samples do not depend on how many steps earlier batches took.
        torch.manual_seed(config.seed * 1_000_003 + batch_index)
        with torch.no_grad():
            output = model.generate(**encoded, generation_config=generation_config)
        new_tokens = output[:, encoded["input_ids"].shape[1] :].tolist()
        for prompt_index in range(len(batch)):
            samples = new_tokens[
                prompt_index * config.num_samples : (prompt_index + 1) * config.num_samples
            ]
            results.append([_decode_sample(tokenizer, tokens, stop_ids) for tokens in samples])
        if progress is not None:
            progress.update(len(batch))
    if progress is not None:
        progress.close()
    return results


def _stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's eos plus any the model's generation config names (chat models have several)."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return [tokenizer.eos_token_id] + sorted(
        {i for i in configured if i is not None} - {tokenizer.eos_token_id}
    )


def _decode_sample(tokenizer, tokens: list[int], stop_ids: list[int]) -> SampledResponse:
    """Cut at the first stop token (which the response does not include) and decode."""
    stop = next((index for index, token in enumerate(tokens) if token in stop_ids), None)
    if stop is None:
        reason = "length"
    else:
        tokens, reason = tokens[:stop], "eos"
    return SampledResponse(tokenizer.decode(tokens, skip_special_tokens=True), reason, len(tokens))


def sample_with_vllm(
    model_dir: str | Path,
    prompts: list[str],
    config: SamplingConfig,
    tokenizer_dir: str | Path | None = None,
) -> list[list[SampledResponse]]:
    """Same contract as :func:`sample_with_transformers`, with vLLM (GPU)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), tokenizer=str(tokenizer_dir or model_dir), seed=config.seed)
    params = SamplingParams(
        n=config.num_samples,
        temperature=config.temperature,
        top_p=config.top_p,
        max_tokens=config.max_new_tokens,
        seed=config.seed,
    )
    outputs = llm.generate(prompts, params)
    return [
        [
            SampledResponse(
                c.text, "eos" if c.finish_reason == "stop" else "length", len(c.token_ids)
            )
            for c in output.outputs
        ]
        for output in outputs
    ]


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        import torch

        return "vllm" if vllm_available() and torch.cuda.is_available() else "transformers"
    if backend == "vllm" and not vllm_available():
        raise ValueError(
            "backend 'vllm' chosen but vllm is not installed; use --backend transformers"
        )
    return backend


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
    if resolve_backend(backend) == "vllm":
        samples = sample_with_vllm(model_dir, prompts, config, tokenizer_dir)
    else:
        samples = sample_with_transformers(
            model_dir,
            prompts,
            config,
            tokenizer_dir,
            batch_size,
            device,
            show_progress=show_progress,
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
