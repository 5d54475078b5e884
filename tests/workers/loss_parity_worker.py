"""Worker: every token objective's loss (by name, through the objectives registry) and logit
gradient through Megatron's vocab_parallel_cross_entropy (vocab split across TP ranks) against the
full-vocabulary plain-PyTorch reference."""

import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_rift.parallel import destroy_distributed, init_distributed
from tests.loss_reference import reference_loss
from tests.objective_losses import (
    TOKEN_OBJECTIVES as OBJECTIVES,
    compute_loss,
    first_response_tokens,
)
from tests.torchrun_utils import world_size_from_env_or_1, write_rank_result

CASES = [(o, "token") for o in OBJECTIVES] + [
    ("rift", "sequence"),
    ("rift", "geometric"),
    ("rift", "divergent"),
]


def main():
    tp = world_size_from_env_or_1()
    init_distributed(tensor_model_parallel_size=tp)
    rank = parallel_state.get_tensor_model_parallel_rank()
    b, s, v = 4, 6, 64
    g = torch.Generator().manual_seed(0)
    logits_full = torch.randn(b, s, v, generator=g) * 3
    labels = torch.randint(0, v, (b, s), generator=g)
    loss_mask = (torch.rand(b, s, generator=g) > 0.3).float()
    rewards = torch.tensor([1.0, -0.2, 0.0, -3.0])
    shared = [0, 2, 1, 3]  # divergent mode: each row's shared response tokens (negatives: 1, 3)
    shared_mask = first_response_tokens(loss_mask, shared)
    results = {}
    for objective, mode in CASES:
        ref_logits = logits_full.double().clone().requires_grad_(True)
        ref, _ = reference_loss(ref_logits, labels, loss_mask, rewards, objective, mode, shared)
        ref.backward()
        shard = v // tp
        local = logits_full[..., rank * shard : (rank + 1) * shard].clone().requires_grad_(True)
        # Megatron's layout is [s, b, v/tp]; CE is per token so the transpose is only for fidelity.
        ce = tensor_parallel.vocab_parallel_cross_entropy(
            local.transpose(0, 1).contiguous(), labels.transpose(0, 1).contiguous()
        )
        loss_sum, num_tokens, _ = compute_loss(
            ce.transpose(0, 1), loss_mask, rewards, objective, mode, shared_prefix=shared_mask
        )
        loss = loss_sum / num_tokens.clamp(min=1)
        loss.backward()
        ref_grad = ref_logits.grad[..., rank * shard : (rank + 1) * shard].float()
        results[f"{objective}/{mode}"] = {
            "loss": loss.item(),
            "ref": ref.item(),
            "grad_max_abs_diff": (local.grad - ref_grad).abs().max().item(),
            "grad_max_abs": ref_grad.abs().max().item(),
        }
    write_rank_result(results)
    destroy_distributed()


if __name__ == "__main__":
    main()
