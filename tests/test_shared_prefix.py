"""Divergence-aware negatives (``--negative-mode divergent``): the shared prefixes against a
plain-Python reference on hand-made and random groups, what packing stores, the trainer's preflight
for datasets packed without them, and the collated per-token mask."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

from megatron_rift.data import PackConfig, RewardDataset, collate_rollouts, pack_rollouts
from megatron_rift.data.shared_prefix import longest_shared_prefix, shared_prefix_lengths
from megatron_rift.objectives import RFT, RIFT
from megatron_rift.training.config import ObjectiveConfig
from megatron_rift.training.preflight import ConfigError, check_objective
from tests.rollout_fixtures import write_jsonl
from tests.tiny_tokenizers import build_wordlevel_tokenizer


def reference_prefix(negative: list[int], positives: list[list[int]]) -> int:
    """Written from the definition: the longest common prefix with any positive, token by token."""
    best = 0
    for positive in positives:
        n = 0
        while n < len(negative) and n < len(positive) and negative[n] == positive[n]:
            n += 1
        best = max(best, n)
    return best


HAND_MADE_GROUPS = [
    # (negatives, positives, expected shared prefix per negative)
    ([[5, 6, 7, 2]], [[5, 6, 8, 2]], [2]),  # diverges at the third token
    ([[9, 6, 7, 2]], [[5, 6, 7, 2]], [0]),  # empty prefix: wrong from the first token
    ([[5, 6, 7, 2]], [[5, 6, 7, 2]], [4]),  # full prefix: identical to a positive
    ([[5, 6, 2]], [[5, 6, 7, 8, 2]], [2]),  # a prefix of a positive until its EOS
    ([[5, 6]], [[5, 6, 7, 2]], [2]),  # a truncated negative, all of it a positive's prefix
    ([[5, 6, 7, 2]], [[5, 9, 2], [5, 6, 7, 8], [4]], [3]),  # several positives: the longest
    ([[5, 6, 7, 2]], [[5, 6, 1], [5, 6, 3]], [2]),  # a tie between positives
    ([[5, 6, 7, 2], [5, 3], [1]], [[5, 6, 7, 9]], [3, 1, 0]),  # several negatives
    ([[5, 6, 7, 2]], [], [0]),  # no positive: the whole response is pushed down
    ([[5] * 40 + [1], [5] * 20 + [1]], [[5] * 40 + [2]], [40, 20]),  # longer than the head
]


@pytest.mark.parametrize("negatives,positives,expected", HAND_MADE_GROUPS)
def test_hand_made_groups(negatives, positives, expected):
    assert [reference_prefix(n, positives) for n in negatives] == expected
    got = longest_shared_prefix([np.array(n) for n in negatives], [np.array(p) for p in positives])
    assert got.tolist() == expected


def _random_documents(rng: random.Random, groups: int):
    """Documents of random groups (interleaved), each prompt + response, in one flat buffer; some
    groups all positive, some all negative, responses with common openings."""
    docs = []
    for g in range(groups):
        opening = [rng.randint(3, 6) for _ in range(rng.randint(0, 4))]
        kind = rng.choice(["mixed", "mixed", "positive", "negative"])
        for _ in range(rng.randint(1, 6)):
            outcome = {"positive": 1, "negative": -1}.get(kind, rng.choice([1, -1, -1, 0]))
            cut = rng.randint(0, len(opening))
            response = opening[:cut] + [rng.randint(3, 6) for _ in range(rng.randint(0, 5))] + [2]
            prompt = [1] + [rng.randint(7, 9) for _ in range(rng.randint(1, 3))]
            docs.append((g, outcome, prompt, response))
    rng.shuffle(docs)
    return docs


def test_dataset_level_prefixes_equal_the_reference_on_random_groups():
    rng = random.Random(0)
    docs = _random_documents(rng, groups=60)
    tokens, offsets, starts, ends = [], [], [], []
    for _, _, prompt, response in docs:
        offsets.append(len(tokens))
        starts.append(len(prompt))
        ends.append(len(prompt) + len(response))
        tokens += prompt + response + [0] * rng.randint(0, 2)  # text after the end-of-turn
    group = np.array([d[0] for d in docs])
    outcome = np.array([d[1] for d in docs])
    got = shared_prefix_lengths(np.array(tokens), np.array(offsets), starts, ends, group, outcome)
    expected = [
        0
        if outcome_i > 0
        else reference_prefix(resp, [d[3] for d in docs if d[0] == g_i and d[1] > 0])
        for g_i, outcome_i, _, resp in docs
    ]
    assert got.tolist() == expected
    assert any(v > 0 for v in expected) and any(  # not vacuous: shared and unshared negatives
        v == 0 and o <= 0 for v, o in zip(expected, outcome)
    )


WORDS = "so the sum is five six seven answer box wrong add two and three".split()
ROLLOUTS = [  # group q1 interleaved with q2; q3 has no positive
    {
        "prompt_id": "q1",
        "prompt": "add two and three",
        "response": "so the sum is five",
        "correct": True,
    },
    {"prompt_id": "q2", "prompt": "add three", "response": "six", "correct": True},
    {
        "prompt_id": "q1",
        "prompt": "add two and three",
        "response": "so the sum is six",
        "correct": False,
    },
    {"prompt_id": "q3", "prompt": "add two", "response": "so the sum is five", "correct": False},
    {
        "prompt_id": "q1",
        "prompt": "add two and three",
        "response": "so the answer is five",
        "correct": True,
    },
    {"prompt_id": "q1", "prompt": "add two and three", "response": "wrong", "correct": False},
    {"prompt_id": "q2", "prompt": "add three", "response": "six seven", "correct": False},
    {
        "prompt_id": "q1",
        "prompt": "add two and three",
        "response": "so the answer",
        "correct": False,
    },
]
# In response tokens (words + EOS): "so the sum is six" shares "so the sum is" (4) with the first
# positive; "so the answer" + EOS shares "so the answer" (3) with the second; "six seven" shares
# "six" (1); q3's negative has no positive in its group (0).
EXPECTED_SHARED = [0, 0, 4, 0, 0, 0, 1, 3]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared_prefix")
    tokenizer = build_wordlevel_tokenizer(root / "tok", WORDS, chat_template=None)
    prefix = str(root / "data")
    summary = pack_rollouts(
        PackConfig(
            inputs=[str(write_jsonl(root / "r.jsonl", ROLLOUTS))],
            output_prefix=prefix,
            tokenizer=str(tokenizer),
            progress=False,
        )
    )
    return prefix, summary


def test_packing_stores_each_negatives_shared_prefix(packed):
    prefix, summary = packed
    assert summary["shared_prefix"] == "data.shared_prefix.npy"
    stored = np.load(prefix + ".shared_prefix.npy")
    assert stored.tolist() == EXPECTED_SHARED
    assert summary["negatives_with_shared_prefix"] == 3
    assert summary["shared_prefix_tokens"] == sum(EXPECTED_SHARED)
    ds = RewardDataset(prefix)
    responses = [ds[i]["tokens"][ds[i]["response_start"] : ds[i]["response_end"]] for i in range(8)]
    for i, item in enumerate(ds[i] for i in range(len(ds))):
        positives = [
            responses[j].tolist()
            for j in range(len(ds))
            if ROLLOUTS[j]["prompt_id"] == ROLLOUTS[i]["prompt_id"] and ROLLOUTS[j]["correct"]
        ]
        want = 0 if ROLLOUTS[i]["correct"] else reference_prefix(responses[i].tolist(), positives)
        assert item["shared_prefix"] == want == EXPECTED_SHARED[i]


def test_collated_mask_marks_the_shared_labels(packed):
    ds = RewardDataset(packed[0])
    items = [ds[2], ds[7], ds[0]]
    for pack in (False, True):
        batch = collate_rollouts(items, seq_length=32, pad_id=ds.pad_id, pack=pack)
        mask = batch["shared_prefix"]
        for j, item in enumerate(items):
            row, offset = int(batch["sample_rows"][j]), int(batch["sample_offsets"][j])
            first = (
                offset + item["response_start"] - 1
            )  # the label there is the first response token
            marked = mask[row].nonzero().flatten().tolist()
            own = [t for t in marked if first <= t < first + len(item["tokens"])]
            assert own == list(range(first, first + item["shared_prefix"]))
            for t in own:  # the labels are the shared response tokens themselves
                k = t - offset + 1
                assert batch["labels"][row, t] == int(item["tokens"][k])
        assert int(mask.sum()) == 4 + 3
        assert not (mask & (batch["loss_mask"] == 0)).any()


def test_preflight_refuses_divergent_mode_on_a_dataset_packed_without_prefixes(packed, tmp_path):
    prefix, _ = packed
    with open(prefix + ".json") as handle:
        info = json.load(handle)
    old = {k: v for k, v in info.items() if k != "shared_prefix"}
    divergent = ObjectiveConfig(name=RIFT.name, negative_mode="divergent")
    check_objective(RIFT, divergent, info)  # packed with them: fine
    check_objective(RIFT, ObjectiveConfig(name=RIFT.name), old)  # other modes: fine
    check_objective(RFT, ObjectiveConfig(name=RFT.name), old)
    with pytest.raises(ConfigError, match="--negative-mode divergent.*re-pack"):
        check_objective(RIFT, divergent, old)
    # The old dataset itself still opens, without the field.
    for suffix in (".bin", ".idx", ".rewards.npy"):
        shutil.copy(prefix + suffix, str(tmp_path / "old") + suffix)
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert "shared_prefix" not in RewardDataset(str(tmp_path / "old"))[2]


@pytest.mark.distributed
def test_trainer_divergent_mode_is_token_mode_when_nothing_is_shared(tmp_path_factory):
    """The shared tiny dataset has no negative that shares a prefix with a positive, so the
    trainer's divergent run takes exactly the token-mode reference run's steps."""
    from tests.workers.train_runs import (
        prepared_assets,
        read_metrics,
        reference_run,
        run_trainer,
        tiny_rift_args,
    )

    base = tmp_path_factory.getbasetemp()
    assets = prepared_assets(base)
    with open(assets["data"] + ".json") as handle:
        assert json.load(handle)["shared_prefix_tokens"] == 0
    reference = reference_run(base)
    run_dir = tmp_path_factory.mktemp("divergent_run")
    metrics = run_dir / "metrics.jsonl"
    args = [*tiny_rift_args(assets), "--negative-mode", "divergent", "--log-file", str(metrics)]
    run_trainer(run_dir, 1, args)
    divergent = read_metrics(metrics)
    assert divergent.keys() == reference.keys() and len(divergent) > 1
    for step, record in divergent.items():
        assert record["loss"] == reference[step]["loss"], step
