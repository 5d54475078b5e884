"""An independent plain-PyTorch reference for every objective: log_softmax + gather over full logits,
one sample at a time, written from the formulas (not from megatron_rift.losses)."""

from __future__ import annotations

import torch


def reference_loss(
    logits, labels, loss_mask, rewards, objective, negative_mode="token", shared_prefix=None
):
    """Mean loss over counted tokens, computed sample by sample. logits [b, s, v] float64 is best.
    ``shared_prefix`` [b] ints (``divergent`` mode): how many of a row's first response tokens a
    negative shares with a positive of its group (no negative term there, still counted)."""
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [b, s]
    total = logits.new_zeros(())
    count = 0
    for i in range(logits.shape[0]):
        m = loss_mask[i] > 0
        lp = logp[i][m]
        r = float(rewards[i])
        n = int(m.sum())
        if objective == "sft":
            total = total - lp.sum()
            count += n
        elif objective == "dft":
            total = total - (lp.exp().detach() * lp).sum()
            count += n
        elif objective == "rft":
            if r > 0:
                total = total - lp.sum()
                count += n
        elif objective == "naive":
            total = total - r * lp.sum()
            count += n
        elif objective == "rift":
            count += n
            if r > 0:
                total = total - r * lp.sum()
            elif r < 0:
                if negative_mode == "token":
                    total = total - r * lp.exp().sum()
                elif negative_mode == "sequence":
                    total = total - r * n * lp.sum().exp()
                elif negative_mode == "geometric":
                    total = total - r * n * lp.mean().exp()
                elif negative_mode == "divergent":
                    total = total - r * lp[int(shared_prefix[i]) :].exp().sum()
                else:
                    raise ValueError(negative_mode)
        else:
            raise ValueError(objective)  # a new objective needs its reference here
    return total / max(count, 1), count
