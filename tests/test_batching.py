"""GlobalBatchSampler (DP sharding, epochs, resume) and collate_rollouts (padding, packing, masks).

References are built here with plain Python loops / plain PyTorch attention.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_rift.data import GlobalBatchSampler, collate_rollouts
from megatron_rift.data.batching import block_causal_attention_mask
from tests.rollout_fixtures import REPO, build_tokenizers, write_jsonl
from tests.torchrun_utils import read_rank_results, run_torchrun

PAD = 0


def epoch_indices(samplers, epoch):
    """All ranks' indices of one epoch, in global-batch order."""
    out = []
    for batch in range(len(samplers[0])):
        for sampler in samplers:
            out.extend(sampler.local_batch(epoch, batch).reshape(-1).tolist())
    return out


@pytest.mark.parametrize("num_samples", [48, 53])
def test_dp2_epoch_covers_each_sample_once(num_samples):
    samplers = [
        GlobalBatchSampler(num_samples, 8, rank, 2, seed=3, micro_batch_size=2) for rank in range(2)
    ]
    for epoch in range(3):
        seen = epoch_indices(samplers, epoch)
        assert len(seen) == len(set(seen)) == (num_samples // 8) * 8
        assert set(seen) <= set(range(num_samples))
        if num_samples % 8 == 0:
            assert sorted(seen) == list(range(num_samples))
        for sampler in samplers:
            assert sampler.local_batch(epoch, 0).shape == (2, 2)  # 4 per rank, micro-batches of 2
    assert epoch_indices(samplers, 0) != epoch_indices(samplers, 1)  # reshuffled per epoch
    other_seed = [GlobalBatchSampler(num_samples, 8, r, 2, seed=4) for r in range(2)]
    assert epoch_indices(other_seed, 0) != epoch_indices(samplers, 0)


def test_global_batches_do_not_depend_on_dp_size():
    one = GlobalBatchSampler(40, 8, 0, 1, seed=0)
    two = [GlobalBatchSampler(40, 8, r, 2, seed=0) for r in range(2)]
    four = [GlobalBatchSampler(40, 8, r, 4, seed=0) for r in range(4)]
    for batch in range(5):
        expected = one.local_batch(1, batch).reshape(-1).tolist()
        assert sum((s.local_batch(1, batch).reshape(-1).tolist() for s in two), []) == expected
        assert sum((s.local_batch(1, batch).reshape(-1).tolist() for s in four), []) == expected


def test_resume_continues_exactly():
    def take(sampler, n):
        iterator = iter(sampler)
        return [next(iterator).tolist() for _ in range(n)]

    straight = take(GlobalBatchSampler(30, 6, 1, 2, seed=7, micro_batch_size=1), 12)
    first = GlobalBatchSampler(30, 6, 1, 2, seed=7, micro_batch_size=1)
    head = take(first, 7)  # 5 batches per epoch: stop inside epoch 1
    state = first.state_dict()
    assert (state["epoch"], state["consumed_samples"]) == (1, 12)
    resumed = GlobalBatchSampler(30, 6, 1, 2, seed=7, micro_batch_size=1)
    resumed.load_state_dict(state)
    assert head + take(resumed, 5) == straight
    with pytest.raises(ValueError, match="seed"):
        GlobalBatchSampler(30, 6, 1, 2, seed=8).load_state_dict(state)


def test_sampler_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple of dp_size"):
        GlobalBatchSampler(100, 9, 0, 2, seed=0)
    with pytest.raises(ValueError, match="micro_batch_size"):
        GlobalBatchSampler(100, 8, 0, 2, seed=0, micro_batch_size=3)
    with pytest.raises(ValueError, match="cannot fill"):
        GlobalBatchSampler(5, 8, 0, 2, seed=0)


def make_samples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    samples = []
    for j, length in enumerate(lengths):
        prompt = int(rng.integers(1, length))
        samples.append(
            {
                "tokens": rng.integers(5, 100, size=length).astype(np.int32),
                "loss_mask": np.r_[np.zeros(prompt), np.ones(length - prompt)].astype(np.uint8),
                "reward": float(rng.normal()),
                "index": 100 + j,
            }
        )
    return samples


def test_collate_unpacked_against_loops():
    samples = make_samples([5, 12, 9])
    s = 12
    batch = collate_rollouts(samples, s, PAD)
    assert batch["tokens"].dtype == torch.int64 and batch["loss_mask"].dtype == torch.float32
    assert batch["rewards"].dtype == torch.float32
    for row, sample in enumerate(samples):
        tokens, mask = sample["tokens"].tolist(), sample["loss_mask"].tolist()
        n = len(tokens)
        padded = tokens + [PAD] * (s - n)
        assert batch["tokens"][row].tolist() == padded
        assert batch["labels"][row].tolist() == padded[1:] + [PAD]
        expected_mask = [float(mask[t + 1]) if t + 1 < n else 0.0 for t in range(s)]
        assert batch["loss_mask"][row].tolist() == expected_mask
        assert batch["position_ids"][row].tolist() == list(range(n)) + [0] * (s - n)
        assert batch["rewards"][row].item() == pytest.approx(sample["reward"])
        assert batch["token_rewards"][row].tolist() == pytest.approx(
            [sample["reward"] * m for m in expected_mask]
        )
    assert batch["sample_ids"].tolist() == [100, 101, 102]
    with pytest.raises(ValueError, match="13 tokens > seq_length 12"):
        collate_rollouts(make_samples([13]), s, PAD)


def test_packing_keeps_every_sample():
    samples = make_samples([5, 12, 3, 7, 4, 9, 2, 6])
    s = 16
    unpacked_rows = len(samples)
    batch = collate_rollouts(samples, s, PAD, pack=True, attention_mask=True)
    b = batch["tokens"].shape[0]
    assert b < unpacked_rows and "rewards" not in batch
    seg = batch["segment_ids"]
    found = set()
    for row in range(b):
        for j in sorted(set(seg[row].tolist()) - {-1}):
            found.add(j)
            where = (seg[row] == j).nonzero().flatten().tolist()
            assert where == list(range(where[0], where[0] + len(where)))  # contiguous
            assert (
                row == batch["sample_rows"][j].item()
                and where[0] == batch["sample_offsets"][j].item()
            )
            tokens, mask = samples[j]["tokens"].tolist(), samples[j]["loss_mask"].tolist()
            assert batch["tokens"][row, where].tolist() == tokens
            assert batch["position_ids"][row, where].tolist() == list(range(len(tokens)))
            # Labels of this sample's positions, and which of them count.
            labels = batch["labels"][row, where].tolist()
            assert labels[:-1] == tokens[1:]
            expected_mask = [float(m) for m in mask[1:]] + [0.0]
            assert batch["loss_mask"][row, where].tolist() == expected_mask
            assert batch["token_rewards"][row, where].tolist() == pytest.approx(
                [samples[j]["reward"] * m for m in expected_mask]
            )
    assert found == set(range(len(samples)))
    assert batch["loss_mask"].sum().item() == sum(int(x["loss_mask"][1:].sum()) for x in samples)
    assert batch["loss_mask"][seg == -1].sum().item() == 0
    with pytest.raises(ValueError, match="num_rows=2"):
        collate_rollouts(samples, s, PAD, pack=True, num_rows=2)
    fixed = collate_rollouts(samples, s, PAD, pack=True, num_rows=b + 1)
    assert fixed["tokens"].shape == (b + 1, s) and fixed["loss_mask"][b].sum() == 0


def test_block_causal_mask_against_loops_and_attention():
    samples = make_samples([5, 3, 6, 4, 7], seed=1)
    s = 16
    batch = collate_rollouts(samples, s, PAD, pack=True, attention_mask=True)
    mask, seg = batch["attention_mask"], batch["segment_ids"]
    assert mask.shape == (seg.shape[0], 1, s, s) and mask.dtype == torch.bool
    for row in range(seg.shape[0]):
        for q in range(s):
            for k in range(s):
                allowed = k <= q and seg[row, q] == seg[row, k]
                assert mask[row, 0, q, k].item() == (not allowed)
    # Plain-PyTorch attention over the packed rows equals attention over each sample alone.
    torch.manual_seed(0)
    embed = torch.randn(100, 8)
    x = embed[batch["tokens"]].unsqueeze(1)  # [b, 1, s, d]
    packed = F.scaled_dot_product_attention(x, x, x, attn_mask=~mask)
    assert torch.isfinite(packed).all()  # padding rows are never fully masked
    for j, sample in enumerate(samples):
        row, off, n = batch["sample_rows"][j], batch["sample_offsets"][j], len(sample["tokens"])
        alone = embed[torch.as_tensor(sample["tokens"], dtype=torch.long)].view(1, 1, n, -1)
        reference = F.scaled_dot_product_attention(alone, alone, alone, is_causal=True)
        torch.testing.assert_close(packed[row, :, off : off + n], reference[0])
    assert torch.equal(block_causal_attention_mask(seg), mask)


@pytest.mark.distributed
def test_two_ranks_read_the_packed_dataset_once_per_epoch(tmp_path):
    from megatron_rift.data import PackConfig, pack_rollouts

    _, sp = build_tokenizers(tmp_path)
    records = [
        {
            "prompt": f"what is {i} and {i}",
            "response": "the answer is " + "five " * (i % 4 + 1),
            "correct": i % 3 == 0,
            "prompt_id": i // 4,
        }
        for i in range(36)
    ]
    prefix = str(tmp_path / "ds")
    pack_rollouts(
        PackConfig(
            inputs=[str(write_jsonl(tmp_path / "r.jsonl", records))],
            output_prefix=prefix,
            tokenizer=str(sp),
            progress=False,
        )
    )
    run_torchrun(
        REPO / "tests" / "workers" / "batching_worker.py",
        [prefix, "12", "2"],
        nproc=2,
        timeout=240,
        result_dir=tmp_path,
    )
    ranks = read_rank_results(tmp_path, 2)
    for epoch in range(2):
        seen = ranks[0]["epochs"][epoch] + ranks[1]["epochs"][epoch]
        assert sorted(seen) == list(range(36))  # 36 = 3 global batches of 12
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]
    # What each rank collated is exactly its samples' response tokens and rewards.
    for rank in ranks:
        assert rank["masked_tokens"] == rank["expected_masked_tokens"]
        assert rank["reward_sum"] == pytest.approx(rank["expected_reward_sum"], rel=1e-5)
