"""Tiny tokenizers built on the fly, for tests and benchmarks (never downloaded).

Two kinds, matching the two kinds ``--tokenizer`` accepts:

* an HF *fast* tokenizer folder: a ``tokenizers`` model wrapped in ``PreTrainedTokenizerFast``
  and saved with ``save_pretrained`` (loads with ``AutoTokenizer``);
* a SentencePiece ``.model`` file trained with ``SentencePieceTrainer``.

Do not build the HF folder by wrapping a SentencePiece model in ``LlamaTokenizer``: under
transformers 5 that tokenizer encodes every string to an empty list.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")

# A minimal chat template (jinja), enough to test --chat-template: an assistant turn ends with
# EOS (as Zephyr-style templates do), its end-of-turn; the role markers are plain text.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{{ eos_token if message['role'] == 'assistant' else '' }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _wrap_and_save(backend, folder: Path, chat_template: str | None) -> Path:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    if chat_template is not None:
        hf.chat_template = chat_template
    folder.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(folder))
    return folder


def build_bpe_tokenizer(
    folder: str | Path,
    texts: Iterable[str],
    vocab_size: int = 400,
    chat_template: str | None = TINY_CHAT_TEMPLATE,
    add_bos: bool = True,
) -> Path:
    """Train a byte-level BPE on ``texts`` and save it as an HF tokenizer folder.

    Byte-level: every string is encodable, and merges make "tokenize separately" differ from
    "tokenize the concatenation", which is what the packing tests need to see.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    if add_bos:  # Llama-style: add_special_tokens=True puts <s> in front of a text
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))]
        )
    return _wrap_and_save(backend, Path(folder), chat_template)


def build_wordlevel_tokenizer(
    folder: str | Path, words: Sequence[str], chat_template: str | None = TINY_CHAT_TEMPLATE
) -> Path:
    """A whitespace-split word-level tokenizer over ``words`` (one token per word).

    The benchmark uses it so that "a 64-word prompt" is exactly 64 tokens.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return _wrap_and_save(backend, Path(folder), chat_template)


def train_sentencepiece(
    model_path: str | Path, texts: Iterable[str], vocab_size: int = 200, model_type: str = "unigram"
) -> Path:
    """Train a SentencePiece model on ``texts`` and write it to ``model_path`` (a ``.model``).

    ids: 0 <pad>, 1 <s>, 2 </s>, 3 <unk> (the same layout as the HF tiny tokenizers).
    """
    import sentencepiece as spm

    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    model_path.write_bytes(buffer.getvalue())
    return model_path
