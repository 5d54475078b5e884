"""The RIFT loss family on Megatron-Core's per-token cross-entropy.

Each objective's loss here follows the contract of :class:`megatron_rift.objectives.Objective`
(``loss(per_token_ce, batch, settings, data_parallel_group) -> (loss_sum, count, metrics)``); the
registry in :mod:`megatron_rift.objectives` says which function serves which objective. Every one is
a function of the per-token cross-entropy ``ce_t = -log p_t`` that
``GPTModel.forward(..., labels=...)`` already returns (``vocab_parallel_cross_entropy`` under tensor
parallelism, TE's fused CE when enabled). With ``p_t = exp(-ce_t)``, autograd through Megatron's own
CE gives exact gradients under TP, on the last pipeline stage and with FP8 layers; the model is
untouched and no extra [tokens, vocab] tensor is ever materialized.

Per-token terms, summed over response tokens (``loss_mask == 1``):

============  ==============================================  ===========================
objective     term for a token of a sample with reward r      tokens counted
============  ==============================================  ===========================
``sft``       ce_t                                            all
``dft``       sg(p_t) * ce_t   (DFT paper, eq. 9)             all
``rft``       ce_t if r > 0, else nothing                     only those of r > 0 samples
``rift``      r * ce_t if r > 0;  -r * p_t if r < 0;  0 if 0  all
``naive``     r * ce_t          (RIFT paper eq. 1)            all
============  ==============================================  ===========================

RIFT's negative term is the bounded linear surrogate of paper section 3.3: ``-r * p`` lies in
``[0, -r]`` and its gradient never explodes as p -> 0, unlike ``naive``'s ``r * ce`` which is
unbounded below (theorem 3.2) and kept only for the ablation. Every RIFT term is >= 0.

``negative_mode`` chooses how RIFT's negatives are scored:

- ``token`` (default): ``-r * p_t`` per token, as above.
- ``sequence``: eq. 5 read literally, ``-r * pi(y|x)`` with ``pi = prod_t p_t`` of the sample.
- ``geometric``: ``-r * exp(mean_t log p_t)``, the per-token geometric mean probability.

Sequence modes are normalized like the token mode: a negative sample of n response tokens adds
``n * (-r * pi)`` to the loss sum and its n tokens to the count, so it weighs what its tokens would.
``token`` is the default because a whole response's probability is vanishingly small for any
realistic length (``sequence`` then gives no gradient at all), while token-level probabilities keep
the signal usable; the DFT paper's table 8 found the same (token-level beats sequence-level).

The final loss is ``loss_sum / num_tokens`` where both are summed over micro-batches and
data-parallel ranks: Megatron's schedule does that division when
``TransformerConfig.calculate_per_token_loss`` is set (see :func:`make_loss_func`).

Preference baselines (:func:`dpo_loss`, :func:`kto_loss`, :func:`simpo_loss`) work on
whole responses: ``log pi(y|x) = -sum_t ce_t`` over a sample's response tokens, from the same
per-token CE. Their "count" is pairs (``dpo``, ``simpo``) or samples (``kto``), so the schedule's
division gives the usual per-pair / per-sample mean:

==========  ========================================================================  ==========
objective   loss of one unit                                                          reference
==========  ========================================================================  ==========
``dpo``     ``-log sigmoid(beta * ((lp_c - ref_c) - (lp_r - ref_r)))``                  yes
``kto``     ``w_D * (1 - sigmoid(beta * (lp - ref - z)))`` if desirable,                yes
            ``w_U * (1 - sigmoid(beta * (z - lp + ref)))`` if undesirable
``simpo``   ``-log sigmoid(beta * (lp_c / n_c - lp_r / n_r) - gamma)``                  no
==========  ========================================================================  ==========

``c``/``r`` are a pair's chosen and rejected responses, ``n`` their response token counts. KTO's
reference point ``z`` is its KL estimate (KTO paper section 4.1, as TRL does it): the mean of
``lp - ref`` over *mismatched* samples (a prompt with another problem's response) in the same
micro-batch on every data-parallel rank (TRL gathers it across processes too), clamped at 0 and
detached.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_rift.roles import CHOSEN, KL_SAMPLE, REJECTED


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """Hyper-parameters of the losses (trainer flags in brackets)."""

    negative_mode: str = "token"  # [--negative-mode] how rift scores negatives (module docstring)
    beta: float = 0.1  # [--beta] DPO/KTO 0.1 (their papers' defaults); SimPO wants ~2
    simpo_gamma: float = 1.0  # [--simpo-gamma] target reward margin (SimPO: gamma/beta ~ 0.5)
    desirable_weight: float = 1.0  # [--kto-desirable-weight] KTO's lambda_D
    undesirable_weight: float = 1.0  # [--kto-undesirable-weight] KTO's lambda_U


@dataclasses.dataclass
class TokenView:
    """One micro-batch's per-token quantities, [b, s] each, as the token objectives see them."""

    ce: torch.Tensor  # float, -log p_t
    p: torch.Tensor  # exp(-ce), detached nowhere: terms choose what to detach
    r: torch.Tensor  # the reward of the sample each token belongs to
    mask: torch.Tensor  # bool, response tokens
    positive: torch.Tensor  # mask & r > 0
    negative: torch.Tensor  # mask & r < 0
    segment_ids: torch.Tensor | None  # sample index within a packed row (None: a row is a sample)


# A token objective's terms: (per-token loss terms [b, s], which tokens are counted [b, s] bool).
TokenTerms = Callable[[TokenView, LossSettings], "tuple[torch.Tensor, torch.Tensor]"]


def sft_terms(v: TokenView, settings: LossSettings):
    return v.ce, v.mask


def dft_terms(v: TokenView, settings: LossSettings):
    return v.p.detach() * v.ce, v.mask


def rft_terms(v: TokenView, settings: LossSettings):
    return v.ce, v.positive


def naive_terms(v: TokenView, settings: LossSettings):
    return v.r * v.ce, v.mask


def rift_terms(v: TokenView, settings: LossSettings):
    if settings.negative_mode == "token":
        negative_terms = -v.r * v.p
    else:
        negative_terms = -v.r * _sequence_probability(
            v.ce, v.negative, settings.negative_mode, v.segment_ids
        )
    zero = torch.zeros_like(v.ce)
    return torch.where(
        v.positive, v.r * v.ce, torch.where(v.negative, negative_terms, zero)
    ), v.mask


def token_loss(
    per_token_ce: torch.Tensor,
    loss_mask: torch.Tensor,
    rewards: torch.Tensor,
    terms: TokenTerms,
    settings: LossSettings = LossSettings(),
    segment_ids: torch.Tensor | None = None,
):
    """Loss sum, counted tokens and metrics of one micro-batch under a token objective's ``terms``.

    Args:
        per_token_ce: [b, s] float, Megatron's per-token cross-entropy.
        loss_mask: [b, s], 1 on response tokens.
        rewards: [b] per-sample rewards, or [b, s] per-token rewards (packed rows, where each token
            carries the reward of the sample it belongs to).
        terms: e.g. :func:`rift_terms`.
        settings: ``negative_mode`` is read by :func:`rift_terms`.
        segment_ids: [b, s] sample index within each packed row; only the sequence negative modes
            need it, and only for packed rows (otherwise a row is one sample).

    Returns:
        ``(loss_sum, num_tokens, metrics)``: 0-dim float tensor with grad, 0-dim int tensor, and a
        dict of detached ``tensor([sum, count])`` pairs whose ratio is the metric (so they add up
        across micro-batches and ranks).
    """
    ce = per_token_ce.float()
    mask = loss_mask.to(ce.dtype) > 0
    r = rewards.to(ce.dtype)
    r = r.unsqueeze(-1).expand_as(ce) if r.dim() == 1 else r
    positive, negative = mask & (r > 0), mask & (r < 0)
    p = torch.exp(-ce)  # ce >= 0, so p in (0, 1]: no overflow for any logit
    view = TokenView(ce, p, r, mask, positive, negative, segment_ids)
    values, counted = terms(view, settings)
    # torch.where, not a product: a masked-out position must not leak NaN/inf into the sum.
    loss_sum = torch.where(counted, values, torch.zeros_like(values)).sum()
    num_tokens = counted.sum().to(torch.int)
    metrics = _token_metrics(ce.detach(), p.detach(), mask, positive, negative)
    return loss_sum, num_tokens, metrics


def token_objective_loss(terms: TokenTerms):
    """The objective contract's ``loss(per_token_ce, batch, settings, group)`` for ``terms``."""

    def loss(
        per_token_ce, batch, settings: LossSettings = LossSettings(), data_parallel_group=None
    ):
        return token_loss(
            per_token_ce,
            batch["loss_mask"],
            batch["rewards"],
            terms,
            settings,
            batch.get("segment_ids"),
        )

    loss.__doc__ = f"Token objective loss with :func:`{terms.__name__}`."
    return loss


sft_loss = token_objective_loss(sft_terms)
dft_loss = token_objective_loss(dft_terms)
rft_loss = token_objective_loss(rft_terms)
rift_loss = token_objective_loss(rift_terms)
naive_loss = token_objective_loss(naive_terms)


def context_parallel_group():
    """Megatron's context-parallel group when CP > 1, else None: each rank then holds 2 of the
    2·CP chunks of every sequence, and a per-sample sum over its tokens is a partial sum."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    if parallel_state.get_context_parallel_world_size() == 1:
        return None
    return parallel_state.get_context_parallel_group()


def sum_over_context_parallel(values: torch.Tensor) -> torch.Tensor:
    """Per-sample partial sums summed over the CP ranks (unchanged without CP).

    Differentiable: the backward all-reduces the gradient too, so each rank's partial sum gets the
    gradient that all ranks' uses of the total give it (each rank's loss uses the total)."""
    group = context_parallel_group()
    if group is None:
        return values
    if values.requires_grad:
        import torch.distributed.nn.functional as differentiable

        return differentiable.all_reduce(values, group=group)
    values = values.clone()
    dist.all_reduce(values, group=group)
    return values


def _sequence_probability(ce, negative, mode, segment_ids):
    """Per-token broadcast of each negative sample's pi(y|x) (``sequence``) or its geometric mean
    token probability (``geometric``); sample = (row, segment)."""
    if mode not in ("sequence", "geometric"):
        raise ValueError(f"unknown negative_mode {mode!r}; choose token, sequence or geometric")
    b, s = ce.shape
    rows = torch.arange(b, device=ce.device).unsqueeze(-1).expand(b, s)
    if segment_ids is None:
        sample = rows
        num_samples = b
    else:
        seg = segment_ids.long().clamp(min=0)
        width = int(seg.max().item()) + 1 if seg.numel() else 1
        sample, num_samples = rows * width + seg, b * width
    neg_ce = torch.where(negative, ce, torch.zeros_like(ce))
    log_prob = torch.zeros(num_samples, dtype=ce.dtype, device=ce.device).index_add(
        0, sample.reshape(-1), -neg_ce.reshape(-1)
    )
    log_prob = sum_over_context_parallel(log_prob)
    if mode == "geometric":
        count = torch.zeros(num_samples, dtype=ce.dtype, device=ce.device).index_add(
            0, sample.reshape(-1), negative.reshape(-1).to(ce.dtype)
        )
        log_prob = log_prob / sum_over_context_parallel(count).clamp(min=1)
    return torch.exp(log_prob)[sample]


def _token_metrics(ce, p, mask, positive, negative):
    n = mask.sum()
    return {
        "ce": _pair(torch.where(mask, ce, 0).sum(), n),
        "positive_token_fraction": _pair(positive.sum(), n),
        "negative_token_fraction": _pair(negative.sum(), n),
        "p_positive": _pair(torch.where(positive, p, 0).sum(), positive.sum()),
        "p_negative": _pair(torch.where(negative, p, 0).sum(), negative.sum()),
    }


def sequence_logprobs(
    per_token_ce: torch.Tensor, loss_mask: torch.Tensor, segment_ids: torch.Tensor, num_samples: int
):
    """Per-sample response log-probability ``sum_t -ce_t`` and response token count.

    ``segment_ids`` [b, s] names the sample (0..num_samples-1) each position belongs to (-1 on
    padding), as :func:`megatron_rift.data.batching.collate_rollouts` builds it, packed or not.
    Returns float [n] (with grad) and float [n].
    """
    ce = per_token_ce.float()
    counted = (loss_mask > 0) & (segment_ids >= 0)
    slot = torch.where(
        counted, segment_ids.long(), torch.full_like(segment_ids.long(), num_samples)
    )
    zeros = torch.zeros(num_samples + 1, dtype=ce.dtype, device=ce.device)
    logp = zeros.index_add(0, slot.reshape(-1), torch.where(counted, -ce, 0.0).reshape(-1))
    count = zeros.index_add(0, slot.reshape(-1), counted.reshape(-1).to(ce.dtype))
    # Under context parallelism this rank holds part of each sample's tokens.
    return sum_over_context_parallel(logp[:num_samples]), sum_over_context_parallel(
        count[:num_samples]
    )


@dataclasses.dataclass
class SequenceView:
    """One preference micro-batch's per-sample quantities, [n] each (n sequences)."""

    logp: torch.Tensor  # log pi(y|x) over response tokens, with grad
    count: torch.Tensor  # response tokens
    roles: torch.Tensor  # long: CHOSEN / REJECTED / KL_SAMPLE
    ref_logprobs: torch.Tensor | None  # log pi_ref(y|x), or None for reference-free objectives

    def ratio(self, name: str) -> torch.Tensor:
        """log pi / pi_ref per sample."""
        if self.ref_logprobs is None:
            raise ValueError(f"{name} needs the reference model's log-probs")
        return self.logp - self.ref_logprobs.to(self.logp.dtype)


def _check_pairs(v: SequenceView, name: str) -> None:
    roles = v.roles
    if roles.numel() % 2 or not (
        bool((roles[0::2] == CHOSEN).all()) and bool((roles[1::2] == REJECTED).all())
    ):
        raise ValueError(
            f"{name}: a micro-batch must hold whole (chosen, rejected) pairs in "
            f"order; got roles {roles.tolist()}"
        )


def _pair_losses(margin, chosen_reward, rejected_reward):
    losses = -F.logsigmoid(margin)
    units = losses.numel()
    metrics = {
        "reward_accuracy": _pair((margin.detach() > 0).sum(), units),
        "reward_margin": _pair((chosen_reward - rejected_reward).detach().sum(), units),
        "chosen_reward": _pair(chosen_reward.detach().sum(), units),
        "rejected_reward": _pair(rejected_reward.detach().sum(), units),
    }
    return losses.sum(), torch.tensor(units, dtype=torch.int), metrics


def dpo_unit_losses(v: SequenceView, settings: LossSettings, data_parallel_group=None):
    """DPO: ``-log sigmoid(beta * ((lp_c - ref_c) - (lp_r - ref_r)))`` per pair."""
    _check_pairs(v, "DPO")
    ratio, beta = v.ratio("DPO"), settings.beta
    margin = beta * (ratio[0::2] - ratio[1::2])
    return _pair_losses(margin, beta * ratio[0::2], beta * ratio[1::2])


def simpo_unit_losses(v: SequenceView, settings: LossSettings, data_parallel_group=None):
    """SimPO: length-normalized and reference-free, with target margin gamma."""
    _check_pairs(v, "SimPO")
    average = v.logp / v.count.clamp(min=1)
    chosen, rejected = settings.beta * average[0::2], settings.beta * average[1::2]
    return _pair_losses(chosen - rejected - settings.simpo_gamma, chosen, rejected)


def kto_unit_losses(v: SequenceView, settings: LossSettings, data_parallel_group=None):
    """KTO with its reference point z estimated from the mismatched samples of every rank of
    ``data_parallel_group`` (its ranks run the same number of micro-batches, so the all-reduce is
    in step; None: this micro-batch's own)."""
    ratio, beta = v.ratio("KTO"), settings.beta
    desirable, undesirable, kl = v.roles == CHOSEN, v.roles == REJECTED, v.roles == KL_SAMPLE
    kl_stats = torch.stack([torch.where(kl, ratio, 0.0).sum(), kl.sum().to(ratio.dtype)]).detach()
    if data_parallel_group is not None and dist.get_world_size(data_parallel_group) > 1:
        dist.all_reduce(kl_stats, group=data_parallel_group)
    num_kl = kl_stats[1]
    z = (kl_stats[0] / num_kl.clamp(min=1)).clamp(min=0)  # no host sync on the hot path
    losses = torch.where(
        desirable,
        settings.desirable_weight * (1 - torch.sigmoid(beta * (ratio - z))),
        torch.where(
            undesirable,
            settings.undesirable_weight * (1 - torch.sigmoid(beta * (z - ratio))),
            torch.zeros_like(ratio),
        ),
    )
    units = int((desirable | undesirable).sum())
    metrics = {
        "kl_estimate": _pair(z, num_kl > 0),
        "desirable_reward": _pair(
            torch.where(desirable, beta * ratio, 0.0).detach().sum(), desirable.sum()
        ),
        "undesirable_reward": _pair(
            torch.where(undesirable, beta * ratio, 0.0).detach().sum(), undesirable.sum()
        ),
    }
    return losses.sum(), torch.tensor(units, dtype=torch.int), metrics


def preference_loss(
    per_token_ce: torch.Tensor,
    loss_mask: torch.Tensor,
    segment_ids: torch.Tensor,
    roles: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    unit_losses,
    settings: LossSettings = LossSettings(),
    data_parallel_group=None,
):
    """Loss sum, unit count and metrics of one preference micro-batch (see the module table).

    Args:
        per_token_ce, loss_mask, segment_ids: [b, s], as for :func:`sequence_logprobs`.
        roles: [n] int per sample. Pairs: ``CHOSEN`` at even and ``REJECTED`` at odd positions.
            ``kto``: ``CHOSEN`` (desirable), ``REJECTED`` (undesirable) or ``KL_SAMPLE`` (a
            mismatched prompt/response for KTO's reference point).
        ref_logprobs: [n] reference ``log pi_ref(y|x)`` per sample (``dpo``, ``kto``).
        unit_losses: e.g. :func:`dpo_unit_losses`.
    Returns:
        ``(loss_sum, count, metrics)`` like :func:`token_loss`; count is pairs or samples.
    """
    roles = roles.long()
    logp, count = sequence_logprobs(per_token_ce, loss_mask, segment_ids, roles.numel())
    view = SequenceView(logp, count, roles, ref_logprobs)
    return unit_losses(view, settings, data_parallel_group)


def preference_objective_loss(unit_losses):
    """The objective contract's ``loss(per_token_ce, batch, settings, group)``."""

    def loss(
        per_token_ce, batch, settings: LossSettings = LossSettings(), data_parallel_group=None
    ):
        return preference_loss(
            per_token_ce,
            batch["loss_mask"],
            batch["segment_ids"],
            batch["roles"],
            batch.get("ref_logprobs"),
            unit_losses,
            settings,
            data_parallel_group,
        )

    loss.__doc__ = f"Preference objective loss with :func:`{unit_losses.__name__}`."
    return loss


dpo_loss = preference_objective_loss(dpo_unit_losses)
simpo_loss = preference_objective_loss(simpo_unit_losses)
kto_loss = preference_objective_loss(kto_unit_losses)


def _pair(value_sum, count):
    return torch.stack(
        [torch.as_tensor(value_sum).float(), torch.as_tensor(count).float()]
    ).detach()


def make_loss_func(
    loss, batch: dict, settings: LossSettings = LossSettings(), data_parallel_group=None
):
    """A ``loss_func(output_tensor)`` in the convention of Megatron-LM's ``pretrain_gpt.py``.

    ``loss`` is an objective's loss (:meth:`megatron_rift.objectives.Objective.load_loss`) and
    ``output_tensor`` the [b, s] per-token CE that GPTModel returns on the last pipeline stage.
    Returns ``(loss_sum, count, report)`` where ``report`` maps names to ``[sum, count]`` tensors;
    ``"loss"`` is ``[loss_sum, count]``. Use it with ``TransformerConfig(calculate_per_token_loss=
    True)`` so the schedule and DDP divide by the count summed over micro-batches and
    data-parallel ranks. A micro-batch with nothing counted contributes 0 (never NaN).
    """

    def loss_func(output_tensor: torch.Tensor):
        loss_sum, count, metrics = loss(output_tensor, batch, settings, data_parallel_group)
        report = {"loss": torch.stack([loss_sum.detach().float(), count.float()])}
        report.update(metrics)
        return loss_sum, count, report

    return loss_func
