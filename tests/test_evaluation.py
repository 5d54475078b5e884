"""Mean@k / Pass@k: the estimator against hand values and brute force, file reading, CLI."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rift.evaluation import (
    RecordError,
    evaluate_files,
    markdown_table,
    pass_at_k,
    results_dict,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (8, 2, 1, 0.25),
        (8, 2, 8, 1.0),
        (5, 1, 2, 0.4),  # 1 - C(4,2)/C(5,2) = 1 - 6/10
        (8, 0, 8, 0.0),
        (8, 0, 1, 0.0),
        (8, 8, 1, 1.0),
        (4, 1, 3, 0.75),  # 1 - C(3,3)/C(4,3) = 1 - 1/4
        (10, 3, 2, 1 - 21 / 45),  # 1 - C(7,2)/C(10,2)
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_brute_force_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                brute = sum(any(subset) for subset in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_stable():
    # C(1000, 500) overflows floats; the product form does not.
    assert 0.0 < pass_at_k(1000, 1, 500) == pytest.approx(0.5)
    assert pass_at_k(1000, 10, 1) == pytest.approx(0.01)


@pytest.mark.parametrize("n, c, k", [(8, 9, 1), (8, 2, 0), (8, 2, 9), (8, -1, 1)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _records(correct_counts, n, key="prompt_id", via="correct", extra=None):
    """n records per problem; problem i has correct_counts[i] correct samples."""
    records = []
    for problem, c in enumerate(correct_counts):
        for sample in range(n):
            ok = sample < c
            record = {key: f"p{problem}", "response": "...", "sample_index": sample}
            record.update({"correct": ok} if via == "correct" else {"reward": 1.0 if ok else -0.2})
            record.update(extra or {})
            records.append(record)
    return records


def test_evaluate_files_per_benchmark_and_average(tmp_path):
    gsm = _write_jsonl(tmp_path / "gsm.jsonl", _records([8, 4, 0, 1], n=8))
    hard = _write_jsonl(
        tmp_path / "hard.jsonl", _records([0, 2], n=8, key="question", via="reward")
    )
    scores = evaluate_files([gsm, hard], k=8)
    by_name = {s.name: s for s in scores}
    assert list(by_name) == ["gsm", "hard"]
    assert by_name["gsm"].num_problems == 4 and by_name["gsm"].num_samples == 32
    assert by_name["gsm"].mean_at_k == pytest.approx((1 + 0.5 + 0 + 1 / 8) / 4)
    assert by_name["gsm"].pass_at_k == pytest.approx(3 / 4)
    assert by_name["hard"].mean_at_k == pytest.approx((0 + 2 / 8) / 2)
    assert by_name["hard"].pass_at_k == pytest.approx(1 / 2)
    # Pass@1 equals Mean (the estimator's k=1 case is c/n).
    for score in evaluate_files([gsm, hard], k=1):
        assert score.pass_at_k == pytest.approx(score.mean_at_k)
    result = results_dict(scores, 8, "RIFT")
    assert result["average"]["mean_at_k"] == pytest.approx(
        (by_name["gsm"].mean_at_k + by_name["hard"].mean_at_k) / 2
    )
    table = markdown_table([result], "pass_at_k")
    assert table.splitlines()[0] == "| Method (Pass@8) | gsm | hard | Avg. |"
    assert table.splitlines()[2] == "| RIFT | 75.0 | 50.0 | 62.5 |"


def test_benchmark_field_groups_records(tmp_path):
    records = _records([8], n=8, extra={"split": "test"}) + [
        dict(r, prompt_id="q" + r["prompt_id"]) for r in _records([0], n=8, extra={"split": "ood"})
    ]
    path = _write_jsonl(tmp_path / "all.jsonl", records)
    scores = {s.name: s for s in evaluate_files([path], k=8, benchmark_field="split")}
    assert scores["test"].pass_at_k == 1.0 and scores["ood"].pass_at_k == 0.0


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"response": "x", "correct": True}), "naming its problem"),
        (json.dumps({"prompt_id": "p", "response": "x"}), "'correct'.*'reward'"),
        (json.dumps({"prompt_id": "p", "reward": "high"}), "'reward'"),
        (json.dumps({"prompt_id": "p", "correct": "yes"}), "'correct' must be true/false"),
        (json.dumps([1, 2]), "JSON object"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, bad_line, message):
    good = json.dumps({"prompt_id": "p", "correct": True})
    path = tmp_path / "bench.jsonl"
    path.write_text(f"{good}\n\n{bad_line}\n")
    with pytest.raises(RecordError, match=rf"bench.jsonl:3: .*{message}"):
        evaluate_files([path], k=1)


def test_too_few_samples_is_an_error(tmp_path):
    path = _write_jsonl(tmp_path / "b.jsonl", _records([1, 1], n=4))
    with pytest.raises(ValueError, match="4 samples, fewer than k=8"):
        evaluate_files([path], k=8)


def test_cli_prints_tables_and_writes_json(tmp_path):
    test = _write_jsonl(tmp_path / "test.jsonl", _records([8, 0], n=8))
    ood = _write_jsonl(tmp_path / "ood.jsonl", _records([2, 0], n=8))
    out = tmp_path / "results" / "eval.json"
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "evaluate.py"),
            str(test),
            str(ood),
            "--k",
            "8",
            "--method",
            "Base",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "| Base | 50.0 | 12.5 | 31.2 |" in run.stdout  # Mean@8
    assert "| Base | 50.0 | 50.0 | 50.0 |" in run.stdout  # Pass@8
    saved = json.loads(out.read_text())
    assert saved["method"] == "Base" and saved["benchmarks"]["ood"]["pass_at_k"] == 0.5
    # Saved results combine into one comparison table.
    other = tmp_path / "rift.json"
    other.write_text(json.dumps(dict(saved, method="RIFT")))
    run = subprocess.run(
        [sys.executable, str(REPO / "tools" / "evaluate.py"), "--tables", str(out), str(other)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "| Base |" in run.stdout and "| RIFT |" in run.stdout


def test_cli_bad_record_exits_nonzero_without_output(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt_id": "p"}\n')
    out = tmp_path / "eval.json"
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "evaluate.py"),
            str(path),
            "--k",
            "1",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert "bad.jsonl:1" in run.stderr
    assert not out.exists()
