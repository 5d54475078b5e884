"""Test helpers that reach the losses the way the trainer does: by objective name through the registry
(``get_objective(name).load_loss()``) and its batch-dict contract, never by importing a loss function
for a name. An objective whose registry entry points at the wrong loss fails here too.
"""

from __future__ import annotations

import torch

from megatron_rift.losses import LossSettings, make_loss_func
from megatron_rift.objectives import Unit, get_objective, objectives

TOKEN_OBJECTIVES = tuple(o.name for o in objectives() if o.unit is Unit.ROLLOUT)
PREFERENCE_OBJECTIVES = tuple(o.name for o in objectives() if o.unit is not Unit.ROLLOUT)
REFERENCE_OBJECTIVES = tuple(o.name for o in objectives() if o.reference)


def first_response_tokens(loss_mask: torch.Tensor, counts) -> torch.Tensor:
    """bool [b, s]: the first ``counts[i]`` positions of row i where ``loss_mask`` is 1 (a
    negative's shared prefix as the collate marks it, for one sample per row)."""
    rank = torch.cumsum((loss_mask > 0).long(), dim=-1)
    return (loss_mask > 0) & (rank <= torch.as_tensor(counts).view(-1, 1))


DEFAULT_SETTINGS = LossSettings()  # frozen: safe as a default


def token_batch(
    loss_mask: torch.Tensor,
    rewards: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    shared_prefix: torch.Tensor | None = None,
) -> dict:
    """A token objective's batch: per-sample [b] or per-token [b, s] rewards; ``shared_prefix``
    the [b, s] bool mask of negatives' tokens shared with a positive (divergent mode)."""
    batch = {"loss_mask": loss_mask, "rewards": rewards}
    if segment_ids is not None:
        batch["segment_ids"] = segment_ids
    if shared_prefix is not None:
        batch["shared_prefix"] = shared_prefix
    return batch


def preference_batch(
    loss_mask: torch.Tensor,
    segment_ids: torch.Tensor,
    roles: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
) -> dict:
    """A pair / mismatched-unit batch (``ref_logprobs`` left out when None)."""
    batch = {"loss_mask": loss_mask, "segment_ids": segment_ids, "roles": roles}
    if ref_logprobs is not None:
        batch["ref_logprobs"] = ref_logprobs
    return batch


def _token_loss(objective: str):
    spec = get_objective(objective)  # KeyError naming the known objectives
    if spec.unit is not Unit.ROLLOUT:
        raise AssertionError(f"{objective} is a preference objective: use compute_preference_loss")
    return spec.load_loss()


def _preference_loss(objective: str):
    spec = get_objective(objective)
    if spec.unit is Unit.ROLLOUT:
        raise AssertionError(f"{objective} is a token objective: use compute_loss")
    return spec.load_loss()


def compute_loss(
    per_token_ce: torch.Tensor,
    loss_mask: torch.Tensor,
    rewards: torch.Tensor,
    objective: str,
    negative_mode: str = "token",
    segment_ids: torch.Tensor | None = None,
    shared_prefix: torch.Tensor | None = None,
):
    """``(loss_sum, num_tokens, metrics)`` of a token objective, through the registry."""
    return _token_loss(objective)(
        per_token_ce,
        token_batch(loss_mask, rewards, segment_ids, shared_prefix),
        LossSettings(negative_mode=negative_mode),
    )


def compute_preference_loss(
    per_token_ce: torch.Tensor,
    loss_mask: torch.Tensor,
    segment_ids: torch.Tensor,
    roles: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    objective: str,
    settings: LossSettings = DEFAULT_SETTINGS,
    kl_group=None,
):
    """``(loss_sum, units, metrics)`` of a preference objective, through the registry;
    ``kl_group`` is the data-parallel group the trainer passes."""
    batch = preference_batch(loss_mask, segment_ids, roles, ref_logprobs)
    return _preference_loss(objective)(per_token_ce, batch, settings, kl_group)


def objective_loss_func(
    objective: str, batch: dict, settings: LossSettings = DEFAULT_SETTINGS, data_parallel_group=None
):
    """The Megatron ``loss_func(output_tensor)`` the trainer's forward step returns."""
    return make_loss_func(
        get_objective(objective).load_loss(), batch, settings, data_parallel_group
    )
