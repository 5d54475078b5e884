"""Bad input to tools/pack_rollouts.py (run as a subprocess): a clear error naming the file and
line (or record), exit status != 0, and no PREFIX.* files (nor temporary files) left behind."""

from __future__ import annotations

import json

import pytest

from tests.rollout_fixtures import build_tokenizers, run_cli

GOOD = {"prompt": "What is 2 + 3?", "response": "The answer is 5.", "reward": 1.0}


def line(**changes):
    record = dict(GOOD, **changes)
    return json.dumps({k: v for k, v in record.items() if v is not ...})


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return build_tokenizers(tmp_path_factory.mktemp("tokenizers"))


def assert_failed_cleanly(proc, out_dir, *needles):
    assert proc.returncode != 0, proc.stdout
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in stderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not out_dir.exists() or list(out_dir.iterdir()) == [], list(out_dir.iterdir())


# (name, file lines, expected line number, words the message must contain)
BAD_JSONL = [
    (
        "malformed",
        [line(), "", '{"prompt": "a", "response": "b", "reward": 1,}'],
        3,
        ["malformed JSON"],
    ),
    ("missing_response", [line(), line(response=...)], 2, ["missing field 'response'"]),
    ("missing_reward", [line(), line(), line(reward=...)], 3, ["no reward", "--reward-key"]),
    ("string_reward", [line(), line(reward="high")], 2, ["'reward' must be a number"]),
    (
        "nan_reward",
        [line(), '{"prompt": "p", "response": "r", "reward": NaN}'],
        2,
        ["'reward' is nan", "finite"],
    ),
    (
        "inf_reward",
        [line(), line(), '{"prompt": "p", "response": "r", "reward": 1e999}'],
        3,
        ["'reward' is inf", "finite"],
    ),
    ("empty_response", [line(), line(response="  ")], 2, ["'response' is empty"]),
    ("bad_correct", [line(reward=..., correct="yes")], 1, ["'correct' must be true or false"]),
    ("not_an_object", [line(), "[1, 2]"], 2, ["expected a JSON object"]),
]


@pytest.mark.parametrize("name,lines,bad_line,needles", BAD_JSONL, ids=[c[0] for c in BAD_JSONL])
def test_bad_jsonl_record(tmp_path, tokenizers, name, lines, bad_line, needles):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    proc = run_cli("--input", path, "--output-prefix", out / "ds", "--tokenizer", tokenizers[1])
    assert_failed_cleanly(proc, out, f"{path}:{bad_line}:", *needles)


def test_bad_record_in_json_array_names_the_record(tmp_path, tokenizers):
    path = tmp_path / "rollouts.json"
    path.write_text(json.dumps([GOOD, GOOD, {"prompt": "p", "reward": 1.0}]))
    out = tmp_path / "out"
    proc = run_cli("--input", path, "--output-prefix", out / "ds", "--tokenizer", tokenizers[1])
    assert_failed_cleanly(proc, out, f"{path}: record 3", "missing field 'response'")


def test_overlong_under_error_names_the_line(tmp_path, tokenizers):
    path = tmp_path / "rollouts.jsonl"
    long = " ".join(["the answer is five"] * 30)
    path.write_text("\n".join([line(), line(), line(response=long), line()]) + "\n")
    out = tmp_path / "out"
    # The failure happens while writing: the temporary files must go too.
    proc = run_cli(
        "--input",
        path,
        "--output-prefix",
        out / "ds",
        "--tokenizer",
        tokenizers[0],
        "--max-seq-length",
        "40",
        "--chunk-size",
        "1",
    )
    assert_failed_cleanly(proc, out, f"{path}:3:", "--max-seq-length 40", "--overlong drop")


@pytest.mark.parametrize("kind", ["garbage_model", "empty_folder", "missing"])
def test_unreadable_tokenizer(tmp_path, kind):
    data = tmp_path / "rollouts.jsonl"
    data.write_text(line() + "\n")
    if kind == "garbage_model":
        tokenizer = tmp_path / "broken.model"
        tokenizer.write_bytes(b"this is not a sentencepiece model")
    elif kind == "empty_folder":
        tokenizer = tmp_path / "empty_tokenizer"
        tokenizer.mkdir()
    else:
        tokenizer = tmp_path / "nowhere"
    out = tmp_path / "out"
    proc = run_cli("--input", data, "--output-prefix", out / "ds", "--tokenizer", tokenizer)
    assert_failed_cleanly(proc, out, str(tokenizer), "--tokenizer")


def test_unknown_input_format_and_missing_file(tmp_path, tokenizers):
    data = tmp_path / "rollouts.txt"
    data.write_text(line() + "\n")
    out = tmp_path / "out"
    proc = run_cli("--input", data, "--output-prefix", out / "ds", "--tokenizer", tokenizers[1])
    assert_failed_cleanly(proc, out, str(data), "unknown input format", ".jsonl")
    proc = run_cli(
        "--input",
        tmp_path / "absent.jsonl",
        "--output-prefix",
        out / "ds",
        "--tokenizer",
        tokenizers[1],
    )
    assert_failed_cleanly(proc, out, "absent.jsonl", "does not exist")


def test_existing_prefix_needs_overwrite(tmp_path, tokenizers):
    data = tmp_path / "rollouts.jsonl"
    data.write_text("\n".join([line(), line(reward=-1.0)]) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "ds.json").write_text("old")
    proc = run_cli("--input", data, "--output-prefix", out / "ds", "--tokenizer", tokenizers[1])
    assert proc.returncode != 0 and "--overwrite" in proc.stderr, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["ds.json"]
    assert (out / "ds.json").read_text() == "old"
    proc = run_cli(
        "--input", data, "--output-prefix", out / "ds", "--tokenizer", tokenizers[1], "--overwrite"
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "ds.bin",
        "ds.idx",
        "ds.json",
        "ds.rewards.npy",
        "ds.shared_prefix.npy",
    ]
    assert json.loads((out / "ds.json").read_text())["rollouts"] == 2


def test_chat_template_needs_an_hf_tokenizer_with_one(tmp_path, tokenizers):
    data = tmp_path / "rollouts.jsonl"
    data.write_text(line() + "\n")
    out = tmp_path / "out"
    proc = run_cli(
        "--input",
        data,
        "--output-prefix",
        out / "ds",
        "--tokenizer",
        tokenizers[1],
        "--chat-template",
    )
    assert_failed_cleanly(proc, out, str(tokenizers[1]), "no chat template", "--chat-template")
