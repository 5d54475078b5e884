"""Rollout data path: pack rollouts into Megatron indexed datasets, read them, batch them.

    pack_rollouts(PackConfig(...))        # JSONL/JSON/Parquet -> PREFIX.bin/.idx/.rewards.npy/.json
    RewardDataset(prefix)                 # ds[i] -> tokens, loss_mask, reward, group
    GlobalBatchSampler(...), collate_rollouts(...)   # data-parallel batches in Megatron's layout
    load_tokenizer(path)                  # HF tokenizer folder or SentencePiece .model

Names are imported lazily so that tokenizer worker processes do not import Megatron/torch.
"""

from importlib import import_module

_EXPORTS = {
    "RewardDataset": "megatron_rift.data.dataset",
    "GlobalBatchSampler": "megatron_rift.data.batching",
    "collate_rollouts": "megatron_rift.data.batching",
    "block_causal_attention_mask": "megatron_rift.data.batching",
    "PackConfig": "megatron_rift.data.packing",
    "pack_rollouts": "megatron_rift.data.packing",
    "SIDE_DTYPE": "megatron_rift.data.format",
    "RolloutFields": "megatron_rift.data.rollout_reader",
    "REWARD_SCHEMES": "megatron_rift.data.reward_schemes",
    "scheme_rewards": "megatron_rift.data.reward_schemes",
    "RolloutTokenizer": "megatron_rift.data.tokenizer",
    "load_tokenizer": "megatron_rift.data.tokenizer",
    "RolloutDataError": "megatron_rift.data.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
