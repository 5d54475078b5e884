"""Training units of the preference objectives, and the precomputed reference log-probs file.

A *unit* is what ``--global-batch-size`` and ``--micro-batch-size`` count for ``dpo``, ``simpo``
and ``kto``; each unit is two sequences, and the sampler hands out whole units, so both halves of
a unit are always in the same micro-batch (by construction: there is no way to split them).

* :class:`PairUnits` (``dpo``, ``simpo``): a pair of a *pairs dataset*
  (``tools/pack_rollouts.py --pairs``): documents ``2u`` (chosen) and ``2u + 1`` (rejected).
* :class:`MismatchedUnits` (``kto``): one document with a non-zero reward (desirable if > 0,
  undesirable if < 0) and its *mismatched* sample: the same prompt followed by the response of
  :func:`kl_partners`'s partner, a document of another problem. KTO estimates its reference point
  from these (KTO paper 4.1).

Reference log-probs (``tools/compute_ref_logprobs.py``) live next to the dataset as
``PREFIX.ref_logprobs.npy`` (one :data:`REF_DTYPE` row per document, memory-mapped) and
``PREFIX.ref_logprobs.json`` (the dataset's fingerprint, the reference model, settings). A file
whose fingerprint, row count or token counts disagree with the dataset is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from megatron_rift.data.dataset import RewardDataset
from megatron_rift.data.errors import RolloutDataError
from megatron_rift.data.format import REF_DTYPE, REF_FORMAT, REF_SUFFIX  # noqa: F401
from megatron_rift.data.integrity import (  # noqa: F401  (dataset_fingerprint re-exported)
    check_reference_logprobs,
    dataset_fingerprint,
)
from megatron_rift.roles import CHOSEN, KL_SAMPLE, REJECTED


def ref_paths(prefix: str) -> dict[str, str]:
    base = str(prefix) + REF_SUFFIX
    return {"npy": base + ".npy", "json": base + ".json"}


def kl_partners(groups: np.ndarray) -> np.ndarray:
    """int64 [N]: for each document, the next document (cyclically) of another problem.

    That is the start of the next run of ``groups`` after the document's own run, wrapping to the
    first document of another group. Deterministic, so the reference tool and the trainer agree.
    """
    groups = np.asarray(groups)
    n = groups.size
    if n == 0 or np.all(groups == groups[0]):
        raise RolloutDataError(
            "kto needs documents of at least two problems (its reference point "
            "pairs each prompt with another problem's response); this dataset "
            "has one"
        )
    change = np.flatnonzero(groups[1:] != groups[:-1]) + 1  # run starts after the first
    run_end = np.full(n, -1, dtype=np.int64)
    # The next run start after each index (or -1 past the last change).
    nxt = np.searchsorted(change, np.arange(n), side="right")
    has_next = nxt < change.size
    run_end[has_next] = change[nxt[has_next]]
    # Wrap-around: the first document whose group differs from the last run's group.
    last_group = groups[-1]
    wrap = int(np.flatnonzero(groups != last_group)[0])
    partners = np.where(has_next, run_end, wrap)
    # The wrap target must differ from each wrapped document's own group (they are all last_group).
    return partners


def mismatched_sample(dataset: RewardDataset, index: int, partner: int, max_length: int) -> dict:
    """Document ``index``'s prompt followed by document ``partner``'s response (with its EOS or
    end-of-turn), cut to ``max_length`` tokens (the dataset's longest document, so it fits the
    trainer's rows)."""
    own, other = dataset[index], dataset[partner]
    prompt = own["tokens"][: own["response_start"]]
    response = other["tokens"][other["response_start"] : other["response_end"]]
    tokens = np.concatenate([prompt, response])[:max_length]
    loss_mask = np.zeros(tokens.shape[0], dtype=np.uint8)
    loss_mask[prompt.shape[0] :] = 1
    return {
        "tokens": tokens,
        "loss_mask": loss_mask,
        "reward": 0.0,
        "index": -1,
        "group": own["group"],
        "response_start": int(prompt.shape[0]),
        "response_end": int(tokens.shape[0]),
    }


def pairs_layout(dataset: RewardDataset) -> str | None:
    """'ground-truth' or 'given' for a pairs dataset, None for a plain rollout dataset."""
    return dataset.info.get("pairs")


class ReferenceLogprobs:
    """The reference log-probs of one packed dataset, checked against it on open."""

    def __init__(self, path_prefix: str, dataset: RewardDataset, need_kl: bool):
        paths = {"npy": path_prefix + ".npy", "json": path_prefix + ".json"}
        # Files, description, fingerprint, dtype and size (the preflight's own check).
        check_reference_logprobs(path_prefix, dataset.prefix, len(dataset), need_kl)
        self.info = json.loads(Path(paths["json"]).read_text())
        self.rows = np.load(paths["npy"], mmap_mode="r")
        expected = dataset.loss_tokens
        bad = np.flatnonzero(np.asarray(self.rows["num_tokens"]) != expected)
        if bad.size:
            raise RolloutDataError(
                f"{paths['npy']}: document {int(bad[0])} scored {int(self.rows['num_tokens'][bad[0]])} "
                f"response tokens, the dataset has {int(expected[bad[0]])}. Recompute it"
            )
        self.path_prefix = path_prefix


class PairUnits:
    """The (chosen, rejected) pairs of a pairs dataset: unit u is documents 2u and 2u + 1.
    ``samples(u)`` gives both as collate-ready dicts with ``role`` and ``ref_logprob`` (0 when
    there is no reference)."""

    def __init__(
        self,
        dataset: RewardDataset,
        reference: ReferenceLogprobs | None = None,
        objective_name: str = "this objective",
    ):
        if pairs_layout(dataset) is None:
            raise RolloutDataError(
                f"--objective {objective_name} trains on (chosen, rejected) pairs, but "
                f"{dataset.prefix} is a plain rollout dataset. Pack it with "
                "tools/pack_rollouts.py --pairs ground-truth (rollouts + a 'solution' field, "
                "paper section 4.1) or --pairs given (records with chosen/rejected)"
            )
        self.dataset, self.reference = dataset, reference
        self.num_units = len(dataset) // 2

    def __len__(self) -> int:
        return self.num_units

    def samples(self, unit: int) -> list[dict]:
        unit = int(unit)
        chosen, rejected = dict(self.dataset[2 * unit]), dict(self.dataset[2 * unit + 1])
        chosen.update(role=CHOSEN, ref_logprob=_reference(self.reference, 2 * unit))
        rejected.update(role=REJECTED, ref_logprob=_reference(self.reference, 2 * unit + 1))
        return [chosen, rejected]

    def unit_tokens(self, units: np.ndarray) -> int:
        """Tokens of the given units' sequences (for tokens/s)."""
        lengths = self.dataset.lengths
        return int(lengths[2 * units].sum() + lengths[2 * units + 1].sum())


class MismatchedUnits:
    """KTO's units: each document with a non-zero reward (desirable if > 0, undesirable if < 0)
    and its mismatched sample (its prompt with :func:`kl_partners`'s partner's response)."""

    def __init__(
        self,
        dataset: RewardDataset,
        reference: ReferenceLogprobs | None = None,
        objective_name: str = "this objective",
    ):
        self.dataset, self.reference = dataset, reference
        self.documents = np.flatnonzero(np.asarray(dataset.rewards) != 0).astype(np.int64)
        if self.documents.size == 0:
            raise RolloutDataError(
                f"{objective_name}: every reward in {dataset.prefix} is 0; it "
                "needs desirable (r > 0) or undesirable (r < 0) samples"
            )
        self.partners = kl_partners(np.asarray(dataset.groups))
        self.max_length = int(np.max(dataset.lengths))
        self.num_units = int(self.documents.size)

    def __len__(self) -> int:
        return self.num_units

    def samples(self, unit: int) -> list[dict]:
        index = int(self.documents[int(unit)])
        sample = dict(self.dataset[index])
        sample.update(
            role=CHOSEN if sample["reward"] > 0 else REJECTED,
            ref_logprob=_reference(self.reference, index),
        )
        kl = mismatched_sample(self.dataset, index, int(self.partners[index]), self.max_length)
        kl.update(role=KL_SAMPLE, ref_logprob=_reference(self.reference, index, kl=True))
        return [sample, kl]

    def unit_tokens(self, units: np.ndarray) -> int:
        """Tokens of the given units' sequences (for tokens/s)."""
        lengths = self.dataset.lengths
        docs = self.documents[units]
        starts = np.asarray(self.dataset.side["response_start"])
        ends = self.dataset.response_ends
        partner = self.partners[docs]
        kl = np.minimum(starts[docs] + ends[partner] - starts[partner], self.max_length)
        return int(lengths[docs].sum() + kl.sum())


def _reference(reference: ReferenceLogprobs | None, index: int, kl: bool = False) -> float:
    if reference is None:
        return 0.0
    return float(reference.rows["kl_logprob" if kl else "logprob"][index])
