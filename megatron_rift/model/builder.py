"""Build Megatron-Core's ``GPTModel`` for one pipeline stage from a :class:`GPTArchitecture`."""

from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_rift.model.config import GPTArchitecture
from megatron_rift.model.linear_cross_entropy import use_linear_cross_entropy
from megatron_rift.model.spec import get_layer_spec, sequence_parallel_block_spec


def build_gpt_model(
    arch: GPTArchitecture,
    config: TransformerConfig,
    use_te: bool | None = None,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    cross_entropy_chunk: int | None = None,
    vp_stage: int | None = None,
) -> GPTModel:
    """GPTModel for this rank's pipeline stage (stage flags default from parallel_state).

    The vocabulary is padded for the current tensor-parallel size, as Megatron-LM does. With
    ``cross_entropy_chunk`` (tokens), ``forward(..., labels=...)`` computes the output layer and the
    cross-entropy together that many tokens at a time (``--cross-entropy-loss-fusion``,
    :mod:`megatron_rift.model.linear_cross_entropy`). ``vp_stage``: this chunk's virtual pipeline
    stage (pass its ``pre_process``/``post_process`` too).
    """
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    spec = get_layer_spec(
        use_te=use_te,
        qk_layernorm=arch.qk_layernorm,
        normalization=arch.normalization,
        num_experts=arch.num_moe_experts,
        moe_grouped_gemm=config.moe_grouped_gemm,
    )
    if config.sequence_parallel:
        spec = sequence_parallel_block_spec(spec, config, vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=arch.padded_vocab_size(tp),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rotary_base,
        rope_scaling=arch.rope_scaling,
        rope_scaling_factor=arch.rope_scaling_factor,
        **({} if vp_stage is None else {"vp_stage": vp_stage}),
    )
    if not config.perform_initialization:
        mark_tensor_parallel_weights(model)
    if cross_entropy_chunk is not None:
        use_linear_cross_entropy(model, cross_entropy_chunk)
    return model


def mark_tensor_parallel_weights(model) -> None:
    """Give every sharded weight of Megatron's own layers the attributes its random initialization
    would have set (``tensor_model_parallel``, ``partition_dim``, ``partition_stride``).

    Megatron sets them only inside that initialization; a model built with
    ``perform_initialization=False`` lacks them, and at TP>1 the optimizer's gradient norm (so the
    clipping) would then skip those weights on every tensor-parallel rank but the first. Transformer
    Engine layers set their own; weights that have them are left alone.
    """
    # SwiGLU's fc1 holds [gate, up] interleaved per rank (Megatron's MLP builds it with stride 2).
    strides = {
        id(m.linear_fc1.weight): 2
        for m in model.modules()
        if isinstance(m, MLP)
        and m.config.gated_linear_unit
        and not m.config.use_kitchen
        and getattr(m.linear_fc1, "weight", None) is not None
    }
    for module in model.modules():
        if isinstance(module, (VocabParallelEmbedding, ColumnParallelLinear)):
            partition_dim = 0
        elif isinstance(module, RowParallelLinear):
            partition_dim = 1
        else:
            continue
        weight = getattr(module, "weight", None)  # None: an output layer tied to the embedding
        if weight is not None and not hasattr(weight, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(
                weight, True, partition_dim, strides.get(id(weight), 1)
            )
