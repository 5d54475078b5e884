"""Fuzz the data path: seeded random damage to every file of packed datasets, and random JSON
values in every field of rollout records. Each case ends in one of two ways:

* a correct load: the preflight's dataset check passes and ``RewardDataset`` reads exactly the
  content of the undamaged dataset (tokens, loss masks, rewards, groups) and the same tokenizer
  ids; or packing succeeds and its output passes the check;
* one clear error: :class:`ConfigError` from the preflight (exit 2 in the trainer) or
  :class:`RolloutDataError` from packing (exit 2 in tools/pack_rollouts.py), naming the file.

Anything else (another exception type, i.e. a raw traceback; a different dataset that loads) fails
the test, with the case's seed in the message. Format version 1 and checksum-less datasets cannot
tell a flipped token from a real one, so those get only truncation and deletion.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path

import pytest

from megatron_rift.data.errors import RolloutDataError
from megatron_rift.training.preflight import ConfigError, read_dataset_info
from tests.fault_fixtures import CHATS, build_datasets, dataset_content, dataset_files

pytestmark = pytest.mark.timeout(300)

SEEDS_PER_FILE_AND_DAMAGE = int(os.environ.get("FUZZ_SEEDS", "14"))
RECORD_CASES = int(os.environ.get("FUZZ_RECORDS", "240"))
OPTIONS = [
    {},
    {"pairs": "ground-truth"},
    {"train_on": "all-assistant"},
    {"reward_scheme": "gpg-mean"},
]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def datasets(root):
    return build_datasets(root / "datasets")


def _damage(path: Path, kind: str, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    if kind == "delete":
        path.unlink()
    elif kind == "truncate":
        path.write_bytes(bytes(data[: rng.randrange(len(data))]))
    else:  # flip 1-3 random bytes to other values
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(data))
            data[at] = (data[at] + rng.randint(1, 255)) % 256
        path.write_bytes(bytes(data))


def _outcome(prefix: str) -> tuple[str, object]:
    """("ok", (content, tokenizer)) or ("error", message); other exceptions propagate."""
    try:
        info = read_dataset_info(prefix)
        return "ok", (dataset_content(prefix), info["tokenizer"])
    except ConfigError as err:
        return "error", str(err)


def test_damaged_packed_datasets_load_correctly_or_fail_clearly(datasets, root):
    cases = undetectable = 0
    for variant, prefix in datasets.items():
        expected = _outcome(prefix)
        assert expected[0] == "ok"
        checksums = variant != "v1"
        damages = ("truncate", "delete", "flip") if checksums else ("truncate", "delete")
        for index, source in enumerate(dataset_files(prefix)):
            for kind in damages:
                seeds = 1 if kind == "delete" else SEEDS_PER_FILE_AND_DAMAGE
                for seed in range(seeds):
                    case = f"{variant} {Path(source).name} {kind} seed {seed}"
                    folder = root / "cases" / f"{variant}_{index}_{kind}_{seed}"
                    folder.mkdir(parents=True)
                    for path in dataset_files(prefix):
                        shutil.copy(path, folder / Path(path).name)
                    copy = str(folder / Path(prefix).name)
                    _damage(folder / Path(source).name, kind, random.Random(f"{case}"))
                    try:
                        result = _outcome(copy)
                    except Exception as err:  # a raw traceback for the user
                        raise AssertionError(f"{case}: {type(err).__name__}: {err}") from err
                    cases += 1
                    if result[0] == "error":
                        assert str(folder) in result[1], f"{case}: no file named: {result[1]}"
                    elif result[1] != expected[1]:
                        undetectable += 1
                        raise AssertionError(f"{case}: loads, but not as packed")
                    shutil.rmtree(folder)
    print(f"fuzzed {cases} damaged dataset copies, {undetectable} undetected")
    assert cases >= 300


def _random_value(rng: random.Random, depth: int = 0):
    choices = [
        None,
        rng.choice([True, False]),
        rng.choice([rng.randint(-(2**40), 2**40), 10**400, -(10**400)]),
        rng.choice([0.0, -1.5, 1e308, float("nan"), float("inf"), -float("inf")]),
        rng.choice(["", " ", "w1 w2", "\u00e9\u4e2d\U0001f600", "\x00", "a" * 300, "w1\ud83d"]),
    ]
    if depth < 2:
        choices.append([_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))])
        choices.append({rng.choice(["role", "content", "x"]): _random_value(rng, depth + 1)})
    return rng.choice(choices)


def _base_records() -> list[dict]:
    plain = [
        {
            "prompt_id": i // 2,
            "prompt": f"w{i} w{i + 1}",
            "response": f"w{i + 2} w3",
            "correct": bool(i % 2),
            "reward": float(i % 3) - 1.0,
            "solution": "w5 w6",
        }
        for i in range(6)
    ]
    chats = [{"messages": chat, "reward": 1.0, "prompt_id": 9 + k} for k, chat in enumerate(CHATS)]
    return plain + chats


def _fuzzed_records(rng: random.Random, pairs: bool) -> list[dict]:
    records = json.loads(json.dumps(_base_records()))
    if pairs:  # ground-truth pairs need a solution: plain records only
        records = [r for r in records if "messages" not in r]
    conversations = [r for r in records if "messages" in r]
    for _ in range(rng.randint(1, 3)):
        if conversations and rng.random() < 0.5:  # a turn's role or content, or the turn list
            messages = rng.choice(conversations).get("messages")
            if not isinstance(messages, list):  # replaced by an earlier mutation
                continue
            turn = rng.choice(messages) if messages else None
            if isinstance(turn, dict) and rng.random() < 0.7:
                key = rng.choice(["role", "content", "extra"])
                turn[key] = rng.choice([_random_value(rng), "user", "assistant", "system", "tool"])
            else:
                messages.insert(rng.randint(0, len(messages)), _random_value(rng))
            continue
        record = rng.choice(records)
        field = rng.choice(sorted(record) + ["extra"])
        if rng.random() < 0.15:
            record.pop(field, None)
        else:
            record[field] = _random_value(rng)
    return records


def test_random_json_values_in_rollout_records_pack_or_fail_clearly(datasets, root):
    from megatron_rift.data.integrity import check_packed_dataset
    from megatron_rift.data.packing import PackConfig, pack_rollouts

    tokenizer = root / "datasets" / "qwen"
    out = root / "records"
    out.mkdir()
    packed = refused = 0
    for seed in range(RECORD_CASES):
        rng = random.Random(seed)
        options = rng.choice(OPTIONS)
        records = _fuzzed_records(rng, pairs="pairs" in options)
        source = out / f"case{seed}.jsonl"
        lines = [json.dumps(r, allow_nan=True) for r in records]
        source.write_text("\n".join(lines) + "\n")
        if rng.random() < 0.25:  # and the file itself: cut short, or bytes changed
            _damage(source, rng.choice(["truncate", "flip"]), rng)
        prefix = out / f"case{seed}"
        config = PackConfig(
            inputs=[str(source)],
            output_prefix=str(prefix),
            tokenizer=str(tokenizer),
            progress=False,
            **options,
        )
        try:
            pack_rollouts(config)
        except RolloutDataError as err:
            refused += 1
            assert str(source) in str(err) or "--" in str(err), f"seed {seed}: {err}"
            continue
        except Exception as err:  # a raw traceback for the user
            raise AssertionError(
                f"seed {seed} ({options}): {type(err).__name__}: {err}\n{lines}"
            ) from err
        packed += 1
        info = check_packed_dataset(str(prefix))
        assert all(math.isfinite(r) for r in [info["reward_mean"]]), seed
    print(f"fuzzed {RECORD_CASES} record sets: {packed} packed, {refused} refused")
    assert packed and refused
