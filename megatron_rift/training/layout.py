"""The large-scale layout and memory flags: their preflight rules, and what they set in Megatron-Core's
own configs (TransformerConfig, DistributedDataParallelConfig) and parallel state.

Flag names and meanings are Megatron-LM's (docs/layouts.md maps them). The rules run in the
preflight, on every rank before torch.distributed exists, so a combination Megatron-Core would
assert on deep inside a collective ends every rank with one message instead. Only the standard
library is imported here (the Transformer Engine check asks importlib, and torch only when TE is
there).
"""

from __future__ import annotations

import dataclasses
import importlib.util

from megatron_rift.model_source import fail
from megatron_rift.training.config import MemoryConfig, ParallelConfig, TrainConfig


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the preflight derives from the layout flags (RunPlan carries it)."""

    context_parallel: int = 1
    virtual_pipeline: int | None = None  # model chunks per pipeline rank; None: plain 1F1B


def _te_runs_here() -> bool:
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    import torch

    return torch.cuda.is_available()


def check_layout(config: TrainConfig, world_size: int) -> int:
    """The rules that need no model shape; returns the context-parallel size."""
    parallel = config.parallel
    tp, pp, cp = (
        parallel.tensor_model_parallel_size,
        parallel.pipeline_model_parallel_size,
        parallel.context_parallel_size,
    )
    if cp < 1:
        fail(f"--context-parallel-size must be at least 1, got {cp}")
    if tp >= 1 and pp >= 1 and world_size % (tp * pp * cp):
        fail(
            f"world size {world_size} is not divisible by tensor-model-parallel-size {tp} x "
            f"pipeline-model-parallel-size {pp} x context-parallel-size {cp} = {tp * pp * cp}; "
            "launch a multiple of that many processes or change the parallel sizes"
        )
    if parallel.sequence_parallel and tp < 2:
        fail(
            "--sequence-parallel splits activations over the tensor-parallel ranks: it needs "
            f"--tensor-model-parallel-size > 1 (got {tp}); drop the flag or raise TP"
        )
    _check_overlap(config)
    _check_recompute(config.memory)
    lpvs = parallel.num_layers_per_virtual_pipeline_stage
    if lpvs is not None:
        if lpvs < 1:
            fail(f"--num-layers-per-virtual-pipeline-stage must be at least 1, got {lpvs}")
        if pp < 2:
            fail(
                "--num-layers-per-virtual-pipeline-stage interleaves pipeline stages: it needs "
                f"--pipeline-model-parallel-size > 1 (got {pp})"
            )
    if config.data.seq_length is not None:
        check_sequence_split(config.data.seq_length, parallel, "--seq-length")
    _check_context_parallel(config, cp)
    return cp


def _check_context_parallel(config: TrainConfig, cp: int) -> None:
    parallel = config.parallel
    if parallel.cp_comm_type is not None and cp == 1:
        fail("--cp-comm-type has no effect without --context-parallel-size > 1; drop it")
    if cp == 1:
        return
    if parallel.cp_comm_type is not None and not _te_runs_here():
        fail(
            f"--cp-comm-type {parallel.cp_comm_type} picks Transformer Engine's context-parallel "
            "attention, which needs TE and a GPU; drop the flag here"
        )
    if config.data.sequence_packing:
        fail(
            f"--sequence-packing with --context-parallel-size {cp}: splitting packed rows over CP "
            "ranks (TE's THD partitioning) is not supported by this trainer; drop one of the two"
        )


def _check_overlap(config: TrainConfig) -> None:
    parallel = config.parallel
    if parallel.overlap_param_gather and not config.optimizer.use_distributed_optimizer:
        fail(
            "--overlap-param-gather overlaps the distributed optimizer's parameter all-gather: "
            "add --use-distributed-optimizer, or drop the flag"
        )
    if parallel.overlap_param_gather and not parallel.overlap_grad_reduce:
        fail("--overlap-param-gather needs --overlap-grad-reduce too (as in Megatron-LM)")
    if parallel.overlap_grad_reduce and config.precision.cross_entropy_loss_fusion:
        fail(
            "--overlap-grad-reduce starts each gradient bucket's reduce from a per-weight hook, "
            "which the output weight under --cross-entropy-loss-fusion never fires (its gradient "
            "goes straight into DDP's main_grad): drop one of the two flags"
        )
    if parallel.ddp_bucket_size is not None and parallel.ddp_bucket_size < 1:
        fail(f"--ddp-bucket-size must be at least 1 element, got {parallel.ddp_bucket_size}")
    if parallel.tp_comm_overlap:
        # TE's userbuffers must be set up before the model is built (Megatron-LM's
        # _initialize_tp_communicators); without them TE's layers fail on the first GEMM.
        fail(
            "--tp-comm-overlap needs Transformer Engine's userbuffers initialized before the model "
            "is built (Megatron-LM's initialize_ub), which this trainer does not do yet; drop the "
            "flag (--sequence-parallel alone works)"
        )


def _check_recompute(memory: MemoryConfig) -> None:
    granularity, method, layers = (
        memory.recompute_granularity,
        memory.recompute_method,
        memory.recompute_num_layers,
    )
    if granularity != "full":
        if method is not None or layers is not None:
            fail(
                "--recompute-method and --recompute-num-layers choose which layers a full "
                "recompute covers: add --recompute-granularity full, or drop them"
            )
        return
    if method is None or layers is None:
        fail(
            "--recompute-granularity full needs --recompute-method (uniform or block) and "
            "--recompute-num-layers N (e.g. uniform 1: every layer recomputed)"
        )
    if layers < 1:
        fail(f"--recompute-num-layers must be at least 1, got {layers}")


def check_sequence_split(seq_length: int, parallel: ParallelConfig, what: str) -> None:
    """Context parallelism cuts each sequence into 2·CP chunks; sequence parallelism then splits
    each CP rank's tokens over the TP ranks."""
    cp, tp = parallel.context_parallel_size, parallel.tensor_model_parallel_size
    if cp > 1 and seq_length % (2 * cp):
        fail(
            f"{what} {seq_length} does not split into 2 x context-parallel-size = {2 * cp} "
            f"equal chunks; choose a multiple of {2 * cp}"
        )
    if parallel.sequence_parallel and (seq_length // cp) % tp:
        fail(
            f"{what} {seq_length} does not split over tensor-model-parallel-size {tp} under "
            f"--sequence-parallel; choose a multiple of {tp * cp if cp > 1 else tp}"
        )


def check_model_layout(config: TrainConfig, num_layers: int, num_microbatches: int) -> Layout:
    """The rules that need the layer count and the number of micro-batches."""
    parallel, memory = config.parallel, config.memory
    pp = parallel.pipeline_model_parallel_size
    per_stage = num_layers // pp
    per_chunk = per_stage
    virtual = None
    lpvs = parallel.num_layers_per_virtual_pipeline_stage
    if lpvs is not None:
        if per_stage % lpvs:
            fail(
                f"--num-layers-per-virtual-pipeline-stage {lpvs} does not divide the "
                f"{per_stage} layers of each pipeline stage (num_layers={num_layers} / "
                f"pipeline-model-parallel-size {pp})"
            )
        virtual = per_stage // lpvs if per_stage // lpvs > 1 else None
        per_chunk = lpvs
    if virtual is not None and num_microbatches % pp:
        fail(
            f"the interleaved pipeline schedule runs micro-batches in groups of "
            f"pipeline-model-parallel-size {pp}, but a step has {num_microbatches}: choose "
            "--global-batch-size / (--micro-batch-size x data-parallel size) as a multiple of "
            f"{pp}"
        )
    layers = memory.recompute_num_layers
    if memory.recompute_method == "block" and layers is not None and layers > per_chunk:
        fail(
            f"--recompute-num-layers {layers} with --recompute-method block exceeds the "
            f"{per_chunk} layers of each model chunk"
        )
    if memory.recompute_method == "uniform" and layers is not None and per_chunk % layers:
        fail(
            f"--recompute-num-layers {layers} with --recompute-method uniform does not divide "
            f"the {per_chunk} layers of each model chunk"
        )
    return Layout(parallel.context_parallel_size, virtual)


def transformer_layout(config: TrainConfig, layout: Layout) -> dict:
    """TransformerConfig fields of the layout and memory flags."""
    parallel, memory = config.parallel, config.memory
    fields = dict(
        sequence_parallel=parallel.sequence_parallel,
        context_parallel_size=layout.context_parallel,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline,
        recompute_granularity=memory.recompute_granularity,
        recompute_method=memory.recompute_method,
        recompute_num_layers=memory.recompute_num_layers,
        tp_comm_overlap=parallel.tp_comm_overlap,
    )
    if parallel.cp_comm_type is not None:
        fields["cp_comm_type"] = parallel.cp_comm_type
    if layout.virtual_pipeline is not None:
        # Megatron-LM's default for the interleaved schedule. Batched p2p posts a rank's sends to
        # its previous and next stage in one order and the peer's receives in another; at PP=2
        # they are the same peer, and same-shaped activations and gradients would swap silently.
        fields.update(overlap_p2p_comm=True, batch_p2p_comm=False)
    return fields


def ddp_layout(config: TrainConfig) -> dict:
    """DistributedDataParallelConfig fields of the overlap flags."""
    parallel = config.parallel
    return dict(
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather,
        bucket_size=parallel.ddp_bucket_size,
    )


def parallel_state_layout(layout: Layout) -> dict:
    """``initialize_model_parallel`` keywords of the layout."""
    fields = {}
    if layout.context_parallel > 1:
        fields["context_parallel_size"] = layout.context_parallel
    if layout.virtual_pipeline is not None:
        fields["virtual_pipeline_model_parallel_size"] = layout.virtual_pipeline
    return fields


def layout_note(config: TrainConfig, layout: Layout) -> str:
    """The layout and memory flags in force, for the trainer's first log line ("" when none)."""
    parallel, memory = config.parallel, config.memory
    notes = []
    if parallel.sequence_parallel:
        notes.append("sequence parallel")
    if layout.context_parallel > 1:
        notes.append(f"CP={layout.context_parallel}")
    if layout.virtual_pipeline is not None:
        notes.append(f"{layout.virtual_pipeline} virtual stages (interleaved 1F1B)")
    if memory.recompute_granularity is not None:
        notes.append(f"{memory.recompute_granularity} recompute")
    overlaps = [
        name
        for name, on in (
            ("grad reduce", parallel.overlap_grad_reduce),
            ("param gather", parallel.overlap_param_gather),
        )
        if on
    ]
    if overlaps:
        notes.append("overlapped " + " and ".join(overlaps))
    return "".join(", " + note for note in notes)
