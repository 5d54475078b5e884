"""One small tokenizer interface over an HF tokenizer folder or a SentencePiece ``.model`` file.

    tok = load_tokenizer("path/to/hf_folder")      # or "path/to/spm.model"
    tok.encode("text")                             # list[int], no special tokens
    tok.encode_batch(["a", "b"], add_special_tokens=True)
    tok.eos_id, tok.pad_id, tok.bos_id, tok.vocab_size, tok.name, tok.kind
    tok.chat_format()                              # its chat template (HF folders that have one)

Everything is loaded from local files only. ``add_special_tokens=True`` means "what the tokenizer
puts in front of a text on its own": for an HF tokenizer its configured post-processor (BOS for
Llama-style tokenizers, nothing for Qwen-style ones); for SentencePiece the BOS piece when the
model defines one. ``pad_id`` falls back to ``eos_id`` when the tokenizer has no pad token.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from megatron_rift.data.chat import ChatFormat
from megatron_rift.data.errors import RolloutDataError

_HOW_TO_FIX = (
    "Pass --tokenizer an HF tokenizer folder (tokenizer.json / tokenizer_config.json, "
    "as written by save_pretrained) or a SentencePiece .model file."
)


class RolloutTokenizer:
    """Common interface; build one with :func:`load_tokenizer`."""

    kind: str  # "hf" or "sentencepiece"
    path: str
    name: str
    vocab_size: int  # ids are in [0, vocab_size)
    eos_id: int
    pad_id: int
    bos_id: int | None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.encode_batch([text], add_special_tokens)[0]

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = False
    ) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @property
    def has_chat_template(self) -> bool:
        return False

    def chat_format(self) -> ChatFormat:
        """The tokenizer's chat template (:class:`ChatFormat`); RolloutDataError without one."""
        raise RolloutDataError(
            f"tokenizer {self.path} has no chat template; drop --chat-template, or pass an HF "
            "tokenizer folder whose tokenizer_config.json / chat_template.jinja defines one."
        )

    def encoder_spec(self) -> tuple:
        """A picklable recipe for :func:`encoder_from_spec`: how a worker process rebuilds just
        the encoder (``encode_batch``), as cheaply as possible."""
        return (self.kind, self.path)

    def info(self) -> dict:
        """JSON-ready description, stored in the packed dataset's ``PREFIX.json``."""
        return {
            "kind": self.kind,
            "path": self.path,
            "name": self.name,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "bos_id": self.bos_id,
        }


class HFTokenizer(RolloutTokenizer):
    kind = "hf"

    def __init__(self, folder: str):
        from transformers import AutoTokenizer

        self.path = str(folder)
        try:
            self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except Exception as exc:  # transformers raises many types for a bad folder
            raise RolloutDataError(
                f"could not load an HF tokenizer from {self.path}: {type(exc).__name__}: {exc}. "
                + _HOW_TO_FIX
            ) from exc
        if self._tok.eos_token_id is None:
            raise RolloutDataError(
                f"tokenizer {self.path} has no EOS token; every response must end with EOS. "
                "Set eos_token in its tokenizer_config.json."
            )
        self.name = getattr(self._tok, "name_or_path", None) or Path(self.path).name
        self.vocab_size = len(self._tok)
        self.eos_id = int(self._tok.eos_token_id)
        pad = self._tok.pad_token_id
        self.pad_id = self.eos_id if pad is None else int(pad)
        self.bos_id = None if self._tok.bos_token_id is None else int(self._tok.bos_token_id)
        self._chat_format: ChatFormat | None = None
        # The Rust backend's encode_batch_fast (no offsets) is what the wrapper's __call__ runs,
        # minus the offset bookkeeping: ~3x faster. Slow (Python) tokenizers have no backend.
        self._backend = getattr(self._tok, "backend_tokenizer", None)
        if self._backend is not None and hasattr(self._backend, "encode_batch_fast"):
            self._backend.no_truncation()
            self._backend.no_padding()
        else:
            self._backend = None

    def encode_batch(self, texts, add_special_tokens=False):
        if self._backend is not None:
            encodings = self._backend.encode_batch_fast(
                list(texts), add_special_tokens=add_special_tokens
            )
            return [e.ids for e in encodings]
        return self._tok(
            list(texts),
            add_special_tokens=add_special_tokens,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]

    def decode(self, ids):
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def encoder_spec(self) -> tuple:
        # The Rust backend as configured by the wrapper, serialized: a worker rebuilds it with
        # `tokenizers` alone in ~0.1 s instead of importing transformers (and torch) for ~5 s.
        if self._backend is not None:
            return ("tokenizers-json", self._backend.to_str())
        return super().encoder_spec()

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def chat_format(self) -> ChatFormat:
        if not self.has_chat_template:
            return super().chat_format()
        if self._chat_format is None:
            self._chat_format = ChatFormat(self._tok, self.path)
        return self._chat_format


class SentencePieceTokenizer(RolloutTokenizer):
    kind = "sentencepiece"

    def __init__(self, model_file: str):
        import sentencepiece as spm

        self.path = str(model_file)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(self.path)
        except Exception as exc:  # OSError / RuntimeError depending on the damage
            raise RolloutDataError(
                f"could not load SentencePiece model {self.path}: {exc}. " + _HOW_TO_FIX
            ) from exc
        if self._sp.eos_id() < 0:
            raise RolloutDataError(
                f"SentencePiece model {self.path} has no EOS piece (eos_id=-1); every response must "
                "end with EOS. Retrain it with eos_id set."
            )
        self.name = Path(self.path).name
        self.vocab_size = int(self._sp.get_piece_size())
        self.eos_id = int(self._sp.eos_id())
        self.pad_id = int(self._sp.pad_id()) if self._sp.pad_id() >= 0 else self.eos_id
        self.bos_id = int(self._sp.bos_id()) if self._sp.bos_id() >= 0 else None

    def encode_batch(self, texts, add_special_tokens=False):
        return self._sp.encode(list(texts), add_bos=add_special_tokens and self.bos_id is not None)

    def decode(self, ids):
        return self._sp.decode(list(ids))


class _BackendEncoder:
    """Only ``encode_batch``, from a serialized ``tokenizers.Tokenizer`` (worker processes)."""

    def __init__(self, serialized: str):
        from tokenizers import Tokenizer

        self._backend = Tokenizer.from_str(serialized)

    def encode_batch(self, texts, add_special_tokens=False):
        encodings = self._backend.encode_batch_fast(
            list(texts), add_special_tokens=add_special_tokens
        )
        return [e.ids for e in encodings]


def encoder_from_spec(spec: tuple):
    """Rebuild an object with ``encode_batch`` from :meth:`RolloutTokenizer.encoder_spec`."""
    kind, payload = spec
    if kind == "tokenizers-json":
        return _BackendEncoder(payload)
    return HFTokenizer(payload) if kind == "hf" else SentencePieceTokenizer(payload)


def load_tokenizer(path: str | os.PathLike) -> RolloutTokenizer:
    """Load an HF tokenizer folder or a SentencePiece ``.model`` file (local files only).

    Raises :class:`RolloutDataError` when the path is missing, of an unknown kind, unreadable,
    has no EOS, or encodes text to nothing (a broken conversion).
    """
    path = Path(path)
    if not path.exists():
        raise RolloutDataError(f"tokenizer path {path} does not exist. " + _HOW_TO_FIX)
    if path.is_dir():
        tok: RolloutTokenizer = HFTokenizer(str(path))
    elif path.suffix == ".model":
        tok = SentencePieceTokenizer(str(path))
    else:
        raise RolloutDataError(
            f"tokenizer path {path} is neither a folder nor a .model file. " + _HOW_TO_FIX
        )
    if not tok.encode("hello world 123"):
        # transformers 5's LlamaTokenizer over a fresh SentencePiece model does exactly this.
        raise RolloutDataError(
            f"tokenizer {path} encodes 'hello world 123' to an empty list, so it is broken "
            "(e.g. an HF export of a SentencePiece model). Use the .model file directly."
        )
    return tok
