"""Megatron-Core distributed checkpoint (saved at any TP/PP) -> Hugging Face folder for transformers/vLLM.

No Megatron model is built: the checkpoint's tensor metadata gives each weight's stored shape, and
the weights are loaded one decoder layer at a time as full (TP=1) tensors, resharded by
``dist_checkpointing`` on load, then written into safetensors shards of bounded size. Training
checkpoints work too: their optimizer and scheduler entries are simply not requested.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from tqdm import tqdm

from megatron_rift import megatron_compat
from megatron_rift.checkpoint_layout import HF_CONFIG_DIR, TOKENIZER_DIR, unreadable_reason
from megatron_rift.checkpointing import TRACKER_FILE, latest_checkpoint_dir
from megatron_rift.convert.distributed import ensure_parallel_state, is_main_rank
from megatron_rift.convert.dtypes import dtype_from_name
from megatron_rift.convert.errors import ConversionError
from megatron_rift.convert.hf_config import hf_config_from_architecture
from megatron_rift.convert.output_dir import check_output_dir, staged_output_dir
from megatron_rift.convert.result import ConversionResult
from megatron_rift.convert.safetensors_io import ShardedSafetensorsWriter
from megatron_rift.convert.tables import (
    ResolvedWeight,
    checkpoint_key,
    module_param_name,
    table_for_architecture,
)
from megatron_rift.convert.verify import check_parity, verify_parity
from megatron_rift.model import GPTArchitecture
from megatron_rift.parallel import ensure_process_group

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def resolve_megatron_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(root holding model_config.json, iteration folder to read) for a root or an iteration folder."""
    path = Path(path)
    if (path / TRACKER_FILE).is_file():
        root, folder = path, latest_checkpoint_dir(path)
    elif (path / ".metadata").is_file():
        root, folder = path.parent, path
    else:
        raise ConversionError(
            f"{path} is not a Megatron checkpoint: expected a root with {TRACKER_FILE} "
            "or an iteration folder (release/, iter_XXXXXXX/) with .metadata"
        )
    reason = unreadable_reason(folder)
    if reason:
        raise ConversionError(reason)
    return root, folder


class DistCheckpointReader:
    """Reads full (unsharded) weights of one iteration folder by their per-layer Megatron names."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.metadata: dict[str, ShardedTensor] = dist_checkpointing.load_tensors_metadata(
            str(folder)
        )

    def stored(self, megatron_name: str) -> ShardedTensor | None:
        return self.metadata.get(checkpoint_key(megatron_name)[0])

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Full tensors (TP=1 shape, padded vocabulary as stored) for per-layer Megatron names."""
        request = {}
        for name in names:
            key, indices = checkpoint_key(name)
            meta = self.metadata[key]
            # Row [layer] (or [layer, expert]) of the stack, asked for as a [1, (1,) ...] slice of it.
            stacked = len(indices)
            data = torch.empty(
                (1,) * stacked + tuple(meta.global_shape[stacked:]), dtype=meta.dtype
            )
            offsets = [(axis, i, meta.global_shape[axis]) for axis, i in enumerate(indices)]
            request[name] = ShardedTensor.from_rank_offsets(key, data, *offsets)
        # A subset of the layers is requested on purpose: skip the check that every shard is read.
        loaded = megatron_compat.load_distributed(
            request, str(self.folder), validate_access_integrity=False
        )
        # (a training checkpoint's common state comes back too: only the requested names are kept)
        return {name: loaded[name][(0,) * len(checkpoint_key(name)[1])] for name in names}


def check_megatron_weights(
    reader: DistCheckpointReader, rows: list[ResolvedWeight], arch: GPTArchitecture
) -> None:
    """Every weight the table needs is stored, with the layer count and vocabulary model_config.json says."""
    problems = []
    missing = sorted(
        {checkpoint_key(r.megatron)[0] for r in rows if reader.stored(r.megatron) is None}
    )
    if missing:
        problems.append(f"missing weights: {', '.join(missing)}")
    for row in rows:
        meta = reader.stored(row.megatron)
        if meta is None:
            continue
        if row.layer is not None and meta.global_shape[0] != arch.num_layers and row.layer == 0:
            problems.append(
                f"{meta.key} has {meta.global_shape[0]} layers, "
                f"model_config.json says {arch.num_layers}"
            )
        if row.expert == 0 and row.layer == 0 and meta.global_shape[1] != arch.num_moe_experts:
            problems.append(
                f"{meta.key} has {meta.global_shape[1]} experts, "
                f"model_config.json says {arch.num_moe_experts}"
            )
        if row.transform.name == "vocab" and meta.global_shape[0] < arch.vocab_size:
            problems.append(
                f"{meta.key} has {meta.global_shape[0]} rows, "
                f"fewer than vocab_size={arch.vocab_size}"
            )
    if problems:
        raise ConversionError(
            f"{reader.folder}: checkpoint does not match model_config.json: " + "; ".join(problems)
        )


def _row_groups(rows: list[ResolvedWeight]) -> list[list[ResolvedWeight]]:
    """Consecutive rows of the same layer (embedding, layer 0, ..., final norm and head)."""
    groups: list[list[ResolvedWeight]] = []
    for row in rows:
        if groups and groups[-1][0].layer == row.layer:
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def convert_megatron_to_hf(
    megatron_path: str | Path,
    output: str | Path,
    target_dtype: str | None = None,
    overwrite: bool = False,
    verify: bool = False,
    verify_dtype: str = "fp32",
    verify_tolerance: float | None = None,
    max_shard_bytes: int = 5 * 2**30,
    show_progress: bool = True,
) -> ConversionResult:
    """Write an HF folder (safetensors, config.json, generation_config.json, tokenizer) at ``output``.

    ``megatron_path`` is a checkpoint root (its tracker's iteration is read) or an iteration folder.
    The dtype defaults to the stored one. Runs in one process; with ``verify`` the written folder is
    loaded with transformers and compared with the Megatron checkpoint (both computing in
    ``verify_dtype``) before it is published. Without ``verify`` no Megatron model is built and the
    calling process gets only a gloo process group (no parallel state, no CPU remap), so a program
    can call this in-process between its own work (the demo does, once per model).
    """
    root, folder = resolve_megatron_checkpoint(megatron_path)
    try:
        arch = GPTArchitecture.load(root)
        table = table_for_architecture(arch)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise ConversionError(str(err)) from err
    check_output_dir(output, overwrite)
    if verify:  # builds a Megatron model
        ensure_parallel_state(arch, 1, 1)
    else:  # dist_checkpointing.load needs a process group, nothing more
        ensure_process_group()
    reader = DistCheckpointReader(folder)
    rows = table.resolve(arch)
    check_megatron_weights(reader, rows, arch)
    dtype = dtype_from_name(target_dtype) if target_dtype else reader.stored(rows[0].megatron).dtype
    result = ConversionResult(Path(output).resolve(), arch, dtype)
    with staged_output_dir(output, overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes)
        for group in tqdm(
            _row_groups(rows),
            desc="Megatron -> HF",
            unit="group",
            disable=not (show_progress and is_main_rank()),
        ):
            loaded = reader.read([row.megatron for row in group])
            for row in group:
                for name, tensor in zip(row.hf, row.transform.to_hf(loaded[row.megatron], arch)):
                    writer.add(name, tensor.to(dtype))
            del loaded
        writer.finish()
        _write_configs(tmp, root, arch, table, dtype)
        _copy_tokenizer(root / TOKENIZER_DIR, tmp)
        if verify:
            result.parity = verify_parity(
                folder, tmp, arch, dtype_from_name(verify_dtype), stored_dtype=dtype
            )
            check_parity(result.parity, verify_tolerance)
    return result


def _write_configs(out: Path, root: Path, arch: GPTArchitecture, table, dtype: torch.dtype) -> None:
    from transformers import AutoConfig, GenerationConfig

    source = root / HF_CONFIG_DIR
    base = (
        json.loads((source / "config.json").read_text())
        if (source / "config.json").is_file()
        else None
    )
    if base is not None and base.get("model_type") != table.model_type:
        base = None  # not the source of this architecture; keep nothing from it
    cfg = hf_config_from_architecture(arch, table, DTYPE_NAMES[dtype], base)
    if (
        base is None
    ):  # e.g. a trainer's root without hf_config/: take the special tokens from the tokenizer
        cfg.update(_special_token_ids(root / TOKENIZER_DIR))
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    hf_config = AutoConfig.from_pretrained(
        str(out)
    )  # fails here, not in vLLM, if transformers rejects it
    if (source / "generation_config.json").is_file():
        shutil.copy2(source / "generation_config.json", out / "generation_config.json")
    else:
        GenerationConfig.from_model_config(hf_config).save_pretrained(str(out))


def _special_token_ids(tokenizer_dir: Path) -> dict:
    """bos/eos/pad token ids of the checkpoint's tokenizer (generation stops on eos_token_id)."""
    if not tokenizer_dir.is_dir():
        return {}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return {k: v for k, v in ids.items() if v is not None}


def _copy_tokenizer(source: Path, out: Path) -> None:
    if source.is_dir():
        for path in sorted(source.iterdir()):
            if path.is_file():
                shutil.copy2(path, out / path.name)


def hf_weights_from_state_dict(
    state_dict: dict, arch: GPTArchitecture, layer_spec
) -> dict[str, torch.Tensor]:
    """HF weights from the ``state_dict()`` of an in-memory, unsharded (TP=PP=1) GPTModel built with
    ``layer_spec`` (module names differ between the local and TE specs; the table knows both)."""
    weights = {}
    for row in table_for_architecture(arch).resolve(arch):
        name = module_param_name(row.megatron, layer_spec)
        if name not in state_dict:
            raise KeyError(f"{name} (checkpoint name {row.megatron}) is not in the state dict")
        weights.update(zip(row.hf, row.transform.to_hf(state_dict[name], arch)))
    return weights
