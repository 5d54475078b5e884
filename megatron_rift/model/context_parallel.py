"""Context parallelism for the SDPA core attention (the local layers; TE's attention has its own).

Megatron splits each sequence into 2·CP chunks and gives CP rank r the chunks r and 2·CP-1-r
(``get_batch_on_this_cp_rank``: causal attention then costs every rank the same). Each rank's
queries attend to the keys and values of the whole sequence: they are all-gathered over the CP
group (the gradient reduce-scatters back, Megatron's sequence-parallel gather), and the causal mask
compares the tokens' positions in the full sequence instead of their local order.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region


def chunk_positions(chunk: int, cp_rank: int, cp_size: int, device) -> torch.Tensor:
    """Positions in the full sequence of CP rank ``cp_rank``'s tokens (two chunks of ``chunk``)."""
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    mirror = 2 * cp_size - 1 - cp_rank
    second = torch.arange(mirror * chunk, (mirror + 1) * chunk, device=device)
    return torch.cat([first, second])


def gather_keys_values(key: torch.Tensor, value: torch.Tensor, cp_group):
    """[s_local, b, g, d] each -> [s_local * CP, b, g, d], in the order of the CP ranks' chunks;
    the backward reduce-scatters each rank's share of the gradient back to it."""
    gather = gather_from_sequence_parallel_region
    return (
        gather(key, tensor_parallel_output_grad=True, group=cp_group),
        gather(value, tensor_parallel_output_grad=True, group=cp_group),
    )


def causal_mask(local_len: int, cp_group, device) -> torch.Tensor:
    """[s_local, s_local * CP] bool, True where this rank's query may attend to the gathered key."""
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    chunk = local_len // 2
    queries = chunk_positions(chunk, cp_rank, cp_size, device)
    keys = torch.cat([chunk_positions(chunk, r, cp_size, device) for r in range(cp_size)])
    return keys.unsqueeze(0) <= queries.unsqueeze(1)


# The batch entries with one value per token, [rows, seq]: what context parallelism splits.
PER_TOKEN_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "segment_ids", "rewards")


def split_for_context_parallel(batch: dict) -> dict:
    """This CP rank's 2 of the 2·CP chunks of every per-token entry (Megatron's split, through
    megatron_compat for 0.16 and 0.19); per-sample entries (rewards [b], roles, ref_logprobs) stay
    whole. A no-op without context parallelism."""
    from megatron_rift import megatron_compat

    per_token = {
        key: batch[key] for key in PER_TOKEN_KEYS if key in batch and batch[key].dim() == 2
    }
    return {**batch, **megatron_compat.batch_on_this_cp_rank(per_token)}
