"""An independent plain-PyTorch reference for the preference objectives (dpo, kto, simpo).

Written from the formulas in the ``megatron_rift.losses`` docstring, not from that module: full-
vocabulary ``log_softmax`` + ``gather``, one sample and one pair at a time, with python loops.
A sample is an explicit list of ``(row, position)`` response-token positions.
Roles: 1 = chosen / desirable, -1 = rejected / undesirable, 0 = KTO KL sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def samples_from_segments(segment_ids, loss_mask, num_samples):
    """List of samples, each the (row, position) list of its response tokens (loss_mask == 1,
    segment_ids >= 0), built by walking every position."""
    samples = [[] for _ in range(num_samples)]
    b, s = len(segment_ids), len(segment_ids[0])
    for row in range(b):
        for pos in range(s):
            seg = int(segment_ids[row][pos])
            if seg >= 0 and float(loss_mask[row][pos]) > 0:
                samples[seg].append((row, pos))
    return samples


def sample_logprobs(logits, labels, samples):
    """log pi(y|x) of each sample: sum over its positions of log_softmax(logits)[label].
    Returns a list of 0-dim tensors (with grad through ``logits``)."""
    out = []
    for positions in samples:
        total = logits.new_zeros(())
        for row, pos in positions:
            logp = F.log_softmax(logits[row, pos], dim=-1)
            total = total + logp[int(labels[row, pos])]
        out.append(total)
    return out


def reference_preference_loss(
    logits,
    labels,
    samples,
    roles,
    ref_logprobs,
    objective,
    beta=0.1,
    gamma=1.0,
    desirable_weight=1.0,
    undesirable_weight=1.0,
    z=None,
):
    """Mean loss over units (pairs for dpo/simpo, desirable+undesirable samples for kto).

    Returns ``(loss, info)`` with ``info = {"units": int, "z": float}`` (z only meaningful for kto).
    ``logits`` [b, s, v] float64 is best; ``ref_logprobs`` a list or tensor of per-sample floats.
    ``z``: KTO's reference point when it comes from elsewhere (a batch split across data-parallel
    ranks estimates it from every rank's KL samples); by default, from these samples' own.
    """
    given_z = z
    roles = [int(r) for r in roles]
    lps = sample_logprobs(logits, labels, samples)
    refs = None if ref_logprobs is None else [float(x) for x in ref_logprobs]
    total = logits.new_zeros(())
    units = 0
    z = 0.0

    if objective in ("dpo", "simpo"):
        for i in range(0, len(roles), 2):
            c, r = i, i + 1
            assert roles[c] == 1 and roles[r] == -1, roles
            if objective == "dpo":
                margin = beta * ((lps[c] - refs[c]) - (lps[r] - refs[r]))
            else:
                n_c, n_r = len(samples[c]), len(samples[r])
                margin = beta * (lps[c] / n_c - lps[r] / n_r) - gamma
            total = total - F.logsigmoid(margin)
            units += 1
    elif objective == "kto":
        kl_ratios = [(lps[i] - refs[i]).item() for i in range(len(roles)) if roles[i] == 0]
        if given_z is not None:
            z = given_z
        elif kl_ratios:
            z = max(sum(kl_ratios) / len(kl_ratios), 0.0)  # a python float: detached
        for i, role in enumerate(roles):
            ratio = lps[i] - refs[i]
            if role == 1:
                total = total + desirable_weight * (1 - torch.sigmoid(beta * (ratio - z)))
                units += 1
            elif role == -1:
                total = total + undesirable_weight * (1 - torch.sigmoid(beta * (z - ratio)))
                units += 1
    else:
        raise ValueError(objective)
    return total / max(units, 1), {"units": units, "z": z}
