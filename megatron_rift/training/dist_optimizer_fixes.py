"""Work around Megatron-Core's distributed-optimizer checkpoint loading with torch's Adam/AdamW.

Megatron's ``DistributedOptimizer`` falls back to ``torch.optim.AdamW`` when neither Apex nor
Transformer Engine is installed (``distrib_optimizer.HAVE_APEX_OR_TE is False``; any device, GPU
included). Its checkpoint *load* path then has three bugs, in ``megatron/core/optimizer/
distrib_optimizer.py`` of megatron-core 0.16.1 and 0.19.2 alike (tests/test_megatron_versions.py
shows each bug and its fix on both legs of the version matrix):

1. ``DistributedOptimizer.state_dict`` asserts ``len(steps) == 1`` over the per-parameter ``step``
   states; a fresh optimizer has no state, so building the sharded state dict for loading fails.
   Fix: :func:`prepare_for_load` gives the fresh optimizer the state AdamW would create lazily
   (zero moments, ``step`` 0), which changes nothing numerically.
2. ``DistributedOptimizer.load_state_dict`` assigns **one shared** ``step`` tensor to every
   parameter. torch's AdamW increments ``step`` in place once per parameter, so after a resume the
   bias correction sees ``step`` jump by the number of parameters each iteration: silently wrong
   updates. Fix: :func:`unshare_step_states` gives each parameter its own clone after the load.
3. ``_set_main_param_and_optimizer_states`` copies every key of the optimizer state, ``step``
   included, from the loaded tensors, which never carry ``step`` (``KeyError: 'step'``), and copies
   into the fp32 main parameter (a leaf that requires grad) with autograd on.
   Fix: :func:`patched_state_setter`, used only around the load, copies the loaded keys under
   ``no_grad``.

With these, resuming a ``fully_reshardable`` distributed-optimizer checkpoint continues bitwise
(same TP/PP/DP) or within float tolerance (other TP). :data:`STATE_SETTER_PATCH` names the versions
this was checked on; another version fails at the first load with that patch named
(:class:`megatron_rift.megatron_compat.UnsupportedMegatronCore`). Remove this module when
megatron-core fixes the load path.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.optimizer import distrib_optimizer as _distrib
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_rift.megatron_compat import Patch

STATE_SETTER_PATCH = Patch(
    name="distributed-optimizer load with torch AdamW (shared step, KeyError 'step')",
    target="megatron.core.optimizer.distrib_optimizer:"
    "DistributedOptimizer._set_main_param_and_optimizer_states",
    versions=">=0.16.1,<=0.19.2",
    parameters=("self", "model_param", "tensors"),
)

# Save format for the distributed optimizer: the default (fully_sharded_model_space) fails at save
# with torch's AdamW ("ShardedTensor.flattened_range is not supported"); fully_reshardable saves
# and can be loaded at another TP/PP/DP.
DIST_OPTIMIZER_SHARDING_TYPE = "fully_reshardable"


def distributed_optimizers(optimizer) -> list:
    """The DistributedOptimizer instances inside ``optimizer`` (a ChainedOptimizer or one)."""
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return [opt for opt in inner if isinstance(opt, DistributedOptimizer)]


def needs_fixes(optimizer) -> bool:
    """The bugs apply (torch's AdamW inside a DistributedOptimizer); checks the version first."""
    if _distrib.HAVE_APEX_OR_TE or not distributed_optimizers(optimizer):
        return False
    STATE_SETTER_PATCH.verify()
    return True


def prepare_for_load(optimizer) -> None:
    """Bug 1: give a fresh torch AdamW inside each DistributedOptimizer its initial state."""
    if not needs_fixes(optimizer):
        return
    for dist_opt in distributed_optimizers(optimizer):
        inner = dist_opt.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(
                        param, memory_format=torch.preserve_format
                    )


def unshare_step_states(optimizer) -> None:
    """Bug 2: one ``step`` tensor per parameter (a clone of the loaded value)."""
    if not needs_fixes(optimizer):
        return
    for dist_opt in distributed_optimizers(optimizer):
        for state in dist_opt.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].detach().clone()


def _set_loaded_states(self, model_param, tensors):
    """Bug 3: copy only the loaded keys (never ``step``), with autograd off."""
    if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
        return _ORIGINAL_SETTER(self, model_param, tensors)
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    destinations = {"param": main_param, **self.optimizer.state[main_param]}
    with torch.no_grad():
        for key, value in tensors.items():
            destinations[key].copy_(value)


_ORIGINAL_SETTER = DistributedOptimizer._set_main_param_and_optimizer_states


@contextlib.contextmanager
def patched_state_setter(optimizer):
    """Bug 3, only for the duration of a checkpoint load and only when the bugs apply."""
    if not needs_fixes(optimizer):
        yield
        return
    DistributedOptimizer._set_main_param_and_optimizer_states = _set_loaded_states
    try:
        yield
    finally:
        DistributedOptimizer._set_main_param_and_optimizer_states = _ORIGINAL_SETTER
