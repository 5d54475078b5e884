"""Tokenize rollouts chunk by chunk, in this process or in a pool of worker processes.

Prompt and response are tokenized **separately** and concatenated, then EOS is appended:

    tokens = encode(prompt, with the tokenizer's leading special tokens, e.g. BOS)
             + encode(response, no special tokens) + [eos]

Tokenizing ``prompt + response`` as one string would let a merge swallow the boundary (e.g. a
prompt ending in a space and a response starting with a word merge into one token), so the first
response token could not be told apart from the prompt. Separately, the response starts exactly
at ``len(prompt_ids)``. The price: a SentencePiece model adds its word-start marker to the
response's first word, as when the response were a fresh text; sampling with the same split
(prompt ids, then generated ids) gives the same tokens.

With ``chat_template=True`` the prompt is first rendered as one user turn with the generation
prompt (``apply_chat_template(..., add_generation_prompt=True)``) and then encoded with no extra
special tokens (the template writes them).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron_rift.data.tokenizer import RolloutTokenizer, encoder_from_spec


@dataclass
class EncodedChunk:
    """Token ids of n rollouts, concatenated.

    prompt_lengths: int32 [n]; rollout_lengths: int32 [n] (prompt + response + EOS);
    tokens: int32 [sum(rollout_lengths)], rollout i at ``offsets[i]:offsets[i] + rollout_lengths[i]``.
    """

    prompt_lengths: np.ndarray
    rollout_lengths: np.ndarray
    tokens: np.ndarray

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate(([0], np.cumsum(self.rollout_lengths[:-1], dtype=np.int64)))


def encode_rollouts(
    encoder,
    eos_id: int,
    prompts: Sequence[str],
    responses: Sequence[str],
    add_prompt_special_tokens: bool = True,
) -> EncodedChunk:
    """Tokenize ``prompts[i]`` and ``responses[i]`` separately, append EOS; see module docstring.

    ``encoder`` has ``encode_batch(texts, add_special_tokens)`` (a :class:`RolloutTokenizer`
    or a worker's light encoder). Prompts rendered by a chat template are passed with
    ``add_prompt_special_tokens=False``.
    """
    prompt_ids = encoder.encode_batch(prompts, add_special_tokens=add_prompt_special_tokens)
    response_ids = encoder.encode_batch(responses, add_special_tokens=False)
    prompt_lengths = np.fromiter(map(len, prompt_ids), dtype=np.int32, count=len(prompt_ids))
    response_lengths = np.fromiter(map(len, response_ids), dtype=np.int32, count=len(response_ids))
    rollout_lengths = prompt_lengths + response_lengths + 1
    eos = (eos_id,)
    pieces = itertools.chain.from_iterable(
        itertools.chain(p, r, eos) for p, r in zip(prompt_ids, response_ids)
    )
    tokens = np.fromiter(pieces, dtype=np.int32, count=int(rollout_lengths.sum()))
    return EncodedChunk(prompt_lengths, rollout_lengths, tokens)


# --- worker-process side (module globals live in each worker) ---
_WORKER_STATE: tuple | None = None  # (encoder, eos_id, add_prompt_special_tokens)


def _init_worker(encoder_spec: tuple, eos_id: int, add_prompt_special_tokens: bool) -> None:
    global _WORKER_STATE
    # One Rust thread pool per worker process would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_STATE = (encoder_from_spec(encoder_spec), eos_id, add_prompt_special_tokens)


def _encode_in_worker(prompts: list[str], responses: list[str]) -> EncodedChunk:
    encoder, eos_id, add_special = _WORKER_STATE
    return encode_rollouts(encoder, eos_id, prompts, responses, add_special)


class ChunkEncoder:
    """Ordered, memory-bounded ``map`` of :func:`encode_rollouts` over chunks.

    ``workers=1`` encodes in this process. ``workers>1`` starts a "spawn" process pool (no fork
    of a process that may hold torch/OpenMP or Rust thread pools); each worker rebuilds only the
    encoder, once (an HF fast tokenizer travels as its serialized Rust backend, so workers import
    neither transformers nor torch). Chat templates are rendered in this process. At most
    ``2 * workers`` chunks are in flight, so memory is bounded by the chunk size, not by the
    input. Use as a context manager.
    """

    def __init__(self, tokenizer: RolloutTokenizer, chat_template: bool, workers: int = 1):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.workers = max(1, int(workers))
        self._pool: ProcessPoolExecutor | None = None
        if self.workers > 1:
            # An executor, not multiprocessing.Pool: when a worker dies (or its initializer
            # fails) it raises BrokenProcessPool instead of respawning workers forever.
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(tokenizer.encoder_spec(), tokenizer.eos_id, not chat_template),
            )

    def _prompts(self, prompts: list[str]) -> list[str]:
        # Chat templates are rendered here (jinja needs the full HF tokenizer); workers only encode.
        if self.chat_template:
            return [self.tokenizer.render_chat_prompt(p) for p in prompts]
        return prompts

    def map(
        self, chunks: Iterable[tuple[Any, list[str], list[str]]]
    ) -> Iterator[tuple[Any, EncodedChunk]]:
        """For each ``(payload, prompts, responses)`` yield ``(payload, EncodedChunk)``, in order."""
        if self._pool is None:
            for payload, prompts, responses in chunks:
                yield (
                    payload,
                    encode_rollouts(
                        self.tokenizer,
                        self.tokenizer.eos_id,
                        self._prompts(prompts),
                        responses,
                        not self.chat_template,
                    ),
                )
            return
        pending: deque = deque()
        try:
            for payload, prompts, responses in chunks:
                pending.append(
                    (
                        payload,
                        self._pool.submit(_encode_in_worker, self._prompts(prompts), responses),
                    )
                )
                if len(pending) >= 2 * self.workers:
                    done_payload, future = pending.popleft()
                    yield done_payload, future.result()
            while pending:
                done_payload, future = pending.popleft()
                yield done_payload, future.result()
        except BrokenProcessPool as exc:
            raise RuntimeError(
                "a tokenizer worker process died. If a script calls pack_rollouts with "
                "workers > 1, its top level must be guarded by `if __name__ == '__main__':` "
                "(workers are started with 'spawn' and import the main module)."
            ) from exc

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> ChunkEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
