"""The RIFT loss family on Megatron-Core's per-token cross-entropy.

Every objective here is a function of the per-token cross-entropy ``ce_t = -log p_t`` that
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

Preference baselines (:data:`PREFERENCE_OBJECTIVES`, :func:`compute_preference_loss`) work on
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

import torch
import torch.distributed as dist
import torch.nn.functional as F

TOKEN_OBJECTIVES = ("sft", "dft", "rft", "rift", "naive")
PREFERENCE_OBJECTIVES = ("dpo", "kto", "simpo")
OBJECTIVES = TOKEN_OBJECTIVES + PREFERENCE_OBJECTIVES
PAIRED_OBJECTIVES = ("dpo", "simpo")  # trained on (chosen, rejected) pairs
REFERENCE_OBJECTIVES = ("dpo", "kto")  # need the reference model's log-probs
NEGATIVE_MODES = ("token", "sequence", "geometric")

# Paper section 4.1: 1e-5 for SFT and RFT, a more conservative 2e-6 for RIFT and DPO.
# KTO and SimPO: the paper's tables 9-10 use MS-Swift defaults; we give them DPO's rate.
DEFAULT_LR = {"sft": 1e-5, "dft": 1e-5, "rft": 1e-5, "rift": 2e-6, "naive": 2e-6, "dpo": 2e-6,
              "kto": 2e-6, "simpo": 2e-6}

# Sample roles inside a preference micro-batch (``roles`` of compute_preference_loss).
CHOSEN, REJECTED, KL_SAMPLE = 1, -1, 0  # kto: desirable = CHOSEN, undesirable = REJECTED


@dataclasses.dataclass(frozen=True)
class PreferenceSettings:
    """Hyper-parameters of the preference objectives (trainer flags in brackets)."""

    beta: float = 0.1  # [--beta] DPO/KTO 0.1 (their papers' defaults); SimPO wants ~2
    simpo_gamma: float = 1.0  # [--simpo-gamma] target reward margin (SimPO: gamma/beta ~ 0.5)
    desirable_weight: float = 1.0  # [--kto-desirable-weight] KTO's lambda_D
    undesirable_weight: float = 1.0  # [--kto-undesirable-weight] KTO's lambda_U


DEFAULT_BETA = {"dpo": 0.1, "kto": 0.1, "simpo": 2.0}


def compute_loss(per_token_ce: torch.Tensor, loss_mask: torch.Tensor, rewards: torch.Tensor,
                 objective: str, negative_mode: str = "token",
                 segment_ids: torch.Tensor | None = None):
    """Loss sum, counted tokens and metrics of one micro-batch.

    Args:
        per_token_ce: [b, s] float, Megatron's per-token cross-entropy.
        loss_mask: [b, s], 1 on response tokens.
        rewards: [b] per-sample rewards, or [b, s] per-token rewards (packed rows, where each token
            carries the reward of the sample it belongs to).
        objective: one of :data:`OBJECTIVES`.
        negative_mode: one of :data:`NEGATIVE_MODES` (used by ``rift`` only).
        segment_ids: [b, s] sample index within each packed row; only the sequence negative modes
            need it, and only for packed rows (otherwise a row is one sample).

    Returns:
        ``(loss_sum, num_tokens, metrics)``: 0-dim float tensor with grad, 0-dim int tensor, and a
        dict of detached ``tensor([sum, count])`` pairs whose ratio is the metric (so they add up
        across micro-batches and ranks).
    """
    if objective not in TOKEN_OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of "
                         f"{', '.join(TOKEN_OBJECTIVES)} (preference objectives: "
                         "compute_preference_loss)")
    if negative_mode not in NEGATIVE_MODES:
        raise ValueError(f"unknown negative_mode {negative_mode!r}; choose one of "
                         f"{', '.join(NEGATIVE_MODES)}")
    ce = per_token_ce.float()
    mask = loss_mask.to(ce.dtype) > 0
    r = rewards.to(ce.dtype)
    r = r.unsqueeze(-1).expand_as(ce) if r.dim() == 1 else r
    positive, negative = mask & (r > 0), mask & (r < 0)
    p = torch.exp(-ce)  # ce >= 0, so p in (0, 1]: no overflow for any logit

    counted = mask
    if objective == "sft":
        terms = ce
    elif objective == "dft":
        terms = p.detach() * ce
    elif objective == "rft":
        terms, counted = ce, positive
    elif objective == "naive":
        terms = r * ce
    else:  # rift
        if negative_mode == "token":
            negative_terms = -r * p
        else:
            negative_terms = -r * _sequence_probability(ce, negative, negative_mode, segment_ids)
        terms = torch.where(positive, r * ce, torch.where(negative, negative_terms, torch.zeros_like(ce)))

    # torch.where, not a product: a masked-out position must not leak NaN/inf into the sum.
    loss_sum = torch.where(counted, terms, torch.zeros_like(terms)).sum()
    num_tokens = counted.sum().to(torch.int)
    metrics = _metrics(ce.detach(), p.detach(), mask, positive, negative)
    return loss_sum, num_tokens, metrics


def _sequence_probability(ce, negative, mode, segment_ids):
    """Per-token broadcast of each negative sample's pi(y|x) (``sequence``) or its geometric mean
    token probability (``geometric``); sample = (row, segment)."""
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
        0, sample.reshape(-1), -neg_ce.reshape(-1))
    if mode == "geometric":
        count = torch.zeros(num_samples, dtype=ce.dtype, device=ce.device).index_add(
            0, sample.reshape(-1), negative.reshape(-1).to(ce.dtype))
        log_prob = log_prob / count.clamp(min=1)
    return torch.exp(log_prob)[sample]


def _metrics(ce, p, mask, positive, negative):
    def pair(value_sum, count):
        return torch.stack([value_sum.float(), count.float()]).detach()

    n = mask.sum()
    return {
        "ce": pair(torch.where(mask, ce, 0).sum(), n),
        "positive_token_fraction": pair(positive.sum(), n),
        "negative_token_fraction": pair(negative.sum(), n),
        "p_positive": pair(torch.where(positive, p, 0).sum(), positive.sum()),
        "p_negative": pair(torch.where(negative, p, 0).sum(), negative.sum()),
    }


def sequence_logprobs(per_token_ce: torch.Tensor, loss_mask: torch.Tensor,
                      segment_ids: torch.Tensor, num_samples: int):
    """Per-sample response log-probability ``sum_t -ce_t`` and response token count.

    ``segment_ids`` [b, s] names the sample (0..num_samples-1) each position belongs to (-1 on
    padding), as :func:`megatron_rift.data.batching.collate_rollouts` builds it, packed or not.
    Returns float [n] (with grad) and float [n].
    """
    ce = per_token_ce.float()
    counted = (loss_mask > 0) & (segment_ids >= 0)
    slot = torch.where(counted, segment_ids.long(), torch.full_like(segment_ids.long(), num_samples))
    zeros = torch.zeros(num_samples + 1, dtype=ce.dtype, device=ce.device)
    logp = zeros.index_add(0, slot.reshape(-1), torch.where(counted, -ce, 0.0).reshape(-1))
    count = zeros.index_add(0, slot.reshape(-1), counted.reshape(-1).to(ce.dtype))
    return logp[:num_samples], count[:num_samples]


def compute_preference_loss(per_token_ce: torch.Tensor, loss_mask: torch.Tensor,
                            segment_ids: torch.Tensor, roles: torch.Tensor,
                            ref_logprobs: torch.Tensor | None, objective: str,
                            settings: PreferenceSettings = PreferenceSettings(), kl_group=None):
    """Loss sum, unit count and metrics of one preference micro-batch (see the module table).

    Args:
        per_token_ce, loss_mask, segment_ids: [b, s], as for :func:`sequence_logprobs`.
        roles: [n] int per sample. ``dpo``/``simpo``: pairs in order, ``CHOSEN`` at even and
            ``REJECTED`` at odd positions. ``kto``: ``CHOSEN`` (desirable), ``REJECTED``
            (undesirable) or ``KL_SAMPLE`` (a mismatched prompt/response for KTO's reference point).
        ref_logprobs: [n] reference ``log pi_ref(y|x)`` per sample (``dpo``, ``kto``).
        kl_group: ``kto``: the process group whose ranks' mismatched samples estimate ``z``
            together (the trainer passes the data-parallel group; its ranks run the same number
            of micro-batches, so the all-reduce is in step). None: this micro-batch's own.
    Returns:
        ``(loss_sum, count, metrics)`` like :func:`compute_loss`; count is pairs or samples.
    """
    if objective not in PREFERENCE_OBJECTIVES:
        raise ValueError(f"unknown preference objective {objective!r}; choose one of "
                         f"{', '.join(PREFERENCE_OBJECTIVES)}")
    roles = roles.long()
    n = roles.numel()
    logp, count = sequence_logprobs(per_token_ce, loss_mask, segment_ids, n)
    if objective in REFERENCE_OBJECTIVES:
        if ref_logprobs is None:
            raise ValueError(f"{objective} needs the reference model's log-probs")
        ratio = logp - ref_logprobs.to(logp.dtype)  # log pi / pi_ref per sample
    beta = settings.beta

    if objective in PAIRED_OBJECTIVES:
        if n % 2 or not (bool((roles[0::2] == CHOSEN).all()) and bool((roles[1::2] == REJECTED).all())):
            raise ValueError(f"{objective}: a micro-batch must hold whole (chosen, rejected) pairs "
                             f"in order; got roles {roles.tolist()}")
        if objective == "dpo":
            margin = beta * (ratio[0::2] - ratio[1::2])
            chosen_reward, rejected_reward = beta * ratio[0::2], beta * ratio[1::2]
        else:  # simpo: length-normalized, reference-free
            average = logp / count.clamp(min=1)
            chosen_reward, rejected_reward = beta * average[0::2], beta * average[1::2]
            margin = chosen_reward - rejected_reward - settings.simpo_gamma
        losses = -F.logsigmoid(margin)
        units = losses.numel()
        metrics = {
            "reward_accuracy": _pair((margin.detach() > 0).sum(), units),
            "reward_margin": _pair((chosen_reward - rejected_reward).detach().sum(), units),
            "chosen_reward": _pair(chosen_reward.detach().sum(), units),
            "rejected_reward": _pair(rejected_reward.detach().sum(), units),
        }
        return losses.sum(), torch.tensor(units, dtype=torch.int), metrics

    # kto
    desirable, undesirable, kl = roles == CHOSEN, roles == REJECTED, roles == KL_SAMPLE
    kl_stats = torch.stack([torch.where(kl, ratio, 0.0).sum(), kl.sum().to(ratio.dtype)]).detach()
    if kl_group is not None and dist.get_world_size(kl_group) > 1:
        dist.all_reduce(kl_stats, group=kl_group)
    num_kl = kl_stats[1]
    z = (kl_stats[0] / num_kl.clamp(min=1)).clamp(min=0)  # no host sync on the hot path
    losses = torch.where(
        desirable, settings.desirable_weight * (1 - torch.sigmoid(beta * (ratio - z))),
        torch.where(undesirable, settings.undesirable_weight * (1 - torch.sigmoid(beta * (z - ratio))),
                    torch.zeros_like(ratio)))
    units = int((desirable | undesirable).sum())
    metrics = {
        "kl_estimate": _pair(z, num_kl > 0),
        "desirable_reward": _pair(torch.where(desirable, beta * ratio, 0.0).detach().sum(),
                                  desirable.sum()),
        "undesirable_reward": _pair(torch.where(undesirable, beta * ratio, 0.0).detach().sum(),
                                    undesirable.sum()),
    }
    return losses.sum(), torch.tensor(units, dtype=torch.int), metrics


def _pair(value_sum, count):
    return torch.stack([torch.as_tensor(value_sum).float(), torch.as_tensor(count).float()]).detach()


def make_preference_loss_func(loss_mask: torch.Tensor, segment_ids: torch.Tensor,
                              roles: torch.Tensor, ref_logprobs: torch.Tensor | None,
                              objective: str, settings: PreferenceSettings, kl_group=None):
    """:func:`make_loss_func`'s counterpart for the preference objectives (same contract; the
    count is pairs or samples instead of tokens)."""

    def loss_func(output_tensor: torch.Tensor):
        loss_sum, units, metrics = compute_preference_loss(
            output_tensor, loss_mask, segment_ids, roles, ref_logprobs, objective, settings,
            kl_group)
        report = {"loss": torch.stack([loss_sum.detach().float(), units.float()])}
        report.update(metrics)
        return loss_sum, units, report

    return loss_func


def make_loss_func(loss_mask: torch.Tensor, rewards: torch.Tensor, objective: str,
                   negative_mode: str = "token", segment_ids: torch.Tensor | None = None):
    """A ``loss_func(output_tensor)`` in the convention of Megatron-LM's ``pretrain_gpt.py``.

    ``output_tensor`` is the [b, s] per-token CE that GPTModel returns on the last pipeline stage.
    Returns ``(loss_sum, num_tokens, report)`` where ``report`` maps names to ``[sum, count]``
    tensors; ``"loss"`` is ``[loss_sum, num_tokens]``. Use it with
    ``TransformerConfig(calculate_per_token_loss=True)`` so the schedule and DDP divide by the token
    count summed over micro-batches and data-parallel ranks. A micro-batch with no counted tokens
    contributes 0 (never NaN).
    """

    def loss_func(output_tensor: torch.Tensor):
        loss_sum, num_tokens, metrics = compute_loss(output_tensor, loss_mask, rewards, objective,
                                                     negative_mode, segment_ids)
        report = {"loss": torch.stack([loss_sum.detach().float(), num_tokens.float()])}
        report.update(metrics)
        return loss_sum, num_tokens, report

    return loss_func
