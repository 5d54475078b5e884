"""Round trips of tools/pack_rollouts.py: tokens, masks, rewards per scheme and statistics.

Every expected value is computed here, independently: token ids with the tokenizers themselves
(HF ``__call__`` / ``apply_chat_template``, ``SentencePieceProcessor``), scheme rewards and
statistics with plain Python over the hand-made records.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict

import numpy as np
import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from megatron_rift.data import PackConfig, RewardDataset, RolloutFields, pack_rollouts
from tests.rollout_fixtures import HAND_MADE_ROLLOUTS, build_tokenizers, run_cli, write_jsonl

RECORDS = HAND_MADE_ROLLOUTS
SCHEMES = ("constant", "raw", "gaussian", "gpg-mean", "gpg-scaled")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    hf, sp = build_tokenizers(root)
    return {
        "root": root,
        "hf": hf,
        "sp": sp,
        "jsonl": write_jsonl(root / "rollouts.jsonl", RECORDS),
    }


def pack(env, name, tokenizer="sp", inputs=None, **kwargs) -> dict:
    config = PackConfig(
        inputs=inputs or [str(env["jsonl"])],
        output_prefix=str(env["root"] / "out" / name),
        tokenizer=str(env[tokenizer]),
        progress=False,
        **kwargs,
    )
    return pack_rollouts(config)


# --- independent references -------------------------------------------------------------------
def group_key(record):
    return ("id", str(record["prompt_id"])) if "prompt_id" in record else ("text", record["prompt"])


def is_positive(record):
    return record["correct"] if "correct" in record else record["reward"] > 0


def raw_reward(record):
    return float(record["reward"]) if "reward" in record else float(record["correct"])


def hand_rewards(records, scheme, pos=1.0, neg=-0.2):
    members = defaultdict(list)
    for record in records:
        members[group_key(record)].append(record)
    out = []
    for record in records:
        group = members[group_key(record)]
        rs = [raw_reward(m) for m in group]
        mu, sigma = statistics.fmean(rs), statistics.pstdev(rs)
        alpha = sum(is_positive(m) for m in group) / len(group)
        r = raw_reward(record)
        if scheme == "constant":
            if "correct" in record:
                value = pos if record["correct"] else neg
            else:
                value = pos if record["reward"] > 0 else neg if record["reward"] < 0 else 0.0
        elif scheme == "raw":
            value = r
        elif scheme == "gaussian":
            value = 0.0 if sigma == 0 else (r - mu) / sigma
        elif scheme == "gpg-mean":
            value = alpha * (r - mu)
        else:
            value = alpha * r
        out.append(value)
    return out


def hf_expected(folder, record, chat_template):
    """(prompt, response + EOS, after) token ids; under chat_template the one-turn conversation's
    template tokens, split where the template's assistant header and EOS end."""
    tok = AutoTokenizer.from_pretrained(str(folder))
    response = tok(record["response"], add_special_tokens=False)["input_ids"]
    if not chat_template:
        return tok(record["prompt"])["input_ids"], response + [tok.eos_token_id], []
    user = [{"role": "user", "content": record["prompt"]}]
    text = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    whole = tok.apply_chat_template(
        [*user, {"role": "assistant", "content": record["response"]}], return_dict=True
    )["input_ids"]
    after = tok("\n", add_special_tokens=False)["input_ids"]  # TINY_CHAT_TEMPLATE's, after EOS
    assert whole == prompt + response + [tok.eos_token_id] + after
    return prompt, response + [tok.eos_token_id], after


def sp_expected(model, record):
    sp = spm.SentencePieceProcessor(model_file=str(model))
    return [sp.bos_id()] + sp.encode(record["prompt"]), sp.encode(record["response"]) + [
        sp.eos_id()
    ]


def check_tokens(ds, expected):
    assert len(ds) == len(expected)
    for i, (prompt, response, *after) in enumerate(expected):
        after = after[0] if after else []
        item = ds[i]
        assert item["tokens"].tolist() == prompt + response + after
        assert item["loss_mask"].tolist() == [0] * len(prompt) + [1] * len(response) + [0] * len(
            after
        )
        assert item["response_start"] == len(prompt)
        assert item["response_end"] == len(prompt) + len(response)


# --- tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("chat_template", [False, True])
def test_round_trip_hf_tokenizer(env, chat_template):
    pack(env, f"hf_{chat_template}", tokenizer="hf", chat_template=chat_template)
    ds = RewardDataset(str(env["root"] / "out" / f"hf_{chat_template}"))
    check_tokens(ds, [hf_expected(env["hf"], r, chat_template) for r in RECORDS])
    np.testing.assert_allclose(
        [ds[i]["reward"] for i in range(len(ds))], hand_rewards(RECORDS, "constant"), rtol=1e-6
    )
    hf = AutoTokenizer.from_pretrained(str(env["hf"]))
    assert ds.info["tokenizer"]["eos_id"] == hf.eos_token_id
    assert ds.info["tokenizer"]["pad_id"] == hf.pad_token_id
    assert ds.info["tokenizer"]["vocab_size"] == len(hf)


def test_round_trip_sentencepiece_and_groups(env):
    pack(env, "sp")
    ds = RewardDataset(str(env["root"] / "out" / "sp"))
    check_tokens(ds, [sp_expected(env["sp"], r) for r in RECORDS])
    # Same group id exactly when the records share a group key.
    groups = [ds[i]["group"] for i in range(len(ds))]
    keys = [group_key(r) for r in RECORDS]
    for i in range(len(RECORDS)):
        for j in range(len(RECORDS)):
            assert (groups[i] == groups[j]) == (keys[i] == keys[j])


def test_first_response_token_survives_a_merge(env):
    hf = AutoTokenizer.from_pretrained(str(env["hf"]))
    # Find a split where tokenizing the concatenation merges across the boundary.
    splits = [("the ca", "t sat on a mat"), ("add tw", "o and three"), ("the answer i", "s five")]
    merged = [
        (p, r)
        for p, r in splits
        if hf(p + r)["input_ids"]
        != hf(p)["input_ids"] + hf(r, add_special_tokens=False)["input_ids"]
    ]
    assert merged, "the tiny BPE merges none of the candidate splits; pick others"
    records = [{"prompt": p, "response": r, "correct": True} for p, r in merged]
    pack(
        env,
        "merge",
        tokenizer="hf",
        inputs=[str(write_jsonl(env["root"] / "merge.jsonl", records))],
    )
    ds = RewardDataset(str(env["root"] / "out" / "merge"))
    check_tokens(ds, [hf_expected(env["hf"], r, False) for r in records])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_reward_schemes(env, scheme):
    summary = pack(env, f"scheme_{scheme}", reward_scheme=scheme)
    ds = RewardDataset(str(env["root"] / "out" / f"scheme_{scheme}"))
    np.testing.assert_allclose(
        np.asarray(ds.rewards, dtype=np.float64),
        hand_rewards(RECORDS, scheme),
        rtol=1e-6,
        atol=1e-7,
    )
    np.testing.assert_allclose(
        np.asarray(ds.side["raw_reward"]), [raw_reward(r) for r in RECORDS], rtol=1e-6
    )
    assert summary["arguments"]["reward_scheme"] == scheme


def test_constant_scheme_custom_values(env):
    pack(env, "constant_08", positive_reward=2.0, negative_reward=-0.8)
    ds = RewardDataset(str(env["root"] / "out" / "constant_08"))
    np.testing.assert_allclose(ds.rewards, hand_rewards(RECORDS, "constant", 2.0, -0.8), rtol=1e-6)


def test_statistics(env):
    summary = pack(env, "stats")
    expected = [sp_expected(env["sp"], r) for r in RECORDS]
    by_group = defaultdict(list)
    for r in RECORDS:
        by_group[group_key(r)].append(is_positive(r))
    positive = sum(is_positive(r) for r in RECORDS)
    mixed = sum(1 for flags in by_group.values() if any(flags) and not all(flags))
    hand = {
        "problems": len(by_group),
        "rollouts": len(RECORDS),
        "positive": positive,
        "negative": len(RECORDS) - positive,
        "positive_fraction": positive / len(RECORDS),
        "mixed_problems": mixed,
        "mixed_fraction": mixed / len(by_group),
        "prompt_tokens": sum(len(p) for p, _ in expected),
        "response_tokens": sum(len(r) for _, r in expected),
        "total_tokens": sum(len(p) + len(r) for p, r in expected),
        "overlong": 0,
        "overlong_dropped": 0,
        "overlong_truncated": 0,
    }
    on_disk = json.loads((env["root"] / "out" / "stats.json").read_text())
    for key, value in hand.items():
        assert summary[key] == pytest.approx(value), key
        assert on_disk[key] == pytest.approx(value), key
    assert on_disk["zero_reward"] == sum(
        1 for r in RECORDS if "correct" not in r and r["reward"] == 0
    )
    assert (
        on_disk["tokenizer"]["eos_id"]
        == spm.SentencePieceProcessor(model_file=str(env["sp"])).eos_id()
    )


def test_keep_positive_builds_rft_dataset(env):
    summary = pack(env, "rft", keep="positive")
    kept = [r for r in RECORDS if is_positive(r)]
    ds = RewardDataset(str(env["root"] / "out" / "rft"))
    check_tokens(ds, [sp_expected(env["sp"], r) for r in kept])
    assert np.all(np.asarray(ds.rewards) == np.float32(1.0))
    assert summary["negative"] == 0 and summary["mixed_problems"] == 0
    assert summary["removed_by_keep"] == len(RECORDS) - len(kept)


def test_overlong_drop_and_truncate(env):
    expected = [sp_expected(env["sp"], r) for r in RECORDS]
    lengths = [len(p) + len(r) for p, r in expected]
    limit = sorted(lengths)[len(lengths) // 2]  # about half the rollouts are over
    over = [i for i, n in enumerate(lengths) if n > limit]
    summary = pack(env, "drop", max_seq_length=limit, overlong="drop")
    ds = RewardDataset(str(env["root"] / "out" / "drop"))
    check_tokens(ds, [e for i, e in enumerate(expected) if i not in over])
    assert summary["overlong"] == summary["overlong_dropped"] == len(over)

    summary = pack(env, "truncate", max_seq_length=limit, overlong="truncate")
    ds = RewardDataset(str(env["root"] / "out" / "truncate"))
    survivors = [i for i in range(len(RECORDS)) if i not in over or len(expected[i][0]) < limit]
    assert len(ds) == len(survivors)
    for k, i in enumerate(survivors):
        prompt, response = expected[i]
        item = ds[k]
        assert item["tokens"].tolist() == (prompt + response)[:limit]
        assert item["loss_mask"].tolist() == ([0] * len(prompt) + [1] * len(response))[:limit]
    assert summary["overlong"] == len(over)
    assert summary["overlong_truncated"] + summary["overlong_dropped"] == len(over)
    assert summary["overlong_truncated"] > 0


def test_json_array_and_parquet_with_remapped_fields_match_jsonl(env):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rename = {
        "prompt": "question",
        "response": "completion",
        "reward": "score",
        "correct": "is_correct",
        "prompt_id": "uid",
    }
    renamed = [{rename[k]: v for k, v in r.items()} for r in RECORDS]
    # Parquet needs one type per column: prompt ids as strings (grouping is by str(id) anyway).
    for r in renamed:
        if "uid" in r:
            r["uid"] = str(r["uid"])
    json_path = env["root"] / "rollouts.json"
    json_path.write_text(json.dumps(renamed))
    parquet_path = env["root"] / "rollouts.parquet"
    columns = {name: [r.get(name) for r in renamed] for name in rename.values()}
    pq.write_table(pa.table(columns), parquet_path, row_group_size=4)
    fields = RolloutFields(
        prompt="question",
        response="completion",
        reward="score",
        correct="is_correct",
        prompt_id="uid",
    )
    pack(env, "ref_jsonl")
    pack(env, "from_json", inputs=[str(json_path)], fields=fields)
    pack(env, "from_parquet", inputs=[str(parquet_path)], fields=fields)
    reference = RewardDataset(str(env["root"] / "out" / "ref_jsonl"))
    for name in ("from_json", "from_parquet"):
        ds = RewardDataset(str(env["root"] / "out" / name))
        assert len(ds) == len(reference)
        for i in range(len(ds)):
            assert ds[i]["tokens"].tolist() == reference[i]["tokens"].tolist()
        np.testing.assert_array_equal(ds.side, reference.side)


def test_megatron_indexed_dataset_reads_the_output(env):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    pack(env, "megatron")
    indexed = IndexedDataset(str(env["root"] / "out" / "megatron"))
    expected = [sp_expected(env["sp"], r) for r in RECORDS]
    assert len(indexed) == len(RECORDS)
    assert indexed.document_indices.tolist() == list(range(len(RECORDS) + 1))
    for i, (prompt, response) in enumerate(expected):
        assert indexed[i].dtype == np.int32
        assert indexed[i].tolist() == prompt + response


def test_cli_with_two_workers_matches_library(env):
    out = env["root"] / "out"
    pack(env, "lib_hf", tokenizer="hf", chat_template=True, chunk_size=3)
    proc = run_cli(
        "--input",
        env["jsonl"],
        "--output-prefix",
        out / "cli_hf",
        "--tokenizer",
        env["hf"],
        "--chat-template",
        "--workers",
        "2",
        "--chunk-size",
        "3",
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "cli_hf.bin").read_bytes() == (out / "lib_hf.bin").read_bytes()
    assert (out / "cli_hf.idx").read_bytes() == (out / "lib_hf.idx").read_bytes()
    np.testing.assert_array_equal(
        np.load(out / "cli_hf.rewards.npy"), np.load(out / "lib_hf.rewards.npy")
    )
    cli_json = json.loads((out / "cli_hf.json").read_text())
    assert cli_json["arguments"]["workers"] == 2
    assert cli_json["rollouts"] == len(RECORDS)
