"""Pairs datasets for dpo/simpo (``pack_rollouts --pairs``): document order, pair integrity under
the overlong policy, and bad input. Expected token ids come from the HF tokenizer itself."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from megatron_rift.data import PackConfig, RewardDataset, RolloutDataError, pack_rollouts
from tests.rollout_fixtures import build_tokenizers, run_cli, write_jsonl

ROLLOUTS = [  # two problems, ground truth in "solution"
    {
        "prompt_id": 1,
        "prompt": "what is two plus two",
        "response": "it is four",
        "solution": "two plus two is four",
        "correct": True,
    },
    {
        "prompt_id": 1,
        "prompt": "what is two plus two",
        "response": "it is five",
        "solution": "two plus two is four",
        "correct": False,
    },
    {
        "prompt_id": 2,
        "prompt": "name a color",
        "response": "the sky",
        "solution": "blue is a color",
        "reward": -0.5,
    },
    {
        "prompt_id": 2,
        "prompt": "name a color",
        "response": "red is one",
        "solution": "blue is a color",
        "reward": 2.0,
    },
]
GIVEN = [
    {"prompt": "say hi", "chosen": "hi there", "rejected": "go away"},
    {"prompt": "say bye", "chosen": "bye now", "rejected": "hello again and again"},
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    hf, _ = build_tokenizers(root)
    return {
        "root": root,
        "hf": hf,
        "tok": AutoTokenizer.from_pretrained(str(hf)),
        "rollouts": write_jsonl(root / "rollouts.jsonl", ROLLOUTS),
        "given": write_jsonl(root / "given.jsonl", GIVEN),
    }


def _pack(env, name, source, **kwargs):
    prefix = str(env["root"] / "out" / name)
    summary = pack_rollouts(
        PackConfig(
            inputs=[str(env[source])],
            output_prefix=prefix,
            tokenizer=str(env["hf"]),
            progress=False,
            **kwargs,
        )
    )
    return prefix, summary


def _expected(tok, prompt, response):
    ids = tok(prompt)["input_ids"] + tok(response, add_special_tokens=False)["input_ids"]
    return ids + [tok.eos_token_id], len(tok(prompt)["input_ids"])


def test_ground_truth_pairs_prefer_the_rollout_only_when_correct(env):
    prefix, summary = _pack(env, "gt", "rollouts", pairs="ground-truth")
    ds = RewardDataset(prefix)
    assert summary["pairs"] == "ground-truth" and summary["num_pairs"] == 4 and len(ds) == 8
    # Paper 4.1: correct rollout > ground truth; otherwise ground truth > rollout.
    expected_pairs = []
    for r in ROLLOUTS:
        correct = r.get("correct", r.get("reward", 0) > 0)
        pair = (r["response"], r["solution"]) if correct else (r["solution"], r["response"])
        expected_pairs += [(r["prompt"], pair[0]), (r["prompt"], pair[1])]
    for i, (prompt, response) in enumerate(expected_pairs):
        ids, start = _expected(env["tok"], prompt, response)
        assert ds[i]["tokens"].tolist() == ids, i
        assert ds[i]["response_start"] == start
    # Both members of a pair belong to the same problem.
    groups = np.asarray(ds.groups)
    assert (groups[0::2] == groups[1::2]).all() and len(set(groups.tolist())) == 2


def test_given_pairs_keep_chosen_then_rejected(env):
    prefix, summary = _pack(env, "given", "given", pairs="given")
    ds = RewardDataset(prefix)
    assert summary["num_pairs"] == 2
    for u, record in enumerate(GIVEN):
        for j, key in enumerate(("chosen", "rejected")):
            assert (
                ds[2 * u + j]["tokens"].tolist()
                == _expected(env["tok"], record["prompt"], record[key])[0]
            )


def test_overlong_drop_removes_the_whole_pair(env):
    # The second pair's rejected answer is the longest document: dropping it must drop its
    # chosen partner too, or every later pair would be shifted by one.
    lengths = [
        len(_expected(env["tok"], g["prompt"], g[k])[0])
        for g in GIVEN
        for k in ("chosen", "rejected")
    ]
    limit = sorted(lengths)[-1] - 1
    prefix, summary = _pack(
        env, "drop", "given", pairs="given", max_seq_length=limit, overlong="drop"
    )
    ds = RewardDataset(prefix)
    assert len(ds) == 2 and summary["num_pairs"] == 1 and summary["pairs_dropped"] == 1
    assert ds[0]["tokens"].tolist() == _expected(env["tok"], "say hi", "hi there")[0]
    assert ds[1]["tokens"].tolist() == _expected(env["tok"], "say hi", "go away")[0]


def test_pairs_refuse_keep_positive(env):
    with pytest.raises(RolloutDataError, match="--keep positive"):
        _pack(env, "bad", "rollouts", pairs="ground-truth", keep="positive")


def test_missing_solution_is_reported_with_file_and_line(env):
    records = [dict(ROLLOUTS[0]), {k: v for k, v in ROLLOUTS[1].items() if k != "solution"}]
    path = write_jsonl(env["root"] / "no_solution.jsonl", records)
    out = env["root"] / "cli" / "nosol"
    proc = run_cli(
        "--input", path, "--output-prefix", out, "--tokenizer", env["hf"], "--pairs", "ground-truth"
    )
    assert proc.returncode == 2
    assert f"{path}:2: missing field 'solution'" in proc.stderr
    assert not list((env["root"] / "cli").glob("nosol*"))
