"""Worker: dpo / simpo / kto loss and logit gradient through Megatron's vocab_parallel_cross_entropy
(vocab split across TP ranks) and each objective's registered loss (by name, through the objectives
registry), against the independent full-vocabulary plain-PyTorch reference
(tests/preference_reference.py), one-sample-per-row and packed rows."""

import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_rift.losses import LossSettings
from megatron_rift.parallel import destroy_distributed, init_distributed
from tests.objective_losses import compute_preference_loss
from tests.preference_reference import (
    reference_preference_loss,
    sample_logprobs,
    samples_from_segments,
)
from tests.torchrun_utils import world_size_from_env_or_1, write_rank_result

V = 64

# One sample per row: row i is sample i (trailing -1 is padding).
ROWS_SEG = [[0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, -1], [2, 2, 2, 2, 2, 2], [3, 3, 3, 3, -1, -1]]
ROWS_MASK = [[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 0, 0]]
# Packed: several samples share a row; response lengths 2, 2, 1, 2.
PACKED_SEG = [[0, 0, 0, 1, 1, 1, -1], [2, 2, 3, 3, 3, -1, -1]]
PACKED_MASK = [[0, 1, 1, 0, 1, 1, 0], [0, 1, 0, 1, 1, 0, 0]]
KTO_ROWS_SEG = [[i] * 5 for i in range(6)]
KTO_ROWS_MASK = [
    [0, 1, 1, 1, 1],
    [0, 0, 1, 1, 1],
    [0, 1, 1, 0, 0],
    [0, 0, 0, 1, 1],
    [0, 1, 1, 1, 1],
    [0, 0, 1, 1, 0],
]
KTO_PACKED_SEG = [[0, 0, 1, 1, 1, 2, 2, -1], [3, 3, 3, 4, 4, 5, 5, 5]]
KTO_PACKED_MASK = [[0, 1, 0, 1, 1, 0, 1, 0], [0, 1, 1, 0, 1, 0, 1, 1]]

# ref_logprobs = (true policy log-prob) + offset, so the ratio lp - ref of sample i is -offset[i].
CASES = {
    "dpo/rows": dict(
        objective="dpo",
        seg=ROWS_SEG,
        mask=ROWS_MASK,
        roles=[1, -1, 1, -1],
        offsets=[0.7, -1.2, -0.4, 0.9],
        settings={},
    ),
    "dpo/packed": dict(
        objective="dpo",
        seg=PACKED_SEG,
        mask=PACKED_MASK,
        roles=[1, -1, 1, -1],
        offsets=[-2.0, 1.0, 0.5, -0.3],
        settings=dict(beta=0.5),
    ),
    "simpo/rows": dict(
        objective="simpo",
        seg=ROWS_SEG,
        mask=ROWS_MASK,
        roles=[1, -1, 1, -1],
        offsets=None,
        settings=dict(beta=2.0),
    ),
    "simpo/packed": dict(
        objective="simpo",
        seg=PACKED_SEG,
        mask=PACKED_MASK,
        roles=[1, -1, 1, -1],
        offsets=None,
        settings=dict(beta=1.5, simpo_gamma=0.3),
    ),
    # KL ratios 1.5 and 0.5: z = 1.0.
    "kto/rows": dict(
        objective="kto",
        seg=KTO_ROWS_SEG,
        mask=KTO_ROWS_MASK,
        roles=[1, -1, 0, 1, 0, -1],
        offsets=[-1.0, 0.8, -1.5, 0.6, -0.5, -0.9],
        settings={},
    ),
    # KL ratios -2 and -1: mean -1.5, clamped to z = 0.
    "kto/packed_z0": dict(
        objective="kto",
        seg=KTO_PACKED_SEG,
        mask=KTO_PACKED_MASK,
        roles=[1, -1, 0, -1, 0, 1],
        offsets=[0.4, -1.1, 2.0, 0.3, 1.0, -0.7],
        settings=dict(beta=0.3, desirable_weight=1.33, undesirable_weight=0.7),
    ),
    # KL ratios 3 and 0.5: z = 1.75.
    "kto/packed": dict(
        objective="kto",
        seg=KTO_PACKED_SEG,
        mask=KTO_PACKED_MASK,
        roles=[-1, 1, 0, 1, 0, -1],
        offsets=[0.4, -1.1, -3.0, 0.3, -0.5, -0.7],
        settings=dict(beta=0.5, desirable_weight=0.8, undesirable_weight=1.6),
    ),
}


def run_case(seed, case, tp, rank):
    segment_ids = torch.tensor(case["seg"])
    loss_mask = torch.tensor(case["mask"], dtype=torch.float)
    b, s = segment_ids.shape
    g = torch.Generator().manual_seed(seed)
    logits_full = torch.randn(b, s, V, generator=g) * 3
    labels = torch.randint(0, V, (b, s), generator=g)
    roles = case["roles"]
    samples = samples_from_segments(case["seg"], case["mask"], len(roles))

    ref_logprobs = None
    if case["offsets"] is not None:
        with torch.no_grad():
            true_lp = sample_logprobs(logits_full.double(), labels, samples)
        ref_logprobs = torch.tensor(
            [lp.item() + o for lp, o in zip(true_lp, case["offsets"])], dtype=torch.float64
        )

    settings = LossSettings(**case["settings"])
    ref_logits = logits_full.double().clone().requires_grad_(True)
    ref, info = reference_preference_loss(
        ref_logits,
        labels,
        samples,
        roles,
        ref_logprobs,
        case["objective"],
        beta=settings.beta,
        gamma=settings.simpo_gamma,
        desirable_weight=settings.desirable_weight,
        undesirable_weight=settings.undesirable_weight,
    )
    ref.backward()

    shard = V // tp
    local = logits_full[..., rank * shard : (rank + 1) * shard].clone().requires_grad_(True)
    # Megatron's layout is [s, b, v/tp].
    ce = tensor_parallel.vocab_parallel_cross_entropy(
        local.transpose(0, 1).contiguous(), labels.transpose(0, 1).contiguous()
    )
    loss_sum, units, metrics = compute_preference_loss(
        ce.transpose(0, 1),
        loss_mask,
        segment_ids,
        torch.tensor(roles),
        ref_logprobs,
        case["objective"],
        settings,
    )
    loss = loss_sum / units.clamp(min=1)
    loss.backward()
    ref_grad = ref_logits.grad[..., rank * shard : (rank + 1) * shard].float()
    result = {
        "loss": loss.item(),
        "ref": ref.item(),
        "units": int(units),
        "ref_units": info["units"],
        "grad_max_abs_diff": (local.grad - ref_grad).abs().max().item(),
        "grad_max_abs": ref_grad.abs().max().item(),
        "local_grad_max_abs": local.grad.abs().max().item(),
    }
    if case["objective"] == "kto":
        result["z"] = metrics["kl_estimate"][0].item()
        result["ref_z"] = info["z"]
    return result


def main():
    tp = world_size_from_env_or_1()
    init_distributed(tensor_model_parallel_size=tp)
    rank = parallel_state.get_tensor_model_parallel_rank()
    results = {
        name: run_case(seed, case, tp, rank) for seed, (name, case) in enumerate(CASES.items())
    }
    write_rank_result(results)
    destroy_distributed()


if __name__ == "__main__":
    main()
