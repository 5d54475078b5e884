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

Chat conversations (``messages`` records, or prompt/response records under ``--chat-template``)
are rendered in the main process into a :class:`~megatron_rift.data.chat.ChatPlan` and tokenized
here as the whole conversation plus its prefixes (:func:`~megatron_rift.data.chat.conversation_tokens`):
their tokens are exactly the chat template's, the trained spans the assistant turns.
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

from megatron_rift.data.chat import ChatPlan, conversation_tokens
from megatron_rift.data.tokenizer import RolloutTokenizer, encoder_from_spec


@dataclass
class DocumentBatch:
    """One chunk of documents to tokenize, in order: plain rollouts (``prompts[i]``,
    ``responses[i]``) and conversations (``chats``); ``is_chat[j]`` says which list document j
    comes from (None: all plain, the fast path). ``chat_spec``: the chat format's
    :meth:`~megatron_rift.data.chat.ChatFormat.worker_spec` when there are conversations."""

    prompts: list[str]
    responses: list[str]
    chats: list[ChatPlan]
    is_chat: list[bool] | None = None
    chat_spec: tuple | None = None

    def __len__(self) -> int:
        return len(self.prompts) + len(self.chats)


@dataclass
class EncodedChunk:
    """Token ids of n rollouts, concatenated.

    prompt_lengths: int32 [n], tokens before the response (its start); rollout_lengths: int32 [n];
    tokens: int32 [sum(rollout_lengths)], rollout i at ``offsets[i]:offsets[i] + rollout_lengths[i]``;
    response_ends: int32 [n], end of the response's trained tokens (EOS or end-of-turn included;
    None: the rollout's end); extra_spans: ``(i, start, end)`` of earlier trained assistant turns;
    errors: ``{i: message}`` for conversations that could not be tokenized consistently.
    """

    prompt_lengths: np.ndarray
    rollout_lengths: np.ndarray
    tokens: np.ndarray
    response_ends: np.ndarray | None = None
    extra_spans: tuple = ()
    errors: dict | None = None

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate(([0], np.cumsum(self.rollout_lengths[:-1], dtype=np.int64)))

    @property
    def ends(self) -> np.ndarray:
        return self.rollout_lengths if self.response_ends is None else self.response_ends


def encode_prompts(encoder, prompts: Sequence[str], add_special_tokens: bool) -> list:
    """``encoder.encode_batch(prompts)``, each distinct prompt encoded once: the K rollouts of a
    problem share their prompt, and a chunk holds them next to each other."""
    first: dict[str, int] = {}
    for prompt in prompts:
        first.setdefault(prompt, len(first))
    if len(first) == len(prompts):
        return encoder.encode_batch(prompts, add_special_tokens=add_special_tokens)
    encoded = encoder.encode_batch(list(first), add_special_tokens=add_special_tokens)
    return [encoded[first[prompt]] for prompt in prompts]


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
    prompt_ids = encode_prompts(encoder, prompts, add_prompt_special_tokens)
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


def encode_documents(encoder, eos_id: int, batch: DocumentBatch) -> EncodedChunk:
    """Tokenize a :class:`DocumentBatch`: plain rollouts as :func:`encode_rollouts` (the
    prompt with the tokenizer's leading special tokens), conversations with
    :func:`~megatron_rift.data.chat.conversation_tokens`."""
    if batch.is_chat is None:
        return encode_rollouts(encoder, eos_id, batch.prompts, batch.responses)
    plain = iter(
        zip(
            encode_prompts(encoder, batch.prompts, add_special_tokens=True),
            encoder.encode_batch(batch.responses, add_special_tokens=False),
        )
        if batch.prompts
        else ()
    )
    chats = iter(conversation_tokens(encoder, batch.chats, batch.chat_spec))
    documents, starts, ends, extra, errors = [], [], [], [], {}
    for j, is_chat in enumerate(batch.is_chat):
        if not is_chat:
            prompt, response = next(plain)
            documents.append([*prompt, *response, eos_id])
            starts.append(len(prompt))
            ends.append(len(documents[-1]))
            continue
        result = next(chats)
        if isinstance(result, str):  # the writer raises it with the record's location
            errors[j] = result
            result = ([], [(0, 0)])
        ids, spans = result
        documents.append(ids)
        starts.append(spans[-1][0])
        ends.append(spans[-1][1])
        extra += [(j, start, end) for start, end in spans[:-1]]
    lengths = np.fromiter(map(len, documents), dtype=np.int32, count=len(documents))
    tokens = np.fromiter(
        itertools.chain.from_iterable(documents), dtype=np.int32, count=int(lengths.sum())
    )
    return EncodedChunk(
        np.asarray(starts, dtype=np.int32),
        lengths,
        tokens,
        np.asarray(ends, dtype=np.int32),
        tuple(extra),
        errors or None,
    )


# --- worker-process side (module globals live in each worker) ---
_WORKER_STATE: tuple | None = None  # (encoder, eos_id)


def _init_worker(encoder_spec: tuple, eos_id: int) -> None:
    global _WORKER_STATE
    # One Rust thread pool per worker process would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_STATE = (encoder_from_spec(encoder_spec), eos_id)


def _encode_in_worker(batch: DocumentBatch) -> EncodedChunk:
    encoder, eos_id = _WORKER_STATE
    return encode_documents(encoder, eos_id, batch)


class ChunkEncoder:
    """Ordered, memory-bounded ``map`` of :func:`encode_documents` over chunks.

    ``workers=1`` encodes in this process. ``workers>1`` starts a "spawn" process pool (no fork
    of a process that may hold torch/OpenMP or Rust thread pools); each worker rebuilds only the
    encoder, once (an HF fast tokenizer travels as its serialized Rust backend, so workers import
    neither transformers nor torch). Chat templates are rendered in this process (into the
    chunk's :class:`ChatPlan` s); workers only encode. At most ``2 * workers`` chunks are in
    flight, so memory is bounded by the chunk size, not by the input. Use as a context manager.
    """

    def __init__(self, tokenizer: RolloutTokenizer, workers: int = 1):
        self.tokenizer = tokenizer
        self.workers = max(1, int(workers))
        self._pool: ProcessPoolExecutor | None = None
        if self.workers > 1:
            # An executor, not multiprocessing.Pool: when a worker dies (or its initializer
            # fails) it raises BrokenProcessPool instead of respawning workers forever.
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(tokenizer.encoder_spec(), tokenizer.eos_id),
            )

    def map(
        self, chunks: Iterable[tuple[Any, DocumentBatch]]
    ) -> Iterator[tuple[Any, EncodedChunk]]:
        """For each ``(payload, DocumentBatch)`` yield ``(payload, EncodedChunk)``, in order."""
        if self._pool is None:
            for payload, batch in chunks:
                yield payload, encode_documents(self.tokenizer, self.tokenizer.eos_id, batch)
            return
        pending: deque = deque()
        try:
            for payload, batch in chunks:
                pending.append((payload, self._pool.submit(_encode_in_worker, batch)))
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
