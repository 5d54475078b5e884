"""Trainer checkpoints: everything needed to continue a run exactly, in Megatron-LM's layout.

Each ``iter_NNNNNNN/`` folder (written by :func:`megatron_rift.checkpointing.save_checkpoint`,
atomically) holds one ``dist_checkpointing`` state dict with these entries:

===================== ===================================================================
``model``             the GPTModel's sharded state dict (reshardable over TP/PP)
``optimizer``         Megatron optimizer state; the distributed optimizer uses the
                      ``fully_reshardable`` format (see dist_optimizer_fixes.py)
``opt_param_scheduler`` OptimizerParamScheduler.state_dict() (lr schedule position)
``data_sampler``      GlobalBatchSampler.state_dict() (epoch, samples consumed)
``rng_state``         python/numpy/torch/CUDA/Megatron-tracker RNG states, one per rank
``iteration``         optimizer steps done
``parallel_layout``   TP/PP/DP sizes at save time (RNG states only load into the same layout)
``megatron_rift``     format version and the run's TrainConfig (provenance)
===================== ===================================================================

Model-only readers (``load_model_weights``, the HF exporter) ask for ``model`` and ignore the rest.
The checkpoint root also gets ``model_config.json`` (and the tokenizer folder, when the model came
with one), so it can be exported or fine-tuned from like a converted checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_rift import megatron_compat
from megatron_rift.checkpoint_layout import HF_CONFIG_DIR, TOKENIZER_DIR
from megatron_rift.checkpointing import (
    iteration_dir_name,
    load_checkpoint,
    load_model_state,
    load_model_weights,
    model_sharded_state_dict,
    save_checkpoint,
)
from megatron_rift.training import dist_optimizer_fixes
from megatron_rift.training.config import CheckpointConfig
from megatron_rift.training.model_chunks import synced_parameters
from megatron_rift.training.preflight import ConfigError
from megatron_rift.training.save_queue import install_results_queue

FORMAT_VERSION = 1


def parallel_layout() -> dict:
    layout = {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }
    cp = parallel_state.get_context_parallel_world_size()
    if cp > 1:  # only then: checkpoints written without CP keep their layout record
        layout["cp"] = cp
    return layout


def _rng_state() -> dict:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state) -> ShardedObject:
    layout = parallel_layout()
    rank = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    shape = (layout["pp"], layout["tp"], layout["dp"])
    if "cp" in layout:  # each CP rank has its own generator states
        shape, rank = (*shape, layout["cp"]), (*rank, parallel_state.get_context_parallel_rank())
    return ShardedObject("rng_state", state, shape, rank, replica_id=0)


def _optimizer_metadata() -> dict:
    return {"distrib_optim_sharding_type": dist_optimizer_fixes.DIST_OPTIMIZER_SHARDING_TYPE}


def training_state_dict(
    components,
    data,
    iteration: int,
    run_config: dict,
    is_loading: bool,
    with_optimizer: bool = True,
    with_rng: bool = True,
) -> dict:
    """The sharded state dict of a trainer checkpoint (to save, or as the template to load)."""
    model_sd = model_sharded_state_dict(components.model)
    state = {
        **model_sd,
        "iteration": iteration,
        "data_sampler": data.state_dict(),
        "parallel_layout": parallel_layout(),
        "megatron_rift": {"format_version": FORMAT_VERSION, "config": run_config},
    }
    if with_optimizer:
        state["optimizer"] = components.optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=_optimizer_metadata()
        )
        state["opt_param_scheduler"] = components.scheduler.state_dict()
    if with_rng:
        state["rng_state"] = _rng_sharded_object(None if is_loading else _rng_state())
    return state


# Folders of a converted checkpoint's root that the HF exporter reads (tools/convert_megatron_to_hf.py).
ROOT_FOLDERS_TO_CARRY = (TOKENIZER_DIR, HF_CONFIG_DIR)


def dataset_tokenizer_folder(data_path: str) -> Path | None:
    """The HF tokenizer folder a packed dataset was tokenized with (from PREFIX.json), if any."""
    try:
        info = json.loads(Path(f"{data_path}.json").read_text())["tokenizer"]
    except (OSError, KeyError, ValueError):
        return None
    return Path(info["path"]) if info.get("kind") == "hf" and info.get("path") else None


def _write_root_files(
    save_root: Path, components, model_source: str | None, dataset_tokenizer: Path | None = None
) -> None:
    """model_config.json (+ tokenizer/, hf_config/ of the source model) in the checkpoint root,
    written by rank 0 so the root can be exported like a converted checkpoint."""
    if dist.get_rank() != 0:
        return
    save_root.mkdir(parents=True, exist_ok=True)
    staging = save_root / ".model_config.tmp"  # written aside, then renamed: never half a file
    staging.mkdir(exist_ok=True)
    written = components.arch.save(staging)
    os.replace(written, save_root / written.name)
    staging.rmdir()
    for name in ROOT_FOLDERS_TO_CARRY:
        source = Path(model_source) / name if model_source else None
        if name == TOKENIZER_DIR and (source is None or not source.is_dir()):
            # A model trained from scratch: carry the tokenizer its data was packed with, so the
            # checkpoint exports to a self-contained HF folder.
            source = dataset_tokenizer
        if (
            source is None
            or not source.is_dir()
            or (save_root / name).exists()
            or source.resolve() == (save_root / name).resolve()
        ):
            continue
        tmp = save_root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        os.replace(tmp, save_root / name)


def save_training_checkpoint(
    ckpt: CheckpointConfig,
    data_path: str,
    components,
    data,
    iteration: int,
    run_config: dict,
    model_source: str | None,
) -> Path:
    """Write checkpoint ``iteration`` under ``ckpt.save`` (and the root's model_config.json and
    tokenizer); returns its folder."""
    root = Path(ckpt.save)
    install_results_queue()
    _write_root_files(root, components, model_source, dataset_tokenizer_folder(data_path))
    # With --overlap-param-gather the weights are stale until the next forward: gather them first.
    with synced_parameters(components.model):
        state = training_state_dict(components, data, iteration, run_config, is_loading=False)
        return save_checkpoint(root, iteration, state, keep_last=ckpt.keep_last_checkpoints)


def _start_folder(plan) -> Path | None:
    if plan.start == "scratch":
        return None
    return Path(plan.start_dir) / iteration_dir_name(plan.start_iteration)


def check_vocab_padding(plan, arch) -> None:
    """Fail before any collective when the checkpoint's embedding rows (the vocabulary padded for
    the TP size it was written at) differ from this run's padding: a TP that cannot load it."""
    folder = _start_folder(plan)
    if folder is None or not (folder / ".metadata").is_file():
        return
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    entry = metadata.get("embedding.word_embeddings.weight") or metadata.get("output_layer.weight")
    size = getattr(entry, "size", None)
    if size is None:
        return
    rows, wanted = int(size[0]), arch.padded_vocab_size(plan.tensor_parallel)
    if rows != wanted:
        raise ConfigError(
            f"{folder}: the embedding has {rows} rows (vocabulary {arch.vocab_size} padded for the "
            f"tensor-parallel size it was written at), but at --tensor-model-parallel-size "
            f"{plan.tensor_parallel} Megatron pads it to {wanted} rows (a multiple of "
            f"{arch.make_vocab_size_divisible_by} x {plan.tensor_parallel}). Convert the model at "
            "this TP (tools/convert_hf_to_megatron.py --tensor-model-parallel-size) or use a TP "
            "with the same padding"
        )


def expected_weight_shapes(arch) -> dict[str, tuple]:
    """Global shapes (layers stacked first) of the weights every GPT checkpoint of ``arch`` has,
    as dist_checkpointing records them; the vocabulary dimension is left to check_vocab_padding."""
    layers, hidden, kv = arch.num_layers, arch.hidden_size, arch.kv_channels
    qkv = (arch.num_attention_heads + 2 * arch.num_query_groups) * kv
    return {
        "decoder.final_layernorm.weight": (hidden,),
        "decoder.layers.self_attention.linear_qkv.weight": (layers, qkv, hidden),
        "decoder.layers.self_attention.linear_proj.weight": (
            layers,
            hidden,
            arch.num_attention_heads * kv,
        ),
    }


def check_weights_match_config(plan, arch, config_source: str) -> None:
    """Fail before any collective when the checkpoint's weights have other shapes than its
    model_config.json describes (an edited or mismatched config), naming both files."""
    folder = _start_folder(plan)
    if folder is None or not (folder / ".metadata").is_file():
        return
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    embedding = getattr(metadata.get("embedding.word_embeddings.weight"), "size", None)
    expected = expected_weight_shapes(arch)
    found = {name: getattr(metadata.get(name), "size", None) for name in expected}
    if embedding is not None:
        expected["embedding.word_embeddings.weight (columns)"] = (arch.hidden_size,)
        found["embedding.word_embeddings.weight (columns)"] = tuple(embedding)[1:]
    wrong = [
        f"{name} is {tuple(found[name])}, expected {shape}"
        for name, shape in expected.items()
        if found[name] is not None and tuple(found[name]) != shape
    ]
    if wrong:
        raise ConfigError(
            f"{config_source} does not describe the weights in {folder}: {'; '.join(wrong)}. "
            "Restore the model_config.json written with these weights (or convert the model "
            "again)"
        )


def load_start_state(ckpt: CheckpointConfig, plan, components, data, log) -> int:
    """Apply the plan's start point; return the iteration training continues after."""
    if plan.start_note:
        log(plan.start_note)
    if plan.start == "scratch":
        why = "--from-scratch" if ckpt.from_scratch else "architecture flags, no checkpoint"
        log(f"starting from randomly initialized weights ({why})")
        return 0
    root = Path(plan.start_dir)
    if plan.start == "finetune":
        source = (
            root
            if plan.start_iteration == "release"
            else root / iteration_dir_name(plan.start_iteration)
        )
        folder = load_model_weights(source, components.model)
        # The optimizer copied the random init into its fp32 main parameters when it was built.
        components.optimizer.reload_model_params()
        log(f"fine-tuning from the weights in {folder} (step 0, fresh optimizer)")
        return 0
    return _resume(ckpt, components, data, root / iteration_dir_name(plan.start_iteration), log)


def _resume(ckpt: CheckpointConfig, components, data, folder: Path, log) -> int:
    common = megatron_compat.load_common_state(str(folder))
    if "megatron_rift" not in common or "iteration" not in common:
        raise ConfigError(
            f"{folder} is not a megatron-rift trainer checkpoint; to fine-tune "
            "from its weights pass --finetune"
        )
    saved_layout = common["parallel_layout"]
    with_rng = ckpt.load_rng and saved_layout == parallel_layout()
    with_optimizer = ckpt.load_optim
    if not with_rng and ckpt.load_rng:
        log(
            f"checkpoint layout {saved_layout} differs from this run's {parallel_layout()}: "
            "model and optimizer are resharded, RNG states are not restored"
        )
    if with_optimizer:
        dist_optimizer_fixes.prepare_for_load(components.optimizer)
    template = training_state_dict(
        components, data, 0, {}, is_loading=True, with_optimizer=with_optimizer, with_rng=with_rng
    )
    loaded = load_checkpoint(folder, template)
    load_model_state(components.model, loaded)
    if not with_optimizer:
        components.optimizer.reload_model_params()
    else:
        with dist_optimizer_fixes.patched_state_setter(components.optimizer):
            components.optimizer.load_state_dict(loaded["optimizer"])
        dist_optimizer_fixes.unshare_step_states(components.optimizer)
        components.scheduler.load_state_dict(loaded["opt_param_scheduler"])
    try:
        data.load_state_dict(loaded["data_sampler"])
    except ValueError as err:  # e.g. another --global-batch-size or --seed than the saved run
        raise ConfigError(
            f"{folder}: {err}. To train on with other data settings, start a new "
            "run from these weights with --finetune"
        ) from err
    if with_rng:
        _set_rng_state(loaded["rng_state"])
    # The DDP wrapper keeps its own view of the parameters (and the distributed optimizer its
    # fp32 shards); both were loaded in place above, so nothing else to copy.
    iteration = int(loaded["iteration"])
    log(f"resumed from {folder} at step {iteration}")
    return iteration
