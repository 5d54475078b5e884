"""A core attention built on ``torch.nn.functional.scaled_dot_product_attention``.

Megatron-Core 0.16's local ``DotProductAttention`` allocates its score buffer and causal mask on
CUDA, so it cannot run on a CPU machine. This module has the same constructor and forward
contract (``[s, b, heads, head_dim]`` in, ``[s, b, heads*head_dim]`` out, per tensor-parallel
partition) and is swapped in through the layer spec, the way Megatron intends parts to be swapped.
It is also correct for KV-cache decoding: the causal mask is aligned bottom-right.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from megatron_rift.model.context_parallel import causal_mask, gather_keys_values


class SDPACoreAttention(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        **_unused,
    ):
        super().__init__(config=config)
        from megatron.core import parallel_state

        tp = (
            pg_collection.tp.size()
            if pg_collection is not None and hasattr(pg_collection, "tp")
            else parallel_state.get_tensor_model_parallel_world_size()
        )
        self.attn_mask_type = attn_mask_type
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups or config.num_attention_heads, tp)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(self.head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.cp_group = None  # context parallelism: megatron_rift/model/context_parallel.py
        if config.context_parallel_size > 1:
            self.cp_group = (
                pg_collection.cp
                if pg_collection is not None and hasattr(pg_collection, "cp")
                else parallel_state.get_context_parallel_group()
            )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias=None,
        packed_seq_params=None,
        **_unused,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences (THD) need Transformer Engine attention")
        sq, b = query.shape[0], query.shape[1]
        if self.cp_group is not None:
            if attention_mask is not None:
                raise NotImplementedError(
                    "packed rows (an explicit mask) under context parallelism"
                )
            key, value = gather_keys_values(key, value, self.cp_group)
        sk = key.shape[0]
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if self.heads != self.groups:
            rep = self.heads // self.groups
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        mask = None
        if attention_mask is not None:
            # Megatron's convention: True marks positions to mask out.
            mask = ~attention_mask.bool()
        elif self.cp_group is not None:
            mask = causal_mask(sq, self.cp_group, q.device)
        elif mask_type == AttnMaskType.causal:
            # Bottom-right aligned, so a short query attends to the whole cached prefix.
            mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.softmax_scale,
        )
        # [b, h, s, d] -> [s, b, h*d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.heads * self.head_dim)
