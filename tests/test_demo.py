"""The end-to-end demo: a miniature of the whole pipeline through the real tools, and --problems."""

import json
import re
import subprocess
import sys

import pytest

from megatron_rift.demo.task import generate_splits
from tests.torchrun_utils import REPO

K = 4


def _demo(args, tmp_path, timeout=900):
    cmd = [
        sys.executable,
        "-m",
        "megatron_rift.cli",
        "demo",
        "--miniature",
        "--samples-per-problem",
        str(K),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))


def _same_number(answer, reference):
    try:
        return float(answer.replace(",", "")) == float(reference)
    except (AttributeError, ValueError):
        return False


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _check_rollouts_and_rewards(seed):
    """K rollouts per train problem, each reward equal to an independent check of its final answer;
    the packed RIFT dataset's statistics match them (empty responses are dropped). Returns the
    trainable rollouts and the packing statistics."""
    problems = {p["prompt_id"]: p for p in _read_jsonl(seed / "problems" / "train.jsonl")}
    rollouts = _read_jsonl(seed / "rollouts" / "train.jsonl")
    assert len(rollouts) == K * len(problems)
    for r in rollouts:
        # The math verifier's rule, re-implemented: the last \boxed{...}, else the last number.
        boxed = r["response"].rsplit("\\boxed{", 1)
        numbers = re.findall(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?", r["response"])
        answer = (
            boxed[1].split("}", 1)[0].strip()
            if len(boxed) == 2
            else (numbers[-1] if numbers else None)
        )
        assert r["correct"] == _same_number(answer, problems[r["prompt_id"]]["answer"]), r
    stats = json.loads((seed / "data" / "rollouts.json").read_text())
    trainable = [r for r in rollouts if r["response"].strip()]
    assert stats["rollouts"] == len(trainable)
    assert stats["positive"] == sum(r["correct"] for r in trainable)
    return trainable, stats


def _check_scores(out, expected_methods):
    """Every evaluated method on both splits, in range, Pass@K >= Mean@K, equal to the scores
    recomputed here from the scored generations; the table and the plot are written."""
    seed = out / "seed0"
    results = json.loads((out / "results.json").read_text())
    methods = results["methods"]
    assert set(methods) == set(expected_methods)
    for method, splits in methods.items():
        assert set(splits) == {"test", "ood"}
        for split, score in splits.items():
            assert 0 <= score[f"mean@{K}"] <= score[f"pass@{K}"] <= 100
            folder = seed / ("base" if method == "base" else f"methods/{method}") / "eval"
            by_problem = {}
            for g in _read_jsonl(folder / f"{split}.jsonl"):
                by_problem.setdefault(g["prompt_id"], []).append(bool(g["correct"]))
            mean = 100 * sum(sum(v) / len(v) for v in by_problem.values()) / len(by_problem)
            assert score[f"mean@{K}"] == pytest.approx(mean, abs=0.01)
    table = (out / "results.md").read_text()
    assert table.split("\n\n")[0].count("\n") == len(methods) + 1
    # One seed: the paired change from the base is the difference of the two Mean@K exactly.
    assert "paired by seed and problem" in table
    for method, splits in results["paired"].items():
        for split, entry in splits.items():
            change = methods[method][split][f"mean@{K}"] - methods["base"][split][f"mean@{K}"]
            assert entry["vs_base"]["change"] == pytest.approx(change, abs=0.02)
            assert entry["vs_base"]["low"] <= entry["vs_base"]["change"] <= entry["vs_base"]["high"]
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return results


@pytest.mark.slow
def test_miniature_pipeline_writes_consistent_results(tmp_path):
    """`megatron-rift demo --miniature` as it stands (RFT against RIFT): about a minute on 2 cores."""
    out = tmp_path / "demo"
    proc = _demo(["--output-dir", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # The terminal shows progress bars; Megatron-Core's CPU fallback warnings stay out of them.
    assert "Apex" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    seed = out / "seed0"
    trainable, stats = _check_rollouts_and_rewards(seed)

    expected = {"base", "rift"} | ({"rft"} if stats["positive"] else set())
    results = _check_scores(out, expected)
    if not stats["positive"]:
        assert "rft" in results["per_seed"][0]["skipped"]
    else:  # RFT trained on the correct rollouts only, RIFT on all of them
        rft = json.loads((seed / "data" / "positives.json").read_text())
        assert rft["rollouts"] == stats["positive"] < stats["rollouts"]
    assert "| rift |" in (out / "results.md").read_text()
    # Each fine-tuning run logged its losses; RIFT's are non-negative by construction.
    rift_losses = [
        json.loads(line)["loss"]
        for line in (seed / "methods" / "rift" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rift_losses and min(rift_losses) >= 0
    # The in-process HF export wrote a loadable model with the trainer's tokenizer.
    from transformers import AutoConfig

    hf = seed / "methods" / "rift" / "hf"
    assert AutoConfig.from_pretrained(str(hf)).num_hidden_layers == 2
    assert (hf / "tokenizer.model").is_file()
    print("stage timings (s):", results["per_seed"][0]["timings_s"])


@pytest.mark.slow
def test_miniature_preference_baselines(tmp_path):
    """The demo's DPO and KTO path: ground-truth pairs, and the base's reference log-probs of each
    dataset, computed once and bound to it."""
    out = tmp_path / "demo"
    proc = _demo(["--output-dir", str(out), "--methods", "dpo,kto"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    seed = out / "seed0"
    trainable, _ = _check_rollouts_and_rewards(seed)
    # DPO's pairs: every trainable rollout against its problem's expert solution (whole pairs
    # dropped when too long).
    pairs = json.loads((seed / "data" / "pairs.json").read_text())
    assert pairs["num_pairs"] + pairs["pairs_dropped"] == len(trainable)
    from megatron_rift.data.preference import dataset_fingerprint

    for name in ("pairs", "rollouts"):
        ref = json.loads((seed / "data" / f"{name}.ref_logprobs.json").read_text())
        assert ref["dataset_fingerprint"] == dataset_fingerprint(str(seed / "data" / name))
    _check_scores(out, {"base", "dpo", "kto"})


def _user_records():
    splits = generate_splits(seed=3, sizes={"base": 0, "train": 160, "val": 4, "test": 6, "ood": 6})
    records = []
    for split in ("train", "test", "ood"):
        for p in splits[split]:
            record = {"question": p.question, "answer": p.answer, "split": split}
            if split == "train":
                record["solution"] = p.solution.strip()
            records.append(record)
    return records


@pytest.mark.slow
def test_problems_file_runs_the_same_pipeline(tmp_path):
    problems = tmp_path / "mine.jsonl"
    records = _user_records()
    problems.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "demo"
    # With the base chosen by held-out competence (the evidence preset's way): a checkpoint every
    # 2 of the base's 5 steps (4 epochs of 40 problems at batch 32), and a ceiling no checkpoint
    # can be above.
    proc = _demo(
        ["--output-dir", str(out), "--problems", str(problems), "--methods", "rift"]
        + ["--base-competence-ceiling", "1.0", "--base-checkpoint-interval", "2"]
        + ["--base-epochs", "4"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    seed = out / "seed0"
    # Half of the train problems with a solution pretrain the base, the rest are post-training.
    base = _read_jsonl(seed / "problems" / "base.jsonl")
    train = _read_jsonl(seed / "problems" / "train.jsonl")
    assert len(base) == 80 and len(train) == 80
    assert {p["question"] for p in base}.isdisjoint(p["question"] for p in train)
    # Half of the base problems are held out of its data to score its checkpoints; with nothing
    # above the ceiling the newest is the base, scored once, and the tracker names it.
    trained_on = {r["prompt"] for r in _read_jsonl(seed / "records" / "base.jsonl")}
    assert len(trained_on) == 40 and trained_on < {p["prompt"] for p in base}
    selection = json.loads((seed / "run.json").read_text())["base_selection"]
    saved = sorted(int(p.name[5:]) for p in (seed / "base" / "ckpt").glob("iter_*"))
    assert len(saved) >= 2 and selection["chosen_iteration"] == saved[-1]
    assert list(selection["held_out_competence"]) == [str(saved[-1])]
    tracker = (seed / "base" / "ckpt" / "latest_checkpointed_iteration.txt").read_text()
    assert int(tracker) == saved[-1]
    assert {p["question"] for p in _read_jsonl(seed / "problems" / "test.jsonl")} == {
        r["question"] for r in records if r["split"] == "test"
    }
    methods = json.loads((out / "results.json").read_text())["methods"]
    assert set(methods) == {"base", "rift"}


def test_problems_file_bad_record_names_the_line(tmp_path):
    problems = tmp_path / "bad.jsonl"
    good = {
        "question": "What is 2+2?",
        "answer": "4",
        "split": "train",
        "solution": "2+2=4. \\boxed{4}",
    }
    problems.write_text(
        json.dumps(good) + "\n" + json.dumps({"question": "3+3?", "split": "test"}) + "\n"
    )
    proc = _demo(
        ["--output-dir", str(tmp_path / "out"), "--problems", str(problems)], tmp_path, timeout=120
    )
    assert proc.returncode == 2
    assert f"{problems}:2" in proc.stderr and "answer" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written before the input is known good


def test_export_stage_names_a_bad_checkpoint_and_writes_nothing(tmp_path):
    from megatron_rift.demo.stages import StageError, export_hf

    (tmp_path / "ckpt").mkdir()
    with pytest.raises(StageError, match="HF export of .*ckpt failed: .*not a Megatron checkpoint"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf", tmp_path / "logs")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    "argv, methods",
    [
        ([], ("sft", "dft", "rft", "rift", "naive", "dpo")),
        (["--miniature"], ("rft", "rift")),
        (["--miniature", "--methods", "dpo, kto"], ("dpo", "kto")),
        (["--methods", "all"], ("sft", "dft", "rft", "rift", "naive", "dpo", "kto", "simpo")),
    ],
)
def test_methods_default_to_the_run_size(argv, methods):
    from megatron_rift.demo.cli import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["--output-dir", "x", *argv]))
    assert cfg.methods == methods
    assert (cfg.num_layers == 2) == ("--miniature" in argv)


def test_unknown_method_is_refused():
    from megatron_rift.demo.cli import build_parser, config_from_args

    with pytest.raises(SystemExit, match="unknown method.*'rlhf'"):
        config_from_args(build_parser().parse_args(["--methods", "rift,rlhf"]))
