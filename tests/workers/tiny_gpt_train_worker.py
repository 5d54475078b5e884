"""Worker: train a tiny Megatron GPTModel on one fixed batch of rollouts with an objective and
report the per-step token-mean loss. Plain torch Adam on each rank's local parameters: under TP
without sequence parallelism the replicated parameters get identical gradients on every rank."""

import argparse
import math

import torch
from megatron.core import parallel_state

from megatron_rift.model import GPTArchitecture, build_gpt_model, to_transformer_config
from megatron_rift.parallel import destroy_distributed, init_distributed
from tests.objective_losses import compute_loss
from tests.torchrun_utils import world_size_from_env_or_1, write_rank_result


def fixed_batch(vocab: int, b: int = 4, s: int = 16, prompt_len: int = 6):
    g = torch.Generator().manual_seed(123)
    tokens = torch.randint(0, vocab, (b, s + 1), generator=g)
    loss_mask = torch.zeros(b, s)
    loss_mask[:, prompt_len - 1 :] = 1.0  # labels from the first response token on
    rewards = torch.tensor([1.0, -1.0, -1.0, -1.0])[:b]
    return tokens[:, :-1], tokens[:, 1:], loss_mask, rewards


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--objective", default="rift")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    tp = world_size_from_env_or_1()
    init_distributed(tensor_model_parallel_size=tp, seed=7)
    arch = GPTArchitecture(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=256,
        make_vocab_size_divisible_by=128,
    )
    model = build_gpt_model(arch, to_transformer_config(arch, tensor_model_parallel_size=tp))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    tokens, labels, loss_mask, rewards = fixed_batch(arch.vocab_size)
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    losses = []
    for _ in range(args.steps):
        ce = model(tokens, position_ids, None, labels=labels)
        loss_sum, num_tokens, _ = compute_loss(ce, loss_mask, rewards, args.objective)
        loss = loss_sum / num_tokens
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    write_rank_result(
        {"losses": losses, "tp_rank": parallel_state.get_tensor_model_parallel_rank()}
    )
    destroy_distributed()


if __name__ == "__main__":
    main()
