"""Worker: the fused output layer + CE (megatron_rift/model/linear_cross_entropy.py) against
Megatron's unfused path (``ColumnParallelLinear`` + ``vocab_parallel_cross_entropy``), the vocabulary
split over this launch's ranks (TP = world size):

1. the function, for every objective of the registry (RIFT in each negative mode): per-token CE,
   loss, and the gradients of the hidden states and of the output weight, with chunk sizes that do
   and do not divide the 28 tokens; a micro-batch whose tokens are all masked; targets whose logit
   is -1e4; at TP=2 also sequence parallelism (hidden states split along the sequence);
2. GPTModel with tied and untied embeddings, in Megatron's DDP, as the trainer builds it: per-token
   CE and every parameter's ``main_grad`` under rift and dpo, logits without labels, state-dict keys.

Writes ``{case: {quantity: [max |fused - unfused|, max |unfused|]}}`` and a few flags per rank.
"""

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel.layers import ColumnParallelLinear

from megatron_rift.losses import LossSettings
from megatron_rift.model import GPTArchitecture, build_gpt_model, to_transformer_config
from megatron_rift.model.linear_cross_entropy import linear_cross_entropy
from megatron_rift.objectives import NEGATIVE_MODES, RIFT, Unit, get_objective, objectives
from megatron_rift.parallel import destroy_distributed, init_distributed, set_seed
from megatron_rift.roles import CHOSEN, KL_SAMPLE, REJECTED
from tests.torchrun_utils import world_size_from_env_or_1, write_rank_result

S, B, H, V = 7, 4, 16, 128  # 28 tokens; vocabulary 128 (64 per rank at TP=2)
CHUNKS = (5, 7, 28, 64)  # 5 does not divide 28; 64 exceeds it
SUPPRESSED = V - 1  # the token whose logit is -1e4 (on the last rank)
ROLES = {
    Unit.PAIR: [CHOSEN, REJECTED, CHOSEN, REJECTED],
    Unit.MISMATCHED: [CHOSEN, REJECTED, KL_SAMPLE, KL_SAMPLE],
}


def _device() -> torch.device:
    """This rank's GPU (after init_distributed chose it), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _variants():
    """(case name, objective, negative mode) for every registered objective."""
    for objective in objectives():
        modes = NEGATIVE_MODES if objective is RIFT else ("token",)
        for mode in modes:
            yield f"{objective.name}/{mode}", objective, mode


def _batch(objective, loss_mask: torch.Tensor) -> dict:
    """A micro-batch of B one-sample rows for ``objective`` (masks are [b, s])."""
    device = loss_mask.device
    if objective.unit is Unit.ROLLOUT:
        # The negative rows 1 and 3 share their first tokens with a positive (divergent mode).
        shared_prefix = torch.zeros_like(loss_mask, dtype=torch.bool)
        shared_prefix[1, :2] = shared_prefix[3, :5] = True
        return {
            "loss_mask": loss_mask,
            "rewards": torch.tensor([1.0, -0.2, 0.0, -3.0], device=device),
            "shared_prefix": shared_prefix & loss_mask.bool(),
        }
    b, s = loss_mask.shape
    batch = {
        "loss_mask": loss_mask,
        "segment_ids": torch.arange(b, device=device).unsqueeze(1).expand(b, s).contiguous(),
        "roles": torch.tensor(ROLES[objective.unit], device=device),
    }
    if objective.reference:
        batch["ref_logprobs"] = torch.tensor(
            [-30.0, -41.0, -25.0, -52.0], dtype=torch.float64, device=device
        )
    return batch


def _loss(objective, mode, batch):
    loss_fn = objective.load_loss()

    def loss(ce_bs):
        loss_sum, count, _ = loss_fn(ce_bs, batch, LossSettings(negative_mode=mode), None)
        return loss_sum / count.clamp(min=1)

    return loss


def _run(ce_fn, hidden, weight, loss):
    x, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ce = ce_fn(x, w)  # [s, b]
    value = loss(ce.transpose(0, 1))
    value.backward()
    return {"ce": ce.detach(), "loss": value.detach(), "grad_hidden": x.grad, "grad_weight": w.grad}


def _compare(fused: dict, unfused: dict) -> dict:
    out = {}
    for key, ref in unfused.items():
        got = fused[key]
        out[key] = [(got.double() - ref.double()).abs().max().item(), ref.abs().max().item()]
    out["finite"] = all(bool(torch.isfinite(t).all()) for t in fused.values())
    if "loss" in fused:
        out["fused_loss"] = fused["loss"].item()
    return out


def function_cases(tp: int, rank: int) -> dict:
    group = parallel_state.get_tensor_model_parallel_group()
    shard = V // tp
    g = torch.Generator().manual_seed(0)
    device = _device()
    hidden = torch.randn(S, B, H, generator=g).to(device)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(device)
    labels = torch.randint(0, V, (S, B), generator=g).to(device)
    mask = (torch.rand(B, S, generator=g) > 0.3).float().to(device)
    mask[:, 0] = 0
    # -1e4 at the target: a constant feature and one vocabulary row that reads only it.
    hidden_sup = hidden.clone()
    hidden_sup[..., 0] = 1.0
    weight_sup = weight.clone()
    weight_sup[SUPPRESSED] = 0.0
    weight_sup[SUPPRESSED, 0] = -1e4
    labels_sup = labels.clone()
    labels_sup[::2] = SUPPRESSED

    layer = ColumnParallelLinear(
        H,
        V,
        config=ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True),
        init_method=torch.nn.init.zeros_,
        bias=False,
        skip_weight_param_allocation=True,
    )

    def unfused(labels_sb):
        def ce(x, w):
            logits, _ = layer(x, weight=w)
            return tensor_parallel.vocab_parallel_cross_entropy(logits, labels_sb)

        return ce

    def fused(labels_sb, chunk, sequence_parallel=False):
        def ce(x, w):
            return linear_cross_entropy(x, w, labels_sb, chunk, group, sequence_parallel)

        return ce

    local = slice(rank * shard, (rank + 1) * shard)
    results = {}
    for name, objective, mode in _variants():
        loss = _loss(objective, mode, _batch(objective, mask))
        reference = _run(unfused(labels), hidden, weight[local], loss)
        for chunk in CHUNKS:
            got = _run(fused(labels, chunk), hidden, weight[local], loss)
            results[f"{name}/chunk{chunk}"] = _compare(got, reference)
        masked = _loss(objective, mode, _batch(objective, torch.zeros_like(mask)))
        results[f"{name}/all_masked"] = _compare(
            _run(fused(labels, 5), hidden, weight[local], masked),
            _run(unfused(labels), hidden, weight[local], masked),
        )
        results[f"{name}/logit_-1e4"] = _compare(
            _run(fused(labels_sup, 5), hidden_sup, weight_sup[local], loss),
            _run(unfused(labels_sup), hidden_sup, weight_sup[local], loss),
        )
    results["bf16/rift/token/main_grad"] = bf16_case(
        unfused(labels), fused(labels, 5), hidden, weight[local], mask
    )
    if tp > 1:  # sequence parallelism: each rank holds S' / TP positions of the hidden states
        seq = 8
        hidden_sp = torch.randn(seq, B, H, generator=g).to(device)
        labels_sp = torch.randint(0, V, (seq, B), generator=g).to(device)
        part = slice(rank * seq // tp, (rank + 1) * seq // tp)
        rift = _loss(
            RIFT,
            "token",
            {
                "loss_mask": torch.ones(B, seq, device=device),
                "rewards": torch.tensor([1.0, -0.2, 0.5, -1.0], device=device),
            },
        )
        got = _run(
            fused(labels_sp, 3, sequence_parallel=True), hidden_sp[part], weight[local], rift
        )
        reference = _run(unfused(labels_sp), hidden_sp, weight[local], rift)
        reference["grad_hidden"] = reference["grad_hidden"][part]
        results["rift/token/sequence_parallel"] = _compare(got, reference)
    return results


def bf16_case(unfused, fused, hidden, weight, mask) -> dict:
    """bf16 inputs (as under Float16Module); the fused weight gradient goes into an fp32
    ``main_grad`` as with Megatron's DDP (whose hook adds the unfused path's bf16 ``param.grad``)."""
    loss = _loss(RIFT, "token", _batch(RIFT, mask))
    reference = _run(unfused, hidden.bfloat16(), weight.bfloat16(), loss)
    x = hidden.bfloat16().requires_grad_(True)
    w = weight.bfloat16().requires_grad_(True)
    w.main_grad = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    w.grad_added_to_main_grad = False
    ce = fused(x, w)
    value = loss(ce.transpose(0, 1))
    value.backward()
    got = {
        "ce": ce.detach(),
        "loss": value.detach(),
        "grad_hidden": x.grad,
        "grad_weight": w.main_grad,
    }
    out = _compare(got, reference)
    out["weight_grad_returned"] = w.grad is not None  # into main_grad instead, flagged for DDP
    out["grad_added_to_main_grad"] = bool(w.grad_added_to_main_grad)
    return out


def model_cases(tp: int) -> dict:
    results = {}
    device = _device()
    tokens = torch.randint(0, 256, (4, 9), generator=torch.Generator().manual_seed(1)).to(device)
    labels = torch.roll(tokens, -1, dims=1)
    position_ids = torch.arange(9, device=device).unsqueeze(0).expand(4, 9)
    mask = torch.ones(4, 9, device=device)
    mask[:, :3] = 0
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False)
    for tied in (True, False):
        arch = GPTArchitecture(
            num_layers=1,
            hidden_size=32,
            num_attention_heads=4,
            ffn_hidden_size=64,
            vocab_size=256,
            max_position_embeddings=64,
            tie_word_embeddings=tied,
        )
        config = to_transformer_config(
            arch, tensor_model_parallel_size=tp, calculate_per_token_loss=True
        )
        set_seed(3)
        plain = build_gpt_model(arch, config, use_te=False)
        fused = build_gpt_model(arch, config, use_te=False, cross_entropy_chunk=5)
        fused.load_state_dict(plain.state_dict())
        name = "tied" if tied else "untied"
        results[f"model/{name}/state_dict_keys_equal"] = list(fused.state_dict()) == list(
            plain.state_dict()
        )
        with torch.no_grad():
            logits = [m(tokens, position_ids, None) for m in (plain, fused)]
        results[f"model/{name}/logits_max_abs_diff"] = (logits[0] - logits[1]).abs().max().item()
        models = [DistributedDataParallel(config, ddp_config, m) for m in (plain, fused)]
        for objective, mode in ((RIFT, "token"), (get_objective("dpo"), "token")):
            batch = _batch(objective, mask)
            loss = _loss(objective, mode, batch)
            out = []
            for model in models:
                model.zero_grad_buffer()
                ce = model(tokens, position_ids, None, labels=labels)
                loss(ce).backward()
                grads = {n: p.main_grad.clone() for n, p in model.module.named_parameters()}
                out.append({"ce": ce.detach(), **grads})
            results[f"model/{name}/{objective.name}"] = _compare(out[1], out[0])
    return results


def main(argv=None):
    tp = world_size_from_env_or_1()
    init_distributed(tensor_model_parallel_size=tp)
    rank = parallel_state.get_tensor_model_parallel_rank()
    results = function_cases(tp, rank)
    results.update(model_cases(tp))
    write_rank_result(results)
    destroy_distributed()


if __name__ == "__main__":
    main()
