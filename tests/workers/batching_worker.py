"""Worker: each data-parallel rank reads the packed dataset through its own sampler for two
epochs and reports the sample indices it got and what its packed micro-batches hold.

args: PREFIX GLOBAL_BATCH_SIZE MICRO_BATCH_SIZE
"""

import sys

import torch.distributed as dist

from megatron_rift.data import GlobalBatchSampler, RewardDataset, collate_rollouts
from tests.torchrun_utils import write_rank_result


def main():
    prefix, global_batch, micro = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ds = RewardDataset(prefix)
    sampler = GlobalBatchSampler(
        len(ds), global_batch, rank, world, seed=11, micro_batch_size=micro
    )
    seq_length = int(ds.lengths.max()) + 1
    epochs, masked, expected_masked, reward_sum, expected_reward_sum = [], 0, 0, 0.0, 0.0
    iterator = iter(sampler)
    for _epoch in range(2):
        seen = []
        for _ in range(len(sampler)):
            for micro_batch in next(iterator):
                items = [ds[i] for i in micro_batch]
                batch = collate_rollouts(items, seq_length, ds.pad_id, pack=True)
                seen.extend(int(i) for i in micro_batch)
                masked += int(batch["loss_mask"].sum())
                reward_sum += float(batch["token_rewards"].sum())
                for item in items:
                    # Labels cover tokens 1..L-1; the response starts at >= 1, so all of it counts.
                    expected_masked += int(item["loss_mask"].sum())
                    expected_reward_sum += item["reward"] * int(item["loss_mask"].sum())
        epochs.append(seen)
    write_rank_result(
        {
            "epochs": epochs,
            "masked_tokens": masked,
            "expected_masked_tokens": expected_masked,
            "reward_sum": reward_sum,
            "expected_reward_sum": expected_reward_sum,
        }
    )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
