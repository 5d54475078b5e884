"""Preference units in the trainer's data path: pairs are never split across micro-batches, KTO's
mismatched partners come from another problem, and reference log-probs that do not belong to the
dataset are refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from megatron_rift.data import RolloutDataError
from megatron_rift.data.dataset import RewardDataset
from megatron_rift.data.preference import (
    REF_DTYPE,
    REF_FORMAT,
    ReferenceLogprobs,
    dataset_fingerprint,
    kl_partners,
    ref_paths,
)
from megatron_rift.objectives import get_objective
from megatron_rift.training.arguments import parse_train_config
from megatron_rift.training.data import TrainingData, open_units
from megatron_rift.training.preflight import ConfigError
from tests.workers.train_data import build_pairs_dataset, build_rollout_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefdata")
    return {
        "pairs": build_pairs_dataset(root / "pairs"),
        "rollouts": build_rollout_dataset(root / "rollouts"),
    }


def _training_data(prefix, objective, dp_rank=0, dp_size=1, mbs=2, gbs=8, **extra):
    """The trainer's data path for these flags: units opened as the trainer does."""
    argv = [
        "--data-path",
        prefix,
        "--objective",
        objective,
        "--micro-batch-size",
        str(mbs),
        "--global-batch-size",
        str(gbs),
        "--seq-length",
        "32",
    ]
    for key, value in extra.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    config = parse_train_config(argv)
    dataset = RewardDataset(prefix)
    units = open_units(get_objective(objective), config.objective, dataset)
    return TrainingData(
        dataset, units, config.data, config.schedule, 32, dp_rank, dp_size, use_te=False
    )


def _write_reference(prefix, rows=None, fingerprint=None, kl=True):
    ds = RewardDataset(prefix)
    if rows is None:
        rows = np.zeros(len(ds), dtype=REF_DTYPE)
        rows["num_tokens"] = ds.lengths - ds.side["response_start"]
        rows["logprob"] = -np.arange(len(ds), dtype=np.float64)
        rows["kl_logprob"] = -1000 - np.arange(len(ds), dtype=np.float64)
    paths = ref_paths(prefix)
    np.save(paths["npy"], rows)
    with open(paths["json"], "w") as f:
        json.dump(
            {
                "format": REF_FORMAT,
                "kl_samples": kl,
                "dataset_fingerprint": fingerprint or dataset_fingerprint(prefix),
            },
            f,
        )
    return rows


@pytest.mark.parametrize("dp_size", [1, 2])
def test_dpo_micro_batches_hold_whole_pairs_and_cover_the_epoch(data, dp_size):
    rows = _write_reference(data["pairs"])
    seen = []
    for dp_rank in range(dp_size):
        td = _training_data(data["pairs"], "dpo", dp_rank, dp_size)
        assert td.rows_per_micro_batch == 4
        for _ in range(td.batches_per_epoch):
            micro_batches, _ = td.next_step()
            for batch in micro_batches:
                ids = batch["sample_ids"].tolist()
                # Chosen = document 2u, rejected = 2u + 1, side by side in one micro-batch.
                assert [i % 2 for i in ids] == [0, 1, 0, 1]
                assert all(ids[k + 1] == ids[k] + 1 for k in (0, 2))
                assert batch["roles"].tolist() == [1, -1, 1, -1]
                assert np.allclose(batch["ref_logprobs"].numpy(), rows["logprob"][ids])
                seen += ids[0::2]
    units = len(RewardDataset(data["pairs"])) // 2
    assert sorted(seen) == [2 * u for u in range(units // 8 * 8)]  # each pair once per epoch


def test_kto_units_pair_each_sample_with_a_mismatched_response(data):
    rows = _write_reference(data["rollouts"])
    ds = RewardDataset(data["rollouts"])
    td = _training_data(data["rollouts"], "kto")
    micro_batches, tokens = td.next_step()
    for batch in micro_batches:
        roles = batch["roles"].tolist()
        assert roles[1::2] == [0, 0] and all(r in (1, -1) for r in roles[0::2])
        for slot in (0, 2):
            doc = int(batch["sample_ids"][slot])
            assert roles[slot] == (1 if ds.rewards[doc] > 0 else -1)
            kl_ref = float(batch["ref_logprobs"][slot + 1])
            assert kl_ref == rows["kl_logprob"][doc]
            # The mismatched sample: this prompt, then a response of another problem.
            row = batch["tokens"][int(batch["sample_rows"][slot + 1])]
            own = ds[doc]
            assert (
                row[: own["response_start"]].tolist()
                == own["tokens"][: own["response_start"]].tolist()
            )
            partner = ds[int(kl_partners(ds.groups)[doc])]
            tail = partner["tokens"][partner["response_start"] :].tolist()
            assert row[own["response_start"] : own["response_start"] + len(tail)].tolist() == tail
            assert partner["group"] != own["group"]


def test_kl_partners_are_of_another_problem_and_need_two():
    groups = np.array([3, 3, 3, 1, 1, 3, 2, 2])
    partners = kl_partners(groups)
    assert partners.tolist() == [3, 3, 3, 5, 5, 6, 0, 0]
    assert (groups[partners] != groups).all()
    with pytest.raises(RolloutDataError, match="at least two problems"):
        kl_partners(np.array([4, 4, 4]))


def test_reference_logprobs_of_another_dataset_are_refused(data, tmp_path):
    prefix = str(tmp_path / "copy")
    for suffix in (".bin", ".idx", ".rewards.npy", ".json", ".shared_prefix.npy"):
        shutil.copy(data["pairs"] + suffix, prefix + suffix)
    ds = RewardDataset(prefix)
    _write_reference(prefix, fingerprint="0" * 64)
    with pytest.raises(RolloutDataError, match="computed for another dataset"):
        ReferenceLogprobs(ref_paths(prefix)["npy"][:-4], ds, need_kl=False)
    # Right fingerprint, wrong token counts (e.g. a file edited by hand).
    rows = _write_reference(prefix)
    rows["num_tokens"][3] += 1
    _write_reference(prefix, rows=rows)
    with pytest.raises(RolloutDataError, match="document 3 scored"):
        ReferenceLogprobs(ref_paths(prefix)["npy"][:-4], ds, need_kl=False)
    # KTO needs the mismatched samples' log-probs.
    _write_reference(prefix, kl=False)
    with pytest.raises(RolloutDataError, match="--skip-kl-samples"):
        ReferenceLogprobs(ref_paths(prefix)["npy"][:-4], ds, need_kl=True)
    # The trainer's data path turns it into a configuration error (exit 2 on every rank).
    with pytest.raises(ConfigError, match="--skip-kl-samples"):
        _training_data(prefix, "kto")


def test_dpo_on_a_plain_rollout_dataset_is_refused(data):
    with pytest.raises(ConfigError, match="--pairs ground-truth"):
        _training_data(data["rollouts"], "dpo", reference="online")


def test_reference_tool_bad_input_exits_2_before_any_work(data, tmp_path):
    import subprocess
    import sys

    from tests.torchrun_utils import REPO

    def tool(*args):
        return subprocess.run(
            [sys.executable, str(REPO / "tools/compute_ref_logprobs.py"), *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=str(REPO),
        )

    missing = tool(
        "--load",
        str(tmp_path / "nowhere"),
        "--data-path",
        data["pairs"],
        "--output",
        str(tmp_path / "ref"),
    )
    assert missing.returncode == 2 and f"--load {tmp_path / 'nowhere'}" in missing.stderr
    (tmp_path / "ref.npy").write_bytes(b"keep me")
    exists = tool(
        "--load", str(tmp_path), "--data-path", data["pairs"], "--output", str(tmp_path / "ref")
    )
    assert exists.returncode == 2 and "--overwrite" in exists.stderr
    assert (tmp_path / "ref.npy").read_bytes() == b"keep me"  # nothing overwritten
