"""The demo's tokenizer: a SentencePiece BPE model trained on the task's text, saved twice over.

Route (see docs/demo_task.md): ``sentencepiece`` trains the model (``tokenizer.model``, what
SentencePiece readers such as Megatron's tokenizer use); we then rebuild the same segmentation as a
``tokenizers`` object from the model's pieces and scores and save it as ``tokenizer.json`` in an HF
folder. We do not wrap the ``.model`` in ``transformers.LlamaTokenizer``: with transformers 5 that
route encodes a freshly trained model to empty lists. :func:`check_tokenizer_folder` verifies that the
HF tokenizer gives the SentencePiece ids and round-trips text exactly.

Training options chosen for exact round trips and arithmetic:
identity normalization and no whitespace folding (decode(encode(x)) == x), no dummy prefix (a response
that starts with a space tokenizes the same alone as after its prompt), digits split one per token
(numbers are spelled digit by digit), byte fallback (any character, even one unseen in training,
round-trips as UTF-8 bytes). No BOS/EOS is added when encoding: who builds sequences appends ``</s>``.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
from tokenizers import Regex, Tokenizer, decoders, models, normalizers

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SENTENCEPIECE_FILE = "tokenizer.model"
DEFAULT_VOCAB_SIZE = 384


def train_sentencepiece(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> bytes:
    """Train a BPE SentencePiece model on ``texts``; returns the serialized model proto.

    ``vocab_size`` counts the 256 byte pieces and 4 specials; ``hard_vocab_limit=False`` lets training
    stop below it when the text has too few distinct pieces.
    """
    texts = [text for text in texts if text]
    if not texts:
        raise ValueError("no text to train the tokenizer on")
    # Every character seen is a piece, next to the 256 byte pieces and the 4 specials.
    minimum = len(set().union(*map(set, texts))) + 256 + 4
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for this text: it needs at least "
            f"{minimum} (its distinct characters + 256 byte pieces + 4 specials)"
        )
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        pad_id=PAD_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        pad_piece=PAD,
        bos_piece=BOS,
        eos_piece=EOS,
        unk_piece=UNK,
        max_sentence_length=1 << 16,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def sentencepiece_to_tokenizers(model_proto: bytes) -> Tokenizer:
    """The same BPE segmentation as a ``tokenizers.Tokenizer`` (ids identical to SentencePiece's).

    SentencePiece's BPE merges, at each step, the adjacent pair whose concatenation is the
    highest-scoring piece; ranking every (left, right) split of every piece by that piece's score gives
    the equivalent merge list for a ``tokenizers`` BPE model.
    """
    processor = spm.SentencePieceProcessor(model_proto=model_proto)
    vocab, learned = {}, []
    for piece_id in range(processor.get_piece_size()):
        piece = processor.id_to_piece(piece_id)
        vocab[piece] = piece_id
        if not (
            processor.is_byte(piece_id)
            or processor.is_control(piece_id)
            or processor.is_unknown(piece_id)
        ):
            learned.append((-processor.get_score(piece_id), piece_id, piece))
    merges = []
    for _, _, piece in sorted(learned):
        for split in range(1, len(piece)):
            left, right = piece[:split], piece[split:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    model = models.BPE(
        vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True, fuse_unk=False
    )
    tokenizer = Tokenizer(model)
    # SentencePiece with identity normalization only maps " " to "▁" (no dummy prefix).
    tokenizer.normalizer = normalizers.Replace(Regex(" "), "▁")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return tokenizer


def save_tokenizer_folder(
    model_proto: bytes, folder: str | Path, model_max_length: int = 4096
) -> Path:
    """Write ``tokenizer.model`` + HF files (``tokenizer.json``, configs) into ``folder`` atomically."""
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        hf_tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=sentencepiece_to_tokenizers(model_proto),
            bos_token=BOS,
            eos_token=EOS,
            unk_token=UNK,
            pad_token=PAD,
            model_max_length=model_max_length,
            clean_up_tokenization_spaces=False,
        )
        hf_tokenizer.save_pretrained(tmp)
        (tmp / SENTENCEPIECE_FILE).write_bytes(model_proto)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def check_tokenizer_folder(folder: str | Path, texts: Iterable[str]) -> None:
    """Raise ValueError unless the saved HF tokenizer encodes every text non-empty, with the same ids
    as the SentencePiece model, decodes it back exactly, and has eos/pad ids set."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    hf_tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = spm.SentencePieceProcessor(model_file=str(folder / SENTENCEPIECE_FILE))
    if (hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) != (EOS_ID, PAD_ID):
        raise ValueError(
            f"{folder}: eos/pad ids are {hf_tokenizer.eos_token_id}/"
            f"{hf_tokenizer.pad_token_id}, expected {EOS_ID}/{PAD_ID}"
        )
    for text in texts:
        ids = hf_tokenizer.encode(text, add_special_tokens=False)
        problem = None
        if not ids:
            problem = "encodes to an empty list"
        elif ids != processor.encode(text):
            problem = "encodes differently from the SentencePiece model"
        elif hf_tokenizer.decode(ids) != text:
            problem = f"does not round-trip (decodes to {hf_tokenizer.decode(ids)!r})"
        if problem:
            raise ValueError(f"{folder}: the HF tokenizer {problem} for text {text!r}")


def train_demo_tokenizer(
    texts: Iterable[str],
    folder: str | Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    check_samples: int = 200,
) -> Path:
    """Train on ``texts``, save the tokenizer folder and check it on the first ``check_samples`` texts.

    Returns the folder; ``AutoTokenizer.from_pretrained(folder)`` loads it.
    """
    texts = list(texts)
    folder = save_tokenizer_folder(train_sentencepiece(texts, vocab_size), folder)
    check_tokenizer_folder(folder, texts[:check_samples])
    return folder


def vocab_size_of(folder: str | Path) -> int:
    """Number of token ids in the saved tokenizer (what the model's embedding must cover)."""
    data = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))
    return len(data["model"]["vocab"])
