"""RewardDataset: items against the tokenizer, and clear errors for missing or mismatched files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import sentencepiece as spm

from megatron_rift.data import PackConfig, RewardDataset, RolloutDataError, pack_rollouts
from tests.rollout_fixtures import HAND_MADE_ROLLOUTS, build_tokenizers, write_jsonl


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_dataset")
    _, sp = build_tokenizers(root)
    prefixes = {}
    for name, records in (("full", HAND_MADE_ROLLOUTS), ("short", HAND_MADE_ROLLOUTS[:5])):
        data = write_jsonl(root / f"{name}.jsonl", records)
        prefixes[name] = str(root / name)
        pack_rollouts(
            PackConfig(
                inputs=[str(data)], output_prefix=prefixes[name], tokenizer=str(sp), progress=False
            )
        )
    return {"root": root, "sp": sp, **prefixes}


def copy_dataset(src: str, dst: str, skip=()):
    for suffix in (".bin", ".idx", ".rewards.npy", ".json", ".shared_prefix.npy"):
        if suffix not in skip:
            shutil.copy(src + suffix, dst + suffix)


def test_items(packed):
    ds = RewardDataset(packed["full"])
    sp = spm.SentencePieceProcessor(model_file=str(packed["sp"]))
    assert len(ds) == len(HAND_MADE_ROLLOUTS)
    for i, record in enumerate(HAND_MADE_ROLLOUTS):
        item = ds[i]
        prompt = [sp.bos_id()] + sp.encode(record["prompt"])
        response = sp.encode(record["response"]) + [sp.eos_id()]
        assert item["tokens"].ndim == 1 and np.issubdtype(item["tokens"].dtype, np.integer)
        assert item["tokens"].tolist() == prompt + response
        assert item["loss_mask"].shape == item["tokens"].shape
        assert item["loss_mask"].tolist() == [0] * len(prompt) + [1] * len(response)
        assert isinstance(item["reward"], float) and isinstance(item["group"], int)
    assert ds[-1]["tokens"].tolist() == ds[len(ds) - 1]["tokens"].tolist()
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert ds.lengths.tolist() == [len(ds[i]["tokens"]) for i in range(len(ds))]
    assert (ds.pad_id, ds.eos_id) == (sp.pad_id(), sp.eos_id())


@pytest.mark.parametrize("missing", [".rewards.npy", ".json", ".idx", ".shared_prefix.npy"])
def test_missing_file(packed, missing):
    prefix = str(packed["root"] / f"missing{missing.replace('.', '_')}")
    copy_dataset(packed["full"], prefix, skip=(missing,))
    with pytest.raises(RolloutDataError, match=rf"missing .*{prefix}{missing}.*pack_rollouts"):
        RewardDataset(prefix)


def test_side_file_from_another_dataset(packed):
    prefix = str(packed["root"] / "mismatch")
    copy_dataset(packed["full"], prefix)
    shutil.copy(packed["short"] + ".rewards.npy", prefix + ".rewards.npy")
    with pytest.raises(RolloutDataError, match=r"13 sequences in 13 documents.* 5 rows"):
        RewardDataset(prefix)


def test_side_file_with_bad_response_start(packed):
    prefix = str(packed["root"] / "bad_start")
    copy_dataset(packed["full"], prefix)
    side = np.load(prefix + ".rewards.npy")
    side["response_start"][4] = len(RewardDataset(packed["full"])[4]["tokens"])
    np.save(prefix + ".rewards.npy", side)
    with pytest.raises(RolloutDataError, match=r"rollout 4 has response_start"):
        RewardDataset(prefix)


def test_side_file_with_wrong_dtype(packed):
    prefix = str(packed["root"] / "bad_dtype")
    copy_dataset(packed["full"], prefix)
    np.save(prefix + ".rewards.npy", np.zeros(len(HAND_MADE_ROLLOUTS), dtype=np.float32))
    with pytest.raises(RolloutDataError, match="expected 1-D"):
        RewardDataset(prefix)


def test_format_version_1_still_reads(packed):
    """A dataset packed before response_end existed: its responses run to the document's end."""
    from numpy.lib import recfunctions

    from megatron_rift.data.format import SIDE_DTYPE_V1

    prefix = str(packed["root"] / "version1")
    copy_dataset(packed["full"], prefix)
    side = np.load(prefix + ".rewards.npy")
    np.save(prefix + ".rewards.npy", recfunctions.drop_fields(side, "response_end", usemask=False))
    old, new = RewardDataset(prefix), RewardDataset(packed["full"])
    assert old.side.dtype == SIDE_DTYPE_V1
    for i in range(len(new)):
        assert old[i]["loss_mask"].tolist() == new[i]["loss_mask"].tolist()
    assert old.loss_tokens.tolist() == new.loss_tokens.tolist()
