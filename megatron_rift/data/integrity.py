"""Integrity of a packed dataset (and of its reference log-probs), checked from the files alone.

:func:`check_packed_dataset` reads every file of ``PREFIX`` the way nothing downstream does: the
``.idx`` header, dtype and counts against its own size, the ``.bin`` size against the lengths the
``.idx`` gives, the side file's (and loss spans') ``.npy`` header and size, the JSON sidecar's
counts against the data, and, for datasets packed since checksums exist, the crc32 of each file
(and of the sidecar's own content) that the packer recorded under ``"checksums"`` in
``PREFIX.json``: a flipped byte anywhere is caught instead of trained on. Both format versions
are read (version 1: no ``response_end``, no loss spans, no checksums).

It raises :class:`RolloutDataError` with one sentence naming the file, what is wrong and what to
do. The trainer's preflight and the reference tool call it on every rank before any process
group exists. Imports only numpy and the standard library.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from megatron_rift.data.errors import RolloutDataError
from megatron_rift.data.format import (
    FORMAT_NAME,
    LOSS_SPANS_SUFFIX,
    REF_DTYPE,
    REF_FORMAT,
    SIDE_DTYPE,
    SIDE_DTYPE_V1,
    SPAN_DTYPE,
    TOKEN_DTYPE,
    output_paths,
)
from megatron_rift.data.shared_prefix import SHARED_PREFIX_DTYPE, SHARED_PREFIX_SUFFIX

READABLE_VERSIONS = {1: SIDE_DTYPE_V1, 2: SIDE_DTYPE}
CHECKSUMS_KEY = "checksums"  # in PREFIX.json: {suffix: crc32, ..., "json": crc32 of the rest}
IDX_MAGIC = b"MMIDIDX\x00\x00"  # Megatron's IndexedDataset index header, then version 1
IDX_HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence and document counts
TOKEN_DTYPE_CODE = 4  # Megatron's DType code of int32
BLOCK_BYTES = 1 << 24
REPACK = "Re-pack it with tools/pack_rollouts.py (or copy it again if it was copied)."


def _bad(path: str, what: str) -> RolloutDataError:
    return RolloutDataError(f"{path}: {what}. {REPACK}")


@dataclasses.dataclass
class IndexView:
    """What a ``.idx`` says: per sequence its length (int32 [S]) and byte offset in the ``.bin``
    (int64 [S]); the document boundaries (int64 [D + 1])."""

    lengths: np.ndarray
    pointers: np.ndarray
    document_indices: np.ndarray


def read_index(path: str) -> IndexView:
    """Parse and check a Megatron ``.idx`` (header, version, dtype, counts, its own size)."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(IDX_HEADER_BYTES)
    if len(head) < IDX_HEADER_BYTES or head[:9] != IDX_MAGIC:
        raise _bad(path, "not a Megatron index (bad or short header)")
    version, code, sequences, documents = struct.unpack("<QBQQ", head[9:])
    if version != 1:
        raise _bad(path, f"index version {version}, Megatron's is 1")
    if code != TOKEN_DTYPE_CODE:
        raise _bad(path, f"token dtype code {code}, expected {TOKEN_DTYPE_CODE} ({TOKEN_DTYPE})")
    expected = IDX_HEADER_BYTES + 12 * sequences + 8 * documents
    if size != expected:
        raise _bad(
            path,
            f"{size} bytes, but its header ({sequences} sequences, {documents} document "
            f"boundaries) needs {expected}: the file is truncated or damaged",
        )
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=IDX_HEADER_BYTES)
    lengths = raw[: 4 * sequences].view(np.int32)
    pointers = raw[4 * sequences : 12 * sequences].view(np.int64)
    doc = raw[12 * sequences :].view(np.int64)
    # One sequence per document, in order (what the packer writes).
    if documents != sequences + 1 or np.any(doc != np.arange(documents)):
        raise _bad(path, "document boundaries are not one sequence per document")
    if np.any(lengths < 1):
        raise _bad(path, f"sequence {int(np.argmax(lengths < 1))} has length < 1")
    ends = np.cumsum(lengths, dtype=np.int64) * TOKEN_DTYPE.itemsize
    if sequences and (pointers[0] != 0 or np.any(pointers[1:] != ends[:-1])):
        raise _bad(path, "sequence offsets do not follow the sequence lengths")
    return IndexView(lengths, pointers, doc)


def read_npy_header(path: str) -> tuple[np.dtype, tuple, int]:
    """(dtype, shape, data offset) of a ``.npy``, after checking the file holds all its data."""
    try:
        with open(path, "rb") as handle:
            major, _ = np.lib.format.read_magic(handle)
            if major == 1:
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            offset = handle.tell()
    # numpy parses the header with Python's tokenizer: damage raises ValueError, SyntaxError,
    # tokenize.TokenError, ... (found by tests/test_fuzz_data.py)
    except Exception as err:
        raise _bad(path, f"not a readable .npy file ({err})") from None
    if fortran or len(shape) != 1 or dtype.hasobject:
        raise _bad(path, f"holds a {dtype} array of shape {shape}; expected 1-D rows")
    need = offset + shape[0] * dtype.itemsize
    size = os.path.getsize(path)
    if size != need:
        raise _bad(
            path,
            f"{size} bytes, its header ({shape[0]} rows of {dtype.itemsize} bytes) needs {need}",
        )
    return dtype, shape, offset


def file_crc32(path: str, on_block=None) -> int:
    """crc32 of a file, read in 16 MiB blocks (``on_block(bytes)`` sees each block)."""
    crc = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(BLOCK_BYTES), b""):
            crc = zlib.crc32(block, crc)
            if on_block is not None:
                on_block(block)
    return crc


def description_crc32(info: dict) -> int:
    """crc32 of the sidecar's content without its checksums (key order and spacing ignored)."""
    rest = {key: value for key, value in info.items() if key != CHECKSUMS_KEY}
    return zlib.crc32(json.dumps(rest, sort_keys=True).encode())


def record_checksums(
    prefix: str,
    info: dict,
    spans_path: str | None,
    shared_prefix_path: str | None = None,
    bin_crc32: int | None = None,
) -> dict:
    """The ``"checksums"`` entry the packer writes into ``info`` (files under their final names'
    suffixes; ``prefix`` may be a temporary location). ``bin_crc32``: the ``.bin``'s, when the
    writer computed it as it wrote (the one large file is then not read again)."""
    paths = output_paths(prefix)
    sums = {suffix: file_crc32(paths[suffix]) for suffix in (".idx", ".rewards.npy")}
    sums[".bin"] = file_crc32(paths[".bin"]) if bin_crc32 is None else bin_crc32
    if spans_path is not None:
        sums[LOSS_SPANS_SUFFIX] = file_crc32(spans_path)
    if shared_prefix_path is not None:
        sums[SHARED_PREFIX_SUFFIX] = file_crc32(shared_prefix_path)
    sums["json"] = description_crc32(info)
    return sums


def _read_description(path: str) -> dict:
    try:
        info = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise _bad(path, f"not valid JSON ({err})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
        raise _bad(path, f"not a {FORMAT_NAME} description")
    version = info.get("version")
    if version not in READABLE_VERSIONS:
        raise RolloutDataError(
            f"{path}: format version {version!r}; this megatron-rift reads versions "
            f"{sorted(READABLE_VERSIONS)}. Re-pack it with this version's tools/pack_rollouts.py."
        )
    tokenizer = info.get("tokenizer")
    for key, value in (
        ("rollouts", info.get("rollouts")),
        ("tokenizer.vocab_size", tokenizer.get("vocab_size") if isinstance(tokenizer, dict) else 0),
        ("tokenizer.pad_id", tokenizer.get("pad_id") if isinstance(tokenizer, dict) else 0),
        ("tokenizer.eos_id", tokenizer.get("eos_id") if isinstance(tokenizer, dict) else 0),
    ):
        if type(value) is not int or value < 0 or not isinstance(tokenizer, dict):
            raise _bad(path, f"'{key}' is {value!r}, not a count")
    checksums = info.get(CHECKSUMS_KEY)
    if checksums is not None:
        if not isinstance(checksums, dict) or checksums.get("json") != description_crc32(info):
            raise _bad(path, "its content does not match the checksum the packer recorded")
    return info


def _scan_tokens(path: str, vocab_size: int, size: int, expected_crc: int | None) -> None:
    """Token ids of the ``.bin`` within the vocabulary, and its crc32 when one was recorded."""
    if size % TOKEN_DTYPE.itemsize:
        raise _bad(path, f"{size} bytes, not a whole number of {TOKEN_DTYPE} tokens")
    low, high = [0], [-1]

    def extremes(block: bytes) -> None:
        if len(block) % TOKEN_DTYPE.itemsize == 0 and block:
            ids = np.frombuffer(block, dtype=TOKEN_DTYPE)
            low[0], high[0] = min(low[0], int(ids.min())), max(high[0], int(ids.max()))

    crc = file_crc32(path, extremes)  # BLOCK_BYTES is a multiple of the token size
    if expected_crc is not None and crc != expected_crc:
        raise _bad(path, "its content does not match the crc32 the packer recorded (corrupted)")
    if low[0] < 0 or high[0] >= vocab_size:
        bad = low[0] if low[0] < 0 else high[0]
        raise _bad(path, f"holds token id {bad}, outside the tokenizer's vocabulary {vocab_size}")


def _check_crc(path: str, checksums: dict | None, key: str) -> None:
    if checksums is not None and key in checksums and file_crc32(path) != checksums[key]:
        raise _bad(path, "its content does not match the crc32 the packer recorded (corrupted)")


def _check_side(path: str, version: int, rows: int, checksums: dict | None) -> np.ndarray:
    dtype, shape, _ = read_npy_header(path)
    if dtype != READABLE_VERSIONS[version]:
        raise _bad(
            path, f"dtype {dtype}; format version {version} has {READABLE_VERSIONS[version]}"
        )
    if shape[0] != rows:
        raise _bad(path, f"{shape[0]} rows, but the .idx holds {rows} rollouts")
    _check_crc(path, checksums, ".rewards.npy")
    side = np.load(path, mmap_mode="r")
    if not np.all(np.isfinite(side["reward"])):
        raise _bad(
            path, f"rollout {int(np.argmin(np.isfinite(side['reward'])))} has no finite reward"
        )
    return side


def _check_spans(path: str, rows: int, starts: np.ndarray, checksums: dict | None) -> np.ndarray:
    dtype, _, _ = read_npy_header(path)
    if dtype != SPAN_DTYPE:
        raise _bad(path, f"dtype {dtype}, expected {SPAN_DTYPE}")
    _check_crc(path, checksums, LOSS_SPANS_SUFFIX)
    spans = np.load(path, mmap_mode="r")
    document = np.asarray(spans["document"])
    if (
        np.any(np.diff(document) < 0)
        or np.any((document < 0) | (document >= rows))
        or np.any(spans["start"] < 0)
        or np.any(spans["start"] >= spans["end"])
        or np.any(spans["end"] > starts[np.clip(document, 0, max(rows - 1, 0))])
    ):
        raise _bad(path, "spans out of order or outside the prompts of their documents")
    return spans


def _check_counts(json_path: str, info: dict, index: IndexView, side, spans) -> None:
    """The sidecar's counts against the data; response ranges within their documents."""
    lengths = index.lengths.astype(np.int64)
    starts = np.asarray(side["response_start"], dtype=np.int64)
    ends = (
        np.asarray(side["response_end"], dtype=np.int64)
        if "response_end" in side.dtype.names
        else lengths
    )
    wrong = (starts < 1) | (ends <= starts) | (ends > lengths)
    if np.any(wrong):
        bad = int(np.argmax(wrong))
        raise _bad(
            json_path[: -len(".json")] + ".rewards.npy",
            f"rollout {bad} has response_start {starts[bad]}, response_end {ends[bad]}, not "
            f"1 <= start < end <= {lengths[bad]} (its length); it does not belong to the .idx",
        )
    loss = int((ends - starts).sum())
    if spans is not None:
        loss += int((spans["end"].astype(np.int64) - spans["start"]).sum())
    derived = {
        "rollouts": len(lengths),
        "total_tokens": int(lengths.sum()),
        "prompt_tokens": int(starts.sum()),
        "loss_tokens": loss,
    }
    if info.get("pairs"):
        derived["num_pairs"] = len(lengths) // 2
    for key, value in derived.items():
        if key in info and info[key] != value:
            raise _bad(json_path, f"says {key} = {info[key]!r}, the data has {value}")
    if info.get("pairs") and len(lengths) % 2:
        raise _bad(json_path, f"a pairs dataset with an odd number of documents ({len(lengths)})")


def check_packed_dataset(prefix: str) -> dict:
    """Check every file of the packed dataset ``prefix``; return its ``PREFIX.json`` dict.

    Raises RolloutDataError naming the first damaged or missing file. Reads the whole ``.bin``
    once (crc32 and token id range, about 1 GB/s); everything else is small."""
    paths = output_paths(prefix)
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise RolloutDataError(
            f"packed dataset {prefix}: missing {', '.join(missing)}; pack rollouts with "
            "tools/pack_rollouts.py --output-prefix PREFIX and pass that PREFIX."
        )
    info = _read_description(paths[".json"])
    version, checksums = info["version"], info.get(CHECKSUMS_KEY)
    index = read_index(paths[".idx"])
    _check_crc(paths[".idx"], checksums, ".idx")
    rows = len(index.lengths)
    bin_size = os.path.getsize(paths[".bin"])
    want = int(index.lengths.astype(np.int64).sum()) * TOKEN_DTYPE.itemsize
    if bin_size != want:
        raise _bad(
            paths[".bin"],
            f"{bin_size} bytes, but {paths['.idx']} describes {want} "
            f"({'truncated' if bin_size < want else 'extra bytes'}; an interrupted copy?)",
        )
    vocab = info["tokenizer"]["vocab_size"]
    _scan_tokens(
        paths[".bin"], vocab, bin_size, None if checksums is None else checksums.get(".bin")
    )
    side = _check_side(paths[".rewards.npy"], version, rows, checksums)
    spans = None
    if info.get("loss_spans"):
        if version < 2 or not isinstance(info["loss_spans"], str):
            raise _bad(paths[".json"], f"names loss spans {info['loss_spans']!r}")
        spans_path = os.path.join(os.path.dirname(str(prefix)), info["loss_spans"])
        if not os.path.isfile(spans_path):
            raise RolloutDataError(
                f"packed dataset {prefix}: missing {spans_path} (named by {paths['.json']}). "
                f"{REPACK}"
            )
        spans = _check_spans(spans_path, rows, np.asarray(side["response_start"]), checksums)
    _check_counts(paths[".json"], info, index, side, spans)
    if info.get("shared_prefix"):
        _check_shared_prefix(str(prefix) + SHARED_PREFIX_SUFFIX, index, side, checksums)
    return info


def _check_shared_prefix(path: str, index: IndexView, side, checksums: dict | None) -> None:
    """The negatives' shared prefixes (``--negative-mode divergent``): one int32 per document,
    within its response."""
    if not os.path.isfile(path):
        raise RolloutDataError(f"packed dataset: missing {path} (named by its .json). {REPACK}")
    dtype, shape, _ = read_npy_header(path)
    if dtype != SHARED_PREFIX_DTYPE or shape != (len(index.lengths),):
        raise _bad(
            path, f"dtype {dtype}, shape {shape}; expected {SHARED_PREFIX_DTYPE} per rollout"
        )
    _check_crc(path, checksums, SHARED_PREFIX_SUFFIX)
    shared = np.load(path, mmap_mode="r")
    ends = side["response_end"] if "response_end" in side.dtype.names else index.lengths
    room = np.asarray(ends, dtype=np.int64) - np.asarray(side["response_start"], dtype=np.int64)
    if np.any(shared < 0) or np.any(shared > room):
        raise _bad(path, "a shared prefix outside its rollout's response")


def dataset_fingerprint(prefix: str) -> str:
    """sha256 over the dataset's index, side file(s) and description: any re-pack changes it, and
    hashing them is cheap (the .bin is determined by them for the same inputs)."""
    digest = hashlib.sha256()
    paths = output_paths(prefix)
    files = [paths[".idx"], paths[".rewards.npy"], paths[".json"]]
    if os.path.isfile(str(prefix) + LOSS_SPANS_SUFFIX):  # all-assistant chat data
        files.append(str(prefix) + LOSS_SPANS_SUFFIX)
    for path in files:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def check_reference_logprobs(path_prefix: str, prefix: str, rows: int, need_kl: bool) -> None:
    """The reference log-probs ``path_prefix``.npy/.json belong to the dataset ``prefix`` (its
    fingerprint) and hold ``rows`` whole rows; the per-document token counts are checked when the
    trainer opens them (data.preference.ReferenceLogprobs)."""
    npy, desc = path_prefix + ".npy", path_prefix + ".json"
    missing = [p for p in (npy, desc) if not os.path.isfile(p)]
    if missing:
        raise RolloutDataError(
            f"reference log-probs {path_prefix}: missing {', '.join(missing)}. Compute them "
            f"with tools/compute_ref_logprobs.py --data-path {prefix} --load REF_CKPT, "
            "or train with --reference online"
        )
    recompute = f"Recompute it with tools/compute_ref_logprobs.py --data-path {prefix}."
    try:
        info = json.loads(Path(desc).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise RolloutDataError(f"{desc}: not valid JSON ({err}). {recompute}") from None
    if not isinstance(info, dict) or info.get("format") != REF_FORMAT:
        raise RolloutDataError(f"{desc}: not a {REF_FORMAT} description. {recompute}")
    fingerprint = dataset_fingerprint(prefix)
    if info.get("dataset_fingerprint") != fingerprint:
        raise RolloutDataError(
            f"{desc} was computed for another dataset (fingerprint "
            f"{str(info.get('dataset_fingerprint'))[:12]}..., {prefix} is {fingerprint[:12]}...): "
            f"the dataset was re-packed or the file belongs elsewhere. {recompute}"
        )
    try:
        dtype, shape, _ = read_npy_header(npy)
    except RolloutDataError as err:
        raise RolloutDataError(str(err).replace(REPACK, recompute)) from None
    if dtype != REF_DTYPE or shape != (rows,):
        raise RolloutDataError(
            f"{npy}: dtype {dtype}, shape {shape}; expected {rows} rows of {REF_DTYPE}. {recompute}"
        )
    if need_kl and not info.get("kl_samples", False):
        raise RolloutDataError(
            f"{desc} has no log-probs of KTO's mismatched samples; recompute it without "
            "--skip-kl-samples"
        )
