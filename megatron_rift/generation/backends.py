"""Sampling backends: K responses per prompt from an HF checkpoint folder.

``transformers`` (``generate`` in batches, left padding, ``num_return_sequences=K``; CPU or GPU)
and ``vllm`` (imported only when chosen; ``auto`` picks it when it is installed and a GPU is
present). Both take prompt *texts* and, per prompt, whether encoding adds the tokenizer's special
tokens (False for chat-template prompts, which hold them already), and stop at EOS, at any id the
model's generation config names, and at ``extra_stop_ids`` (the chat template's end-of-turn).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

BACKENDS = ("auto", "transformers", "vllm")


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
class SampledResponse:
    text: str
    finish_reason: str  # "eos" (stopped) or "length" (hit max_new_tokens)
    num_tokens: int


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
    add_special_tokens: bool | Sequence[bool] = True,
    extra_stop_ids: Sequence[int] = (),
) -> list[list[SampledResponse]]:
    """``config.num_samples`` responses for each prompt -> ``[len(prompts)][K]`` responses.

    Prompts are encoded one by one (``add_special_tokens``: per prompt, or for all) and
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
    if tokenizer.pad_token_id is None:  # Llama 3's tokenizers have none; left padding needs one
        tokenizer.pad_token = tokenizer.eos_token
    pad_id = tokenizer.pad_token_id
    with _hf_progress_bars(show_progress):  # its "Loading weights" bar, once per model
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    stop_ids = _stop_token_ids(model, tokenizer, extra_stop_ids)
    prompt_ids = encode_prompts(tokenizer, prompts, add_special_tokens)
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
        batch = prompt_ids[start : start + batch_size]
        encoded = tokenizer.pad({"input_ids": batch}, return_tensors="pt").to(device)
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


def encode_prompts(
    tokenizer, prompts: Sequence[str], add_special_tokens: bool | Sequence[bool] = True
) -> list[list[int]]:
    """Token ids of each prompt; ``add_special_tokens`` per prompt (or one value for all)."""
    if isinstance(add_special_tokens, bool):
        add_special_tokens = [add_special_tokens] * len(prompts)
    return [
        tokenizer(prompt, add_special_tokens=add)["input_ids"]
        for prompt, add in zip(prompts, add_special_tokens)
    ]


def _stop_token_ids(model, tokenizer, extra: Sequence[int] = ()) -> list[int]:
    """The tokenizer's eos, then any the model's generation config names (chat models have
    several) or ``extra`` adds (the chat template's end-of-turn)."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return [tokenizer.eos_token_id] + sorted(
        {i for i in [*configured, *extra] if i is not None} - {tokenizer.eos_token_id}
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
    add_special_tokens: bool | Sequence[bool] = True,
    extra_stop_ids: Sequence[int] = (),
) -> list[list[SampledResponse]]:
    """Same contract as :func:`sample_with_transformers`, with vLLM (GPU). Prompts go in as
    token ids, so a chat prompt gets no second BOS from vLLM's own encoding."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or model_dir))
    prompt_ids = encode_prompts(tokenizer, prompts, add_special_tokens)
    llm = LLM(model=str(model_dir), tokenizer=str(tokenizer_dir or model_dir), seed=config.seed)
    params = SamplingParams(
        n=config.num_samples,
        temperature=config.temperature,
        top_p=config.top_p,
        max_tokens=config.max_new_tokens,
        seed=config.seed,
        stop_token_ids=list(extra_stop_ids) or None,
    )
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params)
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
