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
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from megatron_rift.data.tokenizer import RolloutTokenizer, load_tokenizer


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


def encode_rollouts(tok: RolloutTokenizer, prompts: Sequence[str], responses: Sequence[str],
                    chat_template: bool = False) -> EncodedChunk:
    """Tokenize ``prompts[i]`` and ``responses[i]`` separately, append EOS; see module docstring."""
    if chat_template:
        prompt_ids = tok.encode_batch([tok.render_chat_prompt(p) for p in prompts],
                                      add_special_tokens=False)
    else:
        prompt_ids = tok.encode_batch(prompts, add_special_tokens=True)
    response_ids = tok.encode_batch(responses, add_special_tokens=False)
    prompt_lengths = np.fromiter(map(len, prompt_ids), dtype=np.int32, count=len(prompt_ids))
    response_lengths = np.fromiter(map(len, response_ids), dtype=np.int32, count=len(response_ids))
    rollout_lengths = prompt_lengths + response_lengths + 1
    eos = (tok.eos_id,)
    pieces = itertools.chain.from_iterable(
        itertools.chain(p, r, eos) for p, r in zip(prompt_ids, response_ids))
    tokens = np.fromiter(pieces, dtype=np.int32, count=int(rollout_lengths.sum()))
    return EncodedChunk(prompt_lengths, rollout_lengths, tokens)


# --- worker-process side (module globals live in each worker) ---
_WORKER_TOKENIZER: Optional[RolloutTokenizer] = None
_WORKER_CHAT_TEMPLATE = False


def _init_worker(tokenizer_path: str, chat_template: bool) -> None:
    global _WORKER_TOKENIZER, _WORKER_CHAT_TEMPLATE
    # One Rust thread pool per worker process would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_path)
    _WORKER_CHAT_TEMPLATE = chat_template


def _encode_in_worker(prompts: list[str], responses: list[str]) -> EncodedChunk:
    return encode_rollouts(_WORKER_TOKENIZER, prompts, responses, _WORKER_CHAT_TEMPLATE)


class ChunkEncoder:
    """Ordered, memory-bounded ``map`` of :func:`encode_rollouts` over chunks.

    ``workers=1`` encodes in this process. ``workers>1`` starts a "spawn" pool (no fork of a
    process that may hold torch/OpenMP or Rust thread pools); each worker loads the tokenizer
    from ``tokenizer_path`` once. At most ``2 * workers`` chunks are in flight, so memory is
    bounded by the chunk size, not by the input. Use as a context manager.
    """

    def __init__(self, tokenizer: RolloutTokenizer, chat_template: bool, workers: int = 1):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.workers = max(1, int(workers))
        self._pool = None
        if self.workers > 1:
            context = multiprocessing.get_context("spawn")
            self._pool = context.Pool(self.workers, initializer=_init_worker,
                                      initargs=(tokenizer.path, chat_template))

    def map(self, chunks: Iterable[tuple[Any, list[str], list[str]]]
            ) -> Iterator[tuple[Any, EncodedChunk]]:
        """For each ``(payload, prompts, responses)`` yield ``(payload, EncodedChunk)``, in order."""
        if self._pool is None:
            for payload, prompts, responses in chunks:
                yield payload, encode_rollouts(self.tokenizer, prompts, responses,
                                               self.chat_template)
            return
        pending: deque = deque()
        for payload, prompts, responses in chunks:
            pending.append((payload, self._pool.apply_async(_encode_in_worker,
                                                            (prompts, responses))))
            if len(pending) >= 2 * self.workers:
                done_payload, result = pending.popleft()
                yield done_payload, result.get()
        while pending:
            done_payload, result = pending.popleft()
            yield done_payload, result.get()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> "ChunkEncoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
