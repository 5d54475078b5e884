"""Worker (2 ranks, TP=1, so DP=2): KTO's reference point z is estimated from the KL samples of
every data-parallel rank, as TRL gathers it across processes. Each rank holds half of one batch;
its loss must equal the plain-PyTorch reference on its own samples with z taken over all of them."""

import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_rift.losses import KL_SAMPLE, LossSettings
from megatron_rift.parallel import destroy_distributed, init_distributed
from tests.objective_losses import compute_preference_loss
from tests.preference_reference import (
    reference_preference_loss,
    sample_logprobs,
    samples_from_segments,
)
from tests.torchrun_utils import write_rank_result

V = 48
# The whole batch: one sample per row; rank r holds rows 3r..3r+2. Each rank has one KL sample,
# with ratios lp - ref = 2.5 (rank 0) and 0.5 (rank 1): z = 1.5 over both, 2.5 / 0.5 alone.
SEG = [[i] * 5 for i in range(6)]
MASK = [
    [0, 1, 1, 1, 1],
    [0, 0, 1, 1, 1],
    [0, 1, 1, 0, 0],
    [0, 0, 0, 1, 1],
    [0, 1, 1, 1, 1],
    [0, 0, 1, 1, 0],
]
ROLES = [1, -1, KL_SAMPLE, -1, KL_SAMPLE, 1]
OFFSETS = [0.3, -0.8, -2.5, 1.1, -0.5, 0.6]  # ref = true lp + offset, so the ratio is -offset


def main():
    init_distributed(tensor_model_parallel_size=1)
    group = parallel_state.get_data_parallel_group()
    rank = parallel_state.get_data_parallel_rank()
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(6, 5, V, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (6, 5), generator=g)
    samples = samples_from_segments(SEG, MASK, 6)
    with torch.no_grad():
        ref_lp = torch.tensor(
            [lp.item() + o for lp, o in zip(sample_logprobs(logits, labels, samples), OFFSETS)]
        )
    settings = LossSettings(beta=0.4, desirable_weight=1.2, undesirable_weight=0.9)
    _, whole = reference_preference_loss(
        logits,
        labels,
        samples,
        ROLES,
        ref_lp,
        "kto",
        beta=0.4,
        desirable_weight=1.2,
        undesirable_weight=0.9,
    )

    rows = slice(3 * rank, 3 * rank + 3)
    local_seg = [[s - 3 * rank for s in row] for row in SEG[rows]]
    local_samples = samples_from_segments(local_seg, MASK[rows], 3)
    local_logits = logits[rows].clone().requires_grad_(True)
    ref, _ = reference_preference_loss(
        local_logits,
        labels[rows],
        local_samples,
        ROLES[rows],
        ref_lp[rows],
        "kto",
        beta=0.4,
        desirable_weight=1.2,
        undesirable_weight=0.9,
        z=whole["z"],
    )
    ref.backward()

    ours_logits = logits[rows].float().clone().requires_grad_(True)
    ce = tensor_parallel.vocab_parallel_cross_entropy(
        ours_logits.transpose(0, 1).contiguous(), labels[rows].transpose(0, 1).contiguous()
    )
    args = (
        ce.transpose(0, 1),
        torch.tensor(MASK[rows], dtype=torch.float),
        torch.tensor(local_seg),
        torch.tensor(ROLES[rows]),
        ref_lp[rows].float(),
        "kto",
        settings,
    )
    loss_sum, units, metrics = compute_preference_loss(*args, kl_group=group)
    (loss_sum / units).backward()
    _, _, alone = compute_preference_loss(*args)  # this rank's KL sample only
    write_rank_result(
        {
            "loss": (loss_sum / units).item(),
            "ref": ref.item(),
            "z": metrics["kl_estimate"][0].item(),
            "ref_z": whole["z"],
            "z_alone": alone["kl_estimate"][0].item(),
            "grad_max_abs_diff": (ours_logits.grad.double() - local_logits.grad).abs().max().item(),
            "grad_max_abs": local_logits.grad.abs().max().item(),
        }
    )
    destroy_distributed()


if __name__ == "__main__":
    main()
