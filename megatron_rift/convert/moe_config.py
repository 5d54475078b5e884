"""The mixture-of-experts fields of a Hugging Face ``config.json`` <-> :class:`GPTArchitecture`.

Read: the number of experts, top-k, one expert's MLP size, top-k renormalization and the router's
aux-loss coefficient, refusing layouts Megatron's uniform MoE stack would compute differently
(dense layers between MoE layers, shared experts, a family's router features Megatron lacks).
Written back: the same fields, under the family's own names.
"""

from __future__ import annotations

from megatron_rift.convert.errors import ConversionError
from megatron_rift.convert.tables import ArchitectureTable

_EVERY_LAYER = "every layer must be an MoE layer (the converted layout is a uniform MoE stack)"
# config.json fields whose other values change the model: (the values accepted, why).
_MUST_BE = {
    "decoder_sparse_step": ((1,), _EVERY_LAYER),
    "mlp_only_layers": (([],), _EVERY_LAYER + "; dense MLP layers in between are not converted"),
    "shared_expert_intermediate_size": ((0,), "shared experts are not converted"),
    "n_shared_experts": ((0,), "shared experts are not converted"),
}


def moe_fields_from_hf(cfg: dict, table: ArchitectureTable, source: str) -> dict:
    """GPTArchitecture keyword arguments for an MoE family (empty for a dense one)."""
    names = table.moe
    if names is None:
        return {}
    for name, (accepted, why) in _MUST_BE.items():
        value = cfg.get(name)
        if value is not None and value not in accepted:
            raise ConversionError(f"{source}: field {name!r} = {value!r} is not supported: {why}")
    experts = next((cfg[n] for n in names.num_experts if cfg.get(n) is not None), None)
    if experts is None:
        raise ConversionError(
            f"{source}: field {names.num_experts[0]!r} is missing (the number of experts)"
        )
    for name in ("num_experts_per_tok", names.expert_ffn):
        if cfg.get(name) is None:
            raise ConversionError(f"{source}: field {name!r} is missing")
    # HF renormalizes the top-k probabilities (norm_topk_prob, always in Mixtral): that is Megatron's
    # softmax over the top-k logits; without it, Megatron's softmax-then-top-k (pre-softmax).
    normalize = True if names.norm_topk_prob is None else bool(cfg.get(names.norm_topk_prob))
    return dict(
        num_moe_experts=int(experts),
        moe_router_topk=int(cfg["num_experts_per_tok"]),
        moe_ffn_hidden_size=int(cfg[names.expert_ffn]),
        moe_router_pre_softmax=not normalize,
        moe_aux_loss_coeff=float(cfg.get("router_aux_loss_coef") or 0.0),
    )


def moe_fields_to_hf(arch, table: ArchitectureTable) -> dict:
    """config.json fields of ``arch``'s expert layout, in ``table``'s family naming."""
    names = table.moe
    if names is None:
        return {}
    fields = {
        names.num_experts[0]: arch.num_moe_experts,
        "num_experts_per_tok": arch.moe_router_topk,
        names.expert_ffn: arch.moe_ffn_hidden_size,
        "router_aux_loss_coef": arch.moe_aux_loss_coeff,
    }
    if names.norm_topk_prob is not None:
        fields.update({names.norm_topk_prob: not arch.moe_router_pre_softmax})
    if table.model_type == "qwen3_moe":
        fields.update(decoder_sparse_step=1, mlp_only_layers=[])
    return fields


def other_spellings(table: ArchitectureTable) -> tuple[str, ...]:
    """Field names the written config must not keep (another spelling of the expert count)."""
    return () if table.moe is None else table.moe.num_experts[1:]
