"""The few named tensor transforms between Hugging Face and Megatron-Core layouts.

Each transform maps the HF tensor(s) of one weight to the *full* (tensor-parallel size 1,
unstacked) Megatron tensor and back. Splitting into tensor-parallel shards is not done here:
the model's sharded state dict says which slice each rank holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_rift.model.config import GPTArchitecture


class Transform:
    """Identity: one HF tensor is the Megatron tensor."""

    name = "identity"
    hf_count = 1

    def to_megatron(
        self, hf: Sequence[torch.Tensor], arch: GPTArchitecture, megatron_shape: Sequence[int]
    ) -> torch.Tensor:
        return hf[0]

    def to_hf(self, megatron: torch.Tensor, arch: GPTArchitecture) -> list[torch.Tensor]:
        return [megatron]


class QKVInterleave(Transform):
    """q_proj, k_proj, v_proj -> ``linear_qkv``, interleaved per query group.

    Megatron's layout, for each query group g (of ``num_query_groups``): the g-th group's
    ``heads/groups`` query heads, then k_g, then v_g, each ``kv_channels`` rows.
    Works for weights ``[rows, hidden]`` and biases ``[rows]``.
    """

    name = "qkv"
    hf_count = 3

    def to_megatron(self, hf, arch, megatron_shape):
        q, k, v = hf
        groups, head_dim = arch.num_query_groups, arch.kv_channels
        rest = q.shape[1:]
        per_group = [
            t.reshape(groups, -1, *rest) for t in (q, k, v)
        ]  # [groups, rows_of_group, ...]
        q_rows = head_dim * self._heads_per_group(arch)
        if per_group[1].shape[1] != head_dim or per_group[0].shape[1] != q_rows:
            raise ValueError(
                f"q/k/v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} do not "
                f"match {arch.num_attention_heads} heads, {groups} kv heads of size {head_dim}"
            )
        return torch.cat(per_group, dim=1).reshape(-1, *rest)

    def to_hf(self, megatron, arch):
        groups, head_dim = arch.num_query_groups, arch.kv_channels
        rest = megatron.shape[1:]
        per_group = megatron.reshape(groups, -1, *rest)
        q, k, v = torch.split(
            per_group, [head_dim * self._heads_per_group(arch), head_dim, head_dim], dim=1
        )
        return [t.reshape(-1, *rest) for t in (q, k, v)]

    @staticmethod
    def _heads_per_group(arch: GPTArchitecture) -> int:
        return arch.num_attention_heads // arch.num_query_groups


class GateUpConcat(Transform):
    """gate_proj, up_proj -> ``linear_fc1`` = [gate; up] (SwiGLU: silu(gate) * up)."""

    name = "gate_up"
    hf_count = 2

    def to_megatron(self, hf, arch, megatron_shape):
        return torch.cat(list(hf), dim=0)

    def to_hf(self, megatron, arch):
        return list(torch.chunk(megatron, 2, dim=0))


class VocabPad(Transform):
    """Embedding / output rows: zero rows appended up to Megatron's padded vocabulary, stripped back.

    The padded size is the Megatron tensor's (it depends on the tensor-parallel size the model was
    built with); only the first ``arch.vocab_size`` rows are real tokens.
    """

    name = "vocab"
    hf_count = 1

    def to_megatron(self, hf, arch, megatron_shape):
        (table,) = hf
        padded_rows = megatron_shape[0]
        if table.shape[0] > padded_rows:
            raise ValueError(
                f"{table.shape[0]} vocabulary rows do not fit Megatron's {padded_rows}"
            )
        if table.shape[0] == padded_rows:
            return table
        padding = table.new_zeros((padded_rows - table.shape[0], *table.shape[1:]))
        return torch.cat([table, padding], dim=0)

    def to_hf(self, megatron, arch):
        return [megatron[: arch.vocab_size]]


IDENTITY = Transform()
QKV = QKVInterleave()
GATE_UP = GateUpConcat()
VOCAB = VocabPad()
