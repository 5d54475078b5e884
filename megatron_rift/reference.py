"""Precompute a frozen reference model's log-probs over a packed dataset, once (``dpo``/``kto``).

``tools/compute_ref_logprobs.py`` is the CLI. The model is built and loaded exactly as the trainer
does it (the same :mod:`megatron_rift.model.stage` TransformerConfig and layer spec,
``load_model_weights``) and runs forward-only through Megatron's pipeline schedule at any TP/PP/DP.
Each data-parallel replica scores a strided share of the sequences; global rank 0 gathers the
results and publishes ``PREFIX.ref_logprobs.{npy,json}`` (see :mod:`megatron_rift.data.preference`)
atomically: the ``.npy`` and then the ``.json``, each renamed into place from a temporary file, so
a failed run leaves either the previous complete pair or nothing new.

Sequences scored: every document (its response tokens, EOS included) and, unless
``skip_kl_samples``, every document's KTO mismatched sample (:func:`mismatched_sample`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from tqdm.auto import tqdm

# Imported before the process group (and the CPU device remap) exists: Megatron's model modules
# run torch.compile decorators at import time.
from megatron_rift.data.batching import collate_rollouts
from megatron_rift.data.dataset import RewardDataset
from megatron_rift.data.preference import (
    REF_DTYPE,
    REF_FORMAT,
    dataset_fingerprint,
    kl_partners,
    mismatched_sample,
)
from megatron_rift.losses import sequence_logprobs
from megatron_rift.model import GPTArchitecture
from megatron_rift.model.context_parallel import split_for_context_parallel
from megatron_rift.model.stage import build_frozen_model, resolve_use_te, stage_transformer_config

DOCUMENT, KL = 0, 1
MICRO_BATCHES_PER_CALL = 16  # forward-only schedule calls between progress updates


def _sequences(dataset: RewardDataset, with_kl: bool) -> list[tuple[int, int]]:
    items = [(i, DOCUMENT) for i in range(len(dataset))]
    if with_kl:
        items += [(i, KL) for i in range(len(dataset))]
    return items


class _Scorer:
    """Builds collated micro-batches of sequences and runs them forward-only."""

    def __init__(
        self, dataset: RewardDataset, seq_length: int, micro_batch_size: int, with_kl: bool
    ):
        self.dataset, self.seq_length, self.mbs = dataset, seq_length, micro_batch_size
        if with_kl:
            self.partners = kl_partners(np.asarray(dataset.groups))
            self.max_length = int(np.max(dataset.lengths))

    def sample(self, item: tuple[int, int]) -> dict:
        index, kind = item
        if kind == DOCUMENT:
            return self.dataset[index]
        return mismatched_sample(self.dataset, index, int(self.partners[index]), self.max_length)

    def batch(self, items: list[tuple[int, int]]) -> dict:
        samples = [self.sample(it) for it in items]
        while len(samples) < self.mbs:  # fixed shapes for pipeline p2p; the padding is dropped
            samples.append(samples[0])
        return collate_rollouts(samples, self.seq_length, self.dataset.pad_id)


def _forward_step_factory():
    on_gpu = torch.cuda.is_available()
    context_parallel = parallel_state.get_context_parallel_world_size() > 1

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        if on_gpu:
            batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
        if context_parallel:  # each CP rank scores its chunks; sequence_logprobs sums them
            batch = split_for_context_parallel(batch)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def loss_func(per_token_ce, non_loss_data=False):
            logprob, count = sequence_logprobs(
                per_token_ce, batch["loss_mask"], batch["segment_ids"], batch["tokens"].shape[0]
            )
            return {"logprob": logprob.double().cpu(), "count": count.cpu()}

        return output, loss_func

    return forward_step


def compute_reference_logprobs(
    data_path: str,
    checkpoint: str,
    output: str,
    arch: GPTArchitecture,
    seq_length: int,
    micro_batch_size: int,
    dtype: str = "fp32",
    transformer_impl: str = "auto",
    with_kl: bool = True,
    progress: bool = True,
    cross_entropy_chunk: int | None = None,
) -> dict | None:
    """Score the dataset at ``data_path`` with the model in ``checkpoint`` (root or iteration
    folder) and publish ``output``.npy/.json; returns the summary on rank 0 (None elsewhere).

    Runs in the current Megatron parallel state (TP/PP/DP); ``dtype`` is fp32, bf16 or fp16.
    ``cross_entropy_chunk``: the trainer's ``--cross-entropy-loss-fusion`` (tokens per chunk).
    """
    dataset = RewardDataset(data_path)
    config = stage_transformer_config(
        arch,
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        dtype,
        loads_weights=True,
        layout=dict(context_parallel_size=parallel_state.get_context_parallel_world_size()),
    )
    model = build_frozen_model(
        arch,
        config,
        resolve_use_te(transformer_impl),
        checkpoint,
        cross_entropy_chunk=cross_entropy_chunk,
    )
    started = time.perf_counter()
    scorer = _Scorer(dataset, seq_length, micro_batch_size, with_kl)
    results = _score_my_share(model, scorer, _sequences(dataset, with_kl), progress)
    # The last stage's TP rank 0 of every replica holds its share; rank 0 collects them.
    contribute = (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_context_parallel_rank() == 0
    )
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(results if contribute else [], gathered, dst=0)
    summary = None
    if dist.get_rank() == 0:
        rows = _assemble_rows(gathered, len(dataset), with_kl)
        summary = {
            "format": REF_FORMAT,
            "version": 1,
            "dataset": str(Path(data_path).resolve()),
            "dataset_fingerprint": dataset_fingerprint(data_path),
            "documents": len(dataset),
            "kl_samples": with_kl,
            "reference_checkpoint": str(Path(checkpoint).resolve()),
            "parallel": {
                "tp": parallel_state.get_tensor_model_parallel_world_size(),
                "pp": parallel_state.get_pipeline_model_parallel_world_size(),
                "dp": parallel_state.get_data_parallel_world_size(),
            },
            "dtype": dtype,
            "seq_length": seq_length,
            "seconds": round(time.perf_counter() - started, 2),
            "mean_logprob_per_token": float(
                rows["logprob"].sum() / max(rows["num_tokens"].sum(), 1)
            ),
        }
        _publish(output, rows, summary)
    dist.barrier()
    return summary


def _score_my_share(
    model, scorer: _Scorer, items: list[tuple[int, int]], progress: bool
) -> list[tuple[int, int, float, int]]:
    """Forward-only over this data-parallel replica's strided share of ``items``; on the last
    pipeline stage returns ``(index, kind, logprob, count)`` per scored sequence."""
    mbs = scorer.mbs
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    mine = items[dp_rank::dp_size]
    # Every replica runs the same number of micro-batches (the last ones may be padding-only).
    per_replica = -(-len(items) // dp_size)
    num_micro = -(-per_replica // mbs)
    forward_backward = get_forward_backward_func()
    forward_step = _forward_step_factory()
    last_stage = parallel_state.is_pipeline_last_stage()
    results: list[tuple[int, int, float, int]] = []
    show = dist.get_rank() == 0 and progress
    with (
        torch.no_grad(),
        tqdm(total=len(items), unit=" seq", disable=not show, desc="reference log-probs") as bar,
    ):
        for first in range(0, num_micro, MICRO_BATCHES_PER_CALL):
            chunks = [
                mine[m * mbs : (m + 1) * mbs]
                for m in range(first, min(first + MICRO_BATCHES_PER_CALL, num_micro))
            ]
            batches = [scorer.batch(c) if c else scorer.batch([items[0]]) for c in chunks]
            store = forward_backward(
                forward_step_func=forward_step,
                data_iterator=iter(batches),
                model=[model],
                num_microbatches=len(batches),
                seq_length=scorer.seq_length,
                micro_batch_size=mbs,
                forward_only=True,
                collect_non_loss_data=True,
            )
            if last_stage:
                for chunk, out in zip(chunks, store):
                    for j, (index, kind) in enumerate(chunk):
                        results.append(
                            (index, kind, float(out["logprob"][j]), int(out["count"][j]))
                        )
            done = (first + len(batches)) * mbs * dp_size
            bar.update(min(len(items), done) - bar.n)
    return results


def _assemble_rows(gathered: list, num_documents: int, with_kl: bool) -> np.ndarray:
    """One REF_DTYPE row per document from every replica's results; checks each was scored."""
    rows = np.zeros(num_documents, dtype=REF_DTYPE)
    rows["kl_logprob"] = np.nan
    seen = np.zeros((num_documents, 2), dtype=bool)
    for part in gathered:
        for index, kind, logprob, count in part:
            field = "logprob" if kind == DOCUMENT else "kl_logprob"
            rows[field][index] = logprob
            rows["num_tokens" if kind == DOCUMENT else "kl_num_tokens"][index] = count
            seen[index, kind] = True
    if not seen[:, DOCUMENT].all() or (with_kl and not seen[:, KL].all()):
        raise RuntimeError("internal error: some sequences were not scored")
    return rows


def _publish(prefix: str, rows: np.ndarray, summary: dict) -> None:
    npy, meta = prefix + ".npy", prefix + ".json"
    Path(npy).parent.mkdir(parents=True, exist_ok=True)
    tmp_npy, tmp_meta = npy + ".tmp.npy", meta + ".tmp"
    try:
        np.save(tmp_npy, rows)
        with open(tmp_meta, "w") as handle:
            json.dump(summary, handle, indent=2)
            handle.write("\n")
        # The .json last: a reader checks it (fingerprint) before trusting the .npy.
        if os.path.exists(meta):
            os.remove(meta)
        os.replace(tmp_npy, npy)
        os.replace(tmp_meta, meta)
    finally:
        for path in (tmp_npy, tmp_meta):
            if os.path.exists(path):
                os.remove(path)
