"""Parity check: the Megatron checkpoint and the HF model give the same logits on the same tokens.

Collective: every rank of the current tensor/pipeline-parallel layout builds its part of the
Megatron model, loads the checkpoint (resharding as needed) and runs Megatron's own pipeline
schedule; the rank holding the last stage's logits (tensor-parallel rank 0) loads the HF model and
compares. Both models run in the same dtype.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_rift.checkpointing import load_model_weights
from megatron_rift.convert.errors import ConversionError
from megatron_rift.model import (
    GPTArchitecture,
    build_gpt_model,
    default_device,
    to_transformer_config,
)

# Absolute bound on max |logit difference| when both models compute in fp32 (the default): the
# weights are bit-equal, so only kernel order differs.
FP32_TOLERANCE = 1e-4
# In bf16 the differences scale with the logits, so the bound is relative to max |logit| of the HF
# model (measured: see docs/conversion.md).
BF16_RELATIVE_TOLERANCE = 0.05


@dataclasses.dataclass
class Parity:
    max_abs_logit_diff: float
    max_abs_logit: float  # of the HF model: the scale bf16 differences are judged against
    dtype: torch.dtype

    @property
    def tolerance(self) -> float:
        if self.dtype == torch.float32:
            return FP32_TOLERANCE
        return BF16_RELATIVE_TOLERANCE * self.max_abs_logit


def sample_token_ids(
    vocab_size: int, batch: int = 2, seq_len: int = 16, seed: int = 0
) -> torch.Tensor:
    """Deterministic random token ids ``[batch, seq_len]`` from the real (unpadded) vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=generator)


@torch.no_grad()
def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor | None:
    """Logits ``[batch, seq, padded_vocab]`` (gathered over tensor parallelism) on last-stage ranks,
    None elsewhere. Runs Megatron's forward-only pipeline schedule with one micro-batch."""
    batch, seq_len = tokens.shape
    positions = torch.arange(seq_len, device=tokens.device).unsqueeze(0).expand(batch, -1)

    def forward_step(data_iterator, module):
        input_ids, position_ids = next(data_iterator)
        output = module(input_ids, position_ids, None)  # causal mask from the attention itself

        def keep_output(out, non_loss_data=False):
            return out

        return output, keep_output

    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([(tokens, positions)]),
        model=[model],
        num_microbatches=1,
        seq_length=seq_len,
        micro_batch_size=batch,
        forward_only=True,
        collect_non_loss_data=True,
    )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return tensor_parallel.gather_from_tensor_model_parallel_region(outputs[0])


@torch.no_grad()
def hf_logits(
    hf_dir: str | Path,
    tokens: torch.Tensor,
    dtype: torch.dtype,
    load_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Logits ``[batch, seq, vocab]`` of ``AutoModelForCausalLM`` from ``hf_dir``, its weights rounded to
    ``load_dtype`` (the checkpoint's stored precision) and computed in ``dtype``. Any weight the loader
    reports as missing or unexpected is an error (it would otherwise be random or ignored)."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=load_dtype or dtype, output_loading_info=True
    )
    problems = {
        k: sorted(v)
        for k, v in info.items()
        if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
    }
    if problems:
        raise ConversionError(f"transformers reports {problems} when loading {hf_dir}")
    model.to(dtype).eval()
    return model(input_ids=tokens).logits


def verify_parity(
    megatron_dir: str | Path,
    hf_dir: str | Path,
    arch: GPTArchitecture,
    dtype: torch.dtype = torch.float32,
    stored_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> Parity:
    """Compare the Megatron checkpoint at ``megatron_dir`` (root or iteration folder) with the HF model at
    ``hf_dir``, both computing in ``dtype`` from the same ``stored_dtype`` weights. Collective; every rank
    gets the same result. Differences are taken over the real (unpadded) vocabulary."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    # On a GPU machine the collectives are NCCL's: everything they touch must live on the GPU.
    on_gpu = default_device() == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    config = to_transformer_config(
        arch,
        dtype,
        device=device.type,
        loads_weights=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
    )
    model = build_gpt_model(arch, config).to(device)
    model.eval()
    load_model_weights(megatron_dir, model)
    if stored_dtype is not None and stored_dtype != dtype:
        with (
            torch.no_grad()
        ):  # the precision the HF side is loaded at (a no-op for a lossless conversion)
            for param in model.parameters():
                param.copy_(param.to(stored_dtype))
    tokens = sample_token_ids(
        arch.vocab_size, seq_len=min(16, arch.max_position_embeddings), seed=seed
    )
    logits = megatron_logits(model, tokens.to(device))
    del model
    found = torch.full((2,), -1.0, dtype=torch.float64, device=device)  # (max |diff|, max |logit|)
    if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
        reference = hf_logits(hf_dir, tokens, dtype, stored_dtype).double()  # on the CPU
        found[0] = (logits[..., : arch.vocab_size].double().cpu() - reference).abs().max()
        found[1] = reference.abs().max()
    if dist.is_initialized():
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
    if found[0].item() < 0:
        raise RuntimeError("no rank holds the last pipeline stage at tensor-parallel rank 0")
    return Parity(found[0].item(), found[1].item(), dtype)


def check_parity(parity: Parity, tolerance: float | None = None) -> None:
    """Print the ``max_abs_logit_diff=`` line and raise ConversionError above the tolerance."""
    tolerance = parity.tolerance if tolerance is None else tolerance
    if not dist.is_initialized() or dist.get_rank() == 0:
        dtype = str(parity.dtype).removeprefix("torch.")
        print(
            f"max_abs_logit_diff={parity.max_abs_logit_diff:.6g} (tolerance {tolerance:.3g}, computed in "
            f"{dtype}, max |logit| {parity.max_abs_logit:.4g})",
            flush=True,
        )
    if not parity.max_abs_logit_diff <= tolerance:  # also catches NaN
        raise ConversionError(
            f"--verify failed: max_abs_logit_diff={parity.max_abs_logit_diff:.6g} "
            f"exceeds the tolerance {tolerance:.3g}; the output was not written"
        )
