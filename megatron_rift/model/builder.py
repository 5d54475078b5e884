"""Build Megatron-Core's ``GPTModel`` for one pipeline stage from a :class:`GPTArchitecture`."""

from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_rift.model.config import GPTArchitecture
from megatron_rift.model.spec import get_layer_spec


def build_gpt_model(arch: GPTArchitecture, config: TransformerConfig, use_te: bool | None = None,
                    pre_process: bool | None = None, post_process: bool | None = None) -> GPTModel:
    """GPTModel for this rank's pipeline stage (stage flags default from parallel_state).

    The vocabulary is padded for the current tensor-parallel size, as Megatron-LM does.
    """
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    spec = get_layer_spec(use_te=use_te, qk_layernorm=arch.qk_layernorm,
                          normalization=arch.normalization)
    return GPTModel(
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
    )
