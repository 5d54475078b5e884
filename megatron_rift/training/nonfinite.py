"""Megatron-LM's ``--check-for-nan-in-loss-and-grad``, agreed on by every rank before the update.

After the forward/backward passes of a step and before the optimizer touches the weights, each
rank looks at its loss terms (last pipeline stage) and, outside fp16's loss scaling (which skips
overflowing steps itself), at its gradient buffers; one all-reduce tells every rank which ranks
saw a NaN or Inf. Such a step is not applied. :class:`NonFiniteGuard` then ends the run with
:class:`NonFiniteError` (the step, the ranks, the loss terms; nothing of that state is saved) or,
with ``--skip-nan-steps N``, skips up to N such steps and logs each.

Megatron-Core's own DDP check (``check_for_nan_in_grad``) raises on the rank that sees the NaN
only, while the others enter the next collective and wait; this check replaces it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class NonFiniteError(RuntimeError):
    """A step produced a NaN/Inf loss or gradient (the message names the step, ranks and terms)."""


def _local_terms(reports: list[dict]) -> dict[str, float]:
    """{name: sum over this rank's micro-batches} of the loss report's [sum, count] pairs."""
    terms: dict[str, float] = {}
    for report in reports or []:
        for name, pair in report.items():
            terms[name] = terms.get(name, 0.0) + float(pair[0])
    return terms


def _grads_finite(model_chunks) -> bool:
    for chunk in model_chunks:
        for buffer in getattr(chunk, "buffers", []):
            if not bool(torch.isfinite(buffer.grad_data).all()):
                return False
    return True


def nonfinite_ranks(reports: list[dict], model_chunks, check_grads: bool) -> dict:
    """Collective: ``{"loss": [ranks], "grad": [ranks], "terms": this rank's loss terms}``;
    both lists empty when the step is finite everywhere."""
    terms = _local_terms(reports)
    bad_loss = any(not math.isfinite(value) for value in terms.values())
    bad_grad = check_grads and not _grads_finite(model_chunks)
    world, rank = dist.get_world_size(), dist.get_rank()
    flags = torch.zeros(2 * world, dtype=torch.int32)
    flags[rank], flags[world + rank] = int(bad_loss), int(bad_grad)
    if torch.cuda.is_available():
        flags = flags.cuda()
    dist.all_reduce(flags)
    flags = flags.cpu().tolist()
    return {
        "loss": [r for r in range(world) if flags[r]],
        "grad": [r for r in range(world) if flags[world + r]],
        "terms": terms,
    }


class NonFiniteGuard:
    """Decides what a non-finite step does: skip it (up to ``skip_budget`` times) or stop."""

    def __init__(self, skip_budget: int, last_saved, log):
        self.skip_budget, self.skipped = skip_budget, 0
        self.last_saved = last_saved  # callable: the last checkpoint folder, or None
        self.log = log

    def check(self, iteration: int, found: dict | None) -> bool:
        """True when step ``iteration`` was non-finite and is skipped; raises when it ends the
        run. ``found`` is :func:`nonfinite_ranks`'s answer (None: the check is off)."""
        if not found or not (found["loss"] or found["grad"]):
            return False
        what = []
        if found["loss"]:
            what.append(f"loss on rank(s) {found['loss']}")
        if found["grad"]:
            what.append(f"gradients on rank(s) {found['grad']}")
        terms = ", ".join(f"{k}={v:.6g}" for k, v in sorted(found["terms"].items()))
        rank = dist.get_rank() if dist.is_initialized() else 0
        terms = terms or "none on this pipeline stage"
        where = (
            f"step {iteration}: NaN/Inf in the {' and the '.join(what)} "
            f"(rank {rank}'s loss terms: {terms})"
        )
        if self.skipped < self.skip_budget:
            self.skipped += 1
            self.log(
                f"skipped {where}; the update was not applied ({self.skipped} of "
                f"--skip-nan-steps {self.skip_budget})"
            )
            return True
        saved = self.last_saved()
        kept = f"the last checkpoint is {saved}" if saved else "no checkpoint was saved"
        raise NonFiniteError(
            f"{where}. Nothing of this step was applied or saved; {kept}. Lower --lr, check the "
            "data, or allow a few such steps with --skip-nan-steps N"
        )
