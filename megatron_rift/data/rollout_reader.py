"""Stream rollout records from JSONL, JSON, Parquet files or saved ``datasets`` and validate each.

A record is one rollout: ``prompt`` (str) and ``response`` (str, not blank), or ``messages`` (a
chat conversation ending, by default, with the rewarded assistant turn; see
:mod:`megatron_rift.data.chat`), and ``reward`` (a finite number) and/or ``correct`` (bool);
``prompt_id`` (str or int) is optional and groups the K rollouts of one problem (default:
identical prompt text, or identical conversation minus its last assistant turn). Field names can
be remapped with :class:`RolloutFields`.

When both ``reward`` and ``correct`` are given, ``correct`` decides whether the rollout is positive
and ``reward`` is its raw reward. With ``correct`` only, the raw reward is 1.0 / 0.0.

Formats, chosen by file extension:

* ``.jsonl`` / ``.ndjson`` (optionally ``.gz``): parsed here line by line with ``json.loads`` so
  that an error names the exact line (``datasets`` reports malformed JSON only by byte offset);
* ``.json`` (a JSON array, or JSON lines) and ``.parquet``: streamed with
  ``datasets.load_dataset(..., streaming=True)``; errors name the record number (1-based);
* a folder written by ``Dataset.save_to_disk``: ``datasets.load_from_disk`` (memory-mapped).

An input may also be a glob pattern (``data/*.jsonl``), expanded in sorted order.

Memory: one record at a time (a JSON array file is parsed whole by ``datasets``/pyarrow).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path

from megatron_rift.data.chat import conversation_key, parse_messages
from megatron_rift.data.errors import RolloutDataError, check_encodable

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
DATASETS_FORMATS = {".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class RolloutFields:
    """Names of the record fields (``--prompt-key`` etc.)."""

    prompt: str = "prompt"
    response: str = "response"
    reward: str = "reward"
    correct: str = "correct"
    prompt_id: str = "prompt_id"
    solution: str = "solution"  # --pairs ground-truth: the problem's reference solution
    chosen: str = "chosen"  # --pairs given
    rejected: str = "rejected"
    messages: str = "messages"  # a chat conversation instead of prompt/response


@dataclass(frozen=True)
class Location:
    """Where a record came from: ``line`` for JSONL, ``record`` (1-based) otherwise."""

    path: str
    number: int
    is_line: bool

    def __str__(self) -> str:
        return (
            f"{self.path}:{self.number}" if self.is_line else f"{self.path}: record {self.number}"
        )


@dataclass(frozen=True)
class Rollout:
    prompt: str | None  # None for a chat conversation
    response: str | None
    raw_reward: float  # the given reward, or 1.0/0.0 from `correct`
    outcome: (
        int  # +1 positive (correct, or reward > 0), -1 negative, 0 reward exactly 0 (no `correct`)
    )
    group_key: bytes  # digest of prompt_id (or of the prompt text): groups a problem's rollouts
    where: Location
    messages: tuple[dict, ...] | None = None  # a chat conversation (then prompt/response are None)

    def with_response(self, response: str, raw_reward: float, outcome: int) -> Rollout:
        """The same prompt (or conversation before the last assistant turn) with another response."""
        if self.messages is None:
            return Rollout(self.prompt, response, raw_reward, outcome, self.group_key, self.where)
        last = {**self.messages[-1], "content": response}
        messages = (*self.messages[:-1], last)
        return Rollout(None, None, raw_reward, outcome, self.group_key, self.where, messages)


def input_format(path: str) -> str:
    """'jsonl', 'json' or 'parquet' from the file name; a clear error otherwise."""
    name = Path(path).name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    for suffix, fmt in DATASETS_FORMATS.items():
        if name.endswith(suffix):
            return fmt
    raise RolloutDataError(
        f"{path}: unknown input format; name the file .jsonl (one JSON object per line), .json "
        "(a JSON array) or .parquet."
    )


def _iter_jsonl(path: str) -> Iterator[tuple[object, Location]]:
    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rb") as handle:
        for line_no, line in enumerate(handle, 1):
            if line.isspace() or not line:  # isspace stops at the first other byte; strip copies
                continue
            try:
                # JSON Lines is UTF-8; decoding here skips json's encoding detection per line.
                record = json.loads(line.decode("utf-8"))
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                raise RolloutDataError(
                    f"{path}:{line_no}: malformed JSON ({exc}). Each line must be one JSON object; "
                    "fix or remove this line."
                ) from None
            yield record, Location(path, line_no, True)


def _iter_with_datasets(path: str, fmt: str) -> Iterator[tuple[object, Location]]:
    import datasets

    number = 0
    try:
        stream = datasets.load_dataset(fmt, data_files=[path], split="train", streaming=True)
        for number, record in enumerate(stream, 1):
            yield record, Location(path, number, False)
    except RolloutDataError:
        raise
    except Exception as exc:  # pyarrow / datasets raise many types for a bad file
        hint = (
            " If the file holds one JSON object per line, name it .jsonl to get the exact "
            "line of the error."
            if fmt == "json"
            else ""
        )
        raise RolloutDataError(
            f"{path}: could not read it as {fmt} with `datasets` after {number} records "
            f"({type(exc).__name__}: {exc}). Check that the file is valid {fmt}.{hint}"
        ) from None


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).is_file() for name in ("state.json", "dataset_dict.json")
    )


def _iter_saved_dataset(path: str) -> Iterator[tuple[object, Location]]:
    import datasets

    try:
        dataset = datasets.load_from_disk(path)
    except Exception as exc:  # datasets raises many types for a damaged folder
        raise RolloutDataError(
            f"{path}: could not load it with datasets.load_from_disk ({type(exc).__name__}: "
            f"{exc}). Pass a folder written by Dataset.save_to_disk."
        ) from None
    if isinstance(dataset, datasets.DatasetDict):
        if len(dataset) != 1:
            raise RolloutDataError(
                f"{path}: a DatasetDict with splits {sorted(dataset)}; pass one split's folder "
                f"(e.g. {Path(path) / sorted(dataset)[0]})."
            )
        dataset = next(iter(dataset.values()))
    for number, record in enumerate(dataset, 1):
        yield record, Location(path, number, False)


def expand_inputs(paths: Sequence[str]) -> list[str]:
    """Input paths with glob patterns expanded (sorted); RolloutDataError for a missing input."""
    expanded = []
    for path in map(str, paths):
        if glob.has_magic(path):
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                raise RolloutDataError(f"input pattern {path} matches no files.")
            expanded += matches
        elif Path(path).is_file() or _is_saved_dataset(Path(path)):
            expanded.append(path)
        elif Path(path).is_dir():
            raise RolloutDataError(
                f"input {path} is a folder but not one written by Dataset.save_to_disk; pass "
                f"its files or a pattern such as '{Path(path) / '*.jsonl'}'."
            )
        else:
            raise RolloutDataError(f"input file {path} does not exist (or is not a file).")
    return expanded


def iter_records(paths: Sequence[str]) -> Iterator[tuple[object, Location]]:
    """Yield ``(record, location)`` for every record of every input, in order."""
    for path in expand_inputs(paths):
        if _is_saved_dataset(Path(path)):
            yield from _iter_saved_dataset(path)
            continue
        fmt = input_format(path)
        yield from (_iter_jsonl(path) if fmt == "jsonl" else _iter_with_datasets(path, fmt))


def _group_key(prompt_id: object, prompt: str) -> bytes:
    # A 16-byte digest keeps the group table small even for long prompts.
    text = f"id:{prompt_id}" if prompt_id is not None else f"prompt:{prompt}"
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


FLOAT32_MAX = 3.4028234663852886e38


def _text_field(
    record: dict, name: str, flag: str, where: Location, non_blank: bool = False
) -> str:
    value = record.get(name)
    if value is None:
        raise RolloutDataError(
            f"{where}: missing field '{name}'. Add it, or point {flag} at the field that holds "
            f"it (fields present: {sorted(record)})."
        )
    if not isinstance(value, str):
        raise RolloutDataError(
            f"{where}: field '{name}' must be a string, got {type(value).__name__}."
        )
    if non_blank and not value.strip():
        raise RolloutDataError(
            f"{where}: field '{name}' is empty; there is nothing to train on. "
            "Remove the record or fill the field."
        )
    check_encodable(value, f"{where}: field '{name}'")
    return value


def _check_object(record: object, where: Location) -> dict:
    if not isinstance(record, dict):
        raise RolloutDataError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    return record


def _prompt_id(record: dict, fields: RolloutFields, where: Location):
    prompt_id = record.get(fields.prompt_id)
    if prompt_id is not None and (
        isinstance(prompt_id, bool) or not isinstance(prompt_id, (str, Integral))
    ):
        raise RolloutDataError(
            f"{where}: field '{fields.prompt_id}' must be a string or an "
            f"integer, got {prompt_id!r}."
        )
    return prompt_id


def parse_rollout(
    record: object, fields: RolloutFields, where: Location, train_on: str = "last-assistant"
) -> Rollout:
    """Validate one record; raise :class:`RolloutDataError` naming ``where`` and the field.

    A record with a (non-null) ``messages`` field is a chat conversation; otherwise it needs
    ``prompt`` and ``response``."""
    record = _check_object(record, where)
    messages = record.get(fields.messages)
    if messages is not None:
        messages = parse_messages(messages, fields.messages, where, train_on)
        prompt = response = None
    else:
        prompt = _text_field(record, fields.prompt, "--prompt-key", where)
        response = _text_field(record, fields.response, "--response-key", where, non_blank=True)

    correct = record.get(fields.correct)
    if correct is not None and not isinstance(correct, bool):
        raise RolloutDataError(
            f"{where}: field '{fields.correct}' must be true or false, got {correct!r}."
        )
    reward = record.get(fields.reward)
    if reward is not None:
        if isinstance(reward, bool) or not isinstance(reward, Real):
            raise RolloutDataError(
                f"{where}: field '{fields.reward}' must be a number, got {reward!r}."
            )
        try:
            reward = float(reward)
        except OverflowError:  # an integer beyond float's range (found by test_fuzz_data)
            reward = math.inf if reward > 0 else -math.inf
        # The packed side file stores float32: a larger reward would become inf there, and the
        # group schemes' statistics NaN (found by tests/test_fuzz_data.py).
        if not math.isfinite(reward) or abs(reward) > FLOAT32_MAX:
            raise RolloutDataError(
                f"{where}: field '{fields.reward}' is {reward:g}; rewards must be "
                f"finite numbers within float32's range (|reward| <= {FLOAT32_MAX:.3g}). Fix the "
                "reward or drop the record."
            )
    if reward is None and correct is None:
        raise RolloutDataError(
            f"{where}: no reward: give '{fields.reward}' (a finite number) or '{fields.correct}' "
            "(true/false), or remap them with --reward-key / --correct-key. (A JSON array or "
            "Parquet file stores NaN as null, so a NaN reward also lands here.)"
        )

    prompt_id = _prompt_id(record, fields, where)
    if correct is not None:
        outcome = 1 if correct else -1
    else:
        outcome = (reward > 0) - (reward < 0)
    raw_reward = reward if reward is not None else float(correct)
    if messages is None:
        return Rollout(prompt, response, raw_reward, outcome, _group_key(prompt_id, prompt), where)
    key = _group_key(prompt_id, "messages:" + conversation_key(messages))
    return Rollout(None, None, raw_reward, outcome, key, where, messages)


def iter_rollouts(
    paths: Sequence[str], fields: RolloutFields = RolloutFields(), train_on: str = "last-assistant"
) -> Iterator[Rollout]:
    """Validated rollouts of all inputs, in input order."""
    for record, where in iter_records(paths):
        yield parse_rollout(record, fields, where, train_on)


PAIRS_MODES = ("none", "ground-truth", "given")


def _ground_truth_pair(
    record: object, fields: RolloutFields, where: Location
) -> tuple[Rollout, Rollout]:
    """Paper section 4.1: the rollout is preferred to the ground-truth solution when it is
    correct, the ground truth otherwise. Returns (chosen, rejected)."""
    rollout = parse_rollout(record, fields, where)
    solution = _text_field(record, fields.solution, "--solution-key", where, non_blank=True)
    truth = rollout.with_response(solution, 1.0, 1)
    return (rollout, truth) if rollout.outcome > 0 else (truth, rollout)


def _given_pair(record: object, fields: RolloutFields, where: Location) -> tuple[Rollout, Rollout]:
    record = _check_object(record, where)
    prompt = _text_field(record, fields.prompt, "--prompt-key", where)
    chosen = _text_field(record, fields.chosen, "--chosen-key", where, non_blank=True)
    rejected = _text_field(record, fields.rejected, "--rejected-key", where, non_blank=True)
    key = _group_key(_prompt_id(record, fields, where), prompt)
    return Rollout(prompt, chosen, 1.0, 1, key, where), Rollout(
        prompt, rejected, 0.0, -1, key, where
    )


def iter_documents(
    paths: Sequence[str],
    fields: RolloutFields = RolloutFields(),
    pairs: str = "none",
    train_on: str = "last-assistant",
) -> Iterator[Rollout]:
    """The documents a packed dataset holds, in order: one per rollout (``pairs="none"``), or
    two per record, chosen then rejected (``"ground-truth"``: a rollout, or a conversation, with
    its problem's ``solution`` as the other response; ``"given"``: a record with ``prompt``,
    ``chosen`` and ``rejected``)."""
    if pairs == "none":
        yield from iter_rollouts(paths, fields, train_on)
        return
    make_pair = {"ground-truth": _ground_truth_pair, "given": _given_pair}[pairs]
    for record, where in iter_records(paths):
        yield from make_pair(record, fields, where)
