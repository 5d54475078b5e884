"""Hugging Face safetensors -> Megatron-Core distributed checkpoint (``release/``), reshardable to any TP/PP.

The Megatron model is built without random initialization and each rank fills the slices of its
parameters in place, one decoder layer of HF tensors at a time: memory holds the Megatron model
plus one layer, never a second copy of the model, and the HF model is never instantiated.
"""

from __future__ import annotations

import shutil
import sys
from collections import defaultdict
from pathlib import Path

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
from tqdm import tqdm

from megatron_rift.checkpoint_layout import HF_CONFIG_DIR, TOKENIZER_DIR
from megatron_rift.checkpointing import RELEASE, model_sharded_state_dict, save_checkpoint
from megatron_rift.convert.distributed import ensure_parallel_state, is_main_rank
from megatron_rift.convert.dtypes import dtype_from_name
from megatron_rift.convert.errors import ConversionError
from megatron_rift.convert.hf_config import read_hf_config
from megatron_rift.convert.output_dir import check_output_dir, staged_output_dir
from megatron_rift.convert.result import ConversionResult
from megatron_rift.convert.safetensors_io import SafetensorsCheckpoint
from megatron_rift.convert.tables import ArchitectureTable, ResolvedWeight, checkpoint_key
from megatron_rift.convert.verify import check_parity, verify_parity
from megatron_rift.model import GPTArchitecture, build_gpt_model, to_transformer_config

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def target_dtype_for(name: str | None, hf_config: dict) -> torch.dtype:
    """``fp32``/``bf16``; by default bf16 when config.json says the weights are bfloat16, else fp32."""
    if name is None:
        stored = hf_config.get("dtype") or hf_config.get("torch_dtype")
        return torch.bfloat16 if stored == "bfloat16" else torch.float32
    return dtype_from_name(name)


def check_hf_weights(
    checkpoint: SafetensorsCheckpoint,
    rows: list[ResolvedWeight],
    table: ArchitectureTable,
    arch: GPTArchitecture,
) -> None:
    """Every weight the table needs is present and nothing unexplained is left over."""
    expected = {name for row in rows for name in row.hf}
    present = set(checkpoint.names)
    missing = sorted(expected - present)
    extra = sorted(
        n
        for n in present - expected
        if not table.is_ignored(n) and not (arch.tie_word_embeddings and n == "lm_head.weight")
    )  # some tied exports keep it
    problems = []
    if missing:
        problems.append(f"missing weights ({len(missing)}): {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected weights ({len(extra)}): {', '.join(extra)}")
    if problems:
        raise ConversionError(
            f"{checkpoint.folder}: the safetensors do not match config.json "
            f"(model_type {table.model_type!r}, {arch.num_layers} layers, "
            f"tie_word_embeddings={arch.tie_word_embeddings}): " + "; ".join(problems)
        )


def _local_shards(model) -> list[ShardedTensor]:
    """The ShardedTensors of this rank's parameters; their ``data`` are the parameters (or views of them)."""
    sharded = model_sharded_state_dict(model)
    apply_factories(sharded)  # SwiGLU's fc1 becomes two tensors: views of the gate and up halves
    return [v for v in nested_values(sharded) if isinstance(v, ShardedTensor)]


def fill_model_from_hf(
    model,
    checkpoint: SafetensorsCheckpoint,
    table: ArchitectureTable,
    arch: GPTArchitecture,
    progress: bool = True,
) -> int:
    """Copy every HF weight into the slice of the Megatron parameter this rank holds.

    Returns the number of parameter slices written. Works for any TP/PP: a slice's place in the full
    tensor is its ShardedTensor's ``global_offset``.
    """
    rows = {checkpoint_key(row.megatron): row for row in table.resolve(arch)}
    by_layer: dict[int | None, list[ShardedTensor]] = defaultdict(list)
    for shard in _local_shards(model):
        by_layer[shard.global_offset[0] if shard.prepend_axis_num else None].append(shard)
    order = sorted(by_layer, key=lambda layer: -1 if layer is None else layer)
    written, storages = 0, set()
    for layer in tqdm(
        order, desc="HF -> Megatron", unit="group", disable=not (progress and is_main_rank())
    ):
        shards = by_layer[layer]
        for shard in shards:
            if _row_key(shard) not in rows:
                raise ConversionError(
                    f"Megatron parameter {shard.key} (at {_row_key(shard)[1]}) has no row in the "
                    f"{table.model_type!r} conversion table"
                )
        needed = {name for shard in shards for name in rows[_row_key(shard)].hf}
        hf_tensors = checkpoint.read(sorted(needed))
        full_cache: dict[str, torch.Tensor] = {}  # fc1's two halves come from one full tensor
        for shard in shards:
            row = rows[_row_key(shard)]
            if row.megatron not in full_cache:
                full_cache[row.megatron] = _full_megatron_tensor(row, hf_tensors, arch, shard)
            full = full_cache[row.megatron]
            index = tuple(
                slice(o, o + n)
                for o, n in zip(shard.global_offset[shard.prepend_axis_num :], shard.local_shape)
            )
            shard.data.copy_(full[index])
            storages.add(shard.data.untyped_storage().data_ptr())
            written += 1
        del hf_tensors, full_cache
    # The model was built uninitialized: a parameter outside the sharded state dict would be garbage.
    unfilled = [
        n for n, p in model.named_parameters() if p.untyped_storage().data_ptr() not in storages
    ]
    if unfilled:
        raise RuntimeError(f"parameters not written by the conversion: {unfilled}")
    return written


def _row_key(shard: ShardedTensor) -> tuple[str, tuple[int, ...]]:
    """(key, indices) as :func:`checkpoint_key` names a table row: the shard's stacked axes
    (layer; layer and global expert) are its leading ``prepend_axis_num`` offsets."""
    return shard.key, tuple(shard.global_offset[: shard.prepend_axis_num])


def _full_megatron_tensor(
    row: ResolvedWeight, hf_tensors: dict, arch: GPTArchitecture, shard: ShardedTensor
) -> torch.Tensor:
    expected = tuple(shard.global_shape[shard.prepend_axis_num :])
    sources = [hf_tensors[name] for name in row.hf]
    try:
        full = row.transform.to_megatron(sources, arch, expected)
    except (ValueError, RuntimeError) as err:
        full, reason = None, str(err)
    else:
        reason = f"gives shape {tuple(full.shape)}"
    if full is None or tuple(full.shape) != expected:
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(row.hf, sources))
        raise ConversionError(
            f"{shapes} do not fit Megatron's {row.megatron} of shape {expected} "
            f"({row.transform.name}: {reason}); config.json and the weights disagree"
        )
    return full


def convert_hf_to_megatron(
    hf_path: str | Path,
    output: str | Path,
    target_dtype: str | None = None,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    overwrite: bool = False,
    expert_parallel: int = 1,
    verify: bool = False,
    verify_dtype: str = "fp32",
    verify_tolerance: float | None = None,
) -> ConversionResult:
    """Convert the HF model folder ``hf_path`` into a Megatron checkpoint root at ``output``.

    Collective when launched under torchrun: each of the TP x PP ranks fills its own shard (and,
    for an MoE model with ``expert_parallel`` > 1, only its own experts).
    With ``verify`` the written checkpoint is loaded back and compared with the HF model (both computing
    in ``verify_dtype``) before the output is published; above the tolerance nothing is written and
    ConversionError is raised.
    """
    hf_path = Path(hf_path)
    arch, table, hf_config = read_hf_config(hf_path)
    checkpoint = SafetensorsCheckpoint(hf_path)
    check_hf_weights(checkpoint, table.resolve(arch), table, arch)
    dtype = target_dtype_for(target_dtype, hf_config)
    check_output_dir(output, overwrite)
    ensure_parallel_state(arch, tensor_parallel, pipeline_parallel, expert_parallel)
    result = ConversionResult(Path(output).resolve(), arch, dtype)
    with staged_output_dir(output, overwrite) as tmp:
        # Every value is overwritten from the HF weights: no random initialization.
        config = to_transformer_config(
            arch,
            dtype,
            loads_weights=True,
            tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=pipeline_parallel,
            expert_model_parallel_size=expert_parallel,
        )
        model = build_gpt_model(arch, config)
        with torch.no_grad():
            fill_model_from_hf(model, checkpoint, table, arch)
        save_checkpoint(tmp, RELEASE, model_sharded_state_dict(model))
        del model
        if is_main_rank():
            arch.save(tmp)
            if not _copy_files(hf_path, tmp / TOKENIZER_DIR, TOKENIZER_FILES):
                print(
                    f"note: no tokenizer files in {hf_path}; the checkpoint gets no "
                    f"{TOKENIZER_DIR}/ folder",
                    file=sys.stderr,
                )
            _copy_files(hf_path, tmp / HF_CONFIG_DIR, ("config.json", "generation_config.json"))
        if verify:
            result.parity = verify_parity(
                tmp, hf_path, arch, dtype_from_name(verify_dtype), stored_dtype=dtype
            )
            check_parity(result.parity, verify_tolerance)
    return result


def _copy_files(source: Path, destination: Path, names: tuple[str, ...]) -> list[str]:
    present = [n for n in names if (source / n).is_file()]
    if present:
        destination.mkdir(parents=True, exist_ok=True)
        for name in present:
            shutil.copy2(source / name, destination / name)
    return present
