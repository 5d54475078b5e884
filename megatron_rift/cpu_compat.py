"""Run Megatron-Core (0.16.1 to 0.19.2) on machines without CUDA (gloo backend, CPU tensors).

Megatron-Core hard-codes CUDA in many places that are otherwise device-agnostic: ``device="cuda"``
literals in the pipeline schedules, ``torch.cuda.current_device()`` in DDP's grad buffers and the
optimizer, ``.cuda()`` calls, ``Tensor.type() == "torch.cuda.FloatTensor"`` checks in the distributed
optimizer, ``torch.cuda.synchronize()`` in dist_checkpointing. Rather than patching each call site,
this module installs one process-wide :class:`torch.overrides.TorchFunctionMode` that maps every
CUDA device request to the CPU, plus a handful of ``torch.cuda`` stand-ins.

This is the only place in megatron_rift that works around CUDA assumptions. It is a no-op when CUDA is
available (:func:`enable_cpu_compat` returns ``False``), so GPU runs use Megatron-Core untouched.
The remap costs about 20% of step time on CPU; keep it in mind when reading CPU timings.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

from megatron_rift.megatron_compat import Patch

_CPU = torch.device("cpu")
_lock = threading.Lock()
_mode: _CudaToCpuMode | None = None


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # Megatron passes torch.cuda.current_device() (an int) as a device index.
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_if_cuda(device):
    return _CPU if _is_cuda_device(device) else device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU for every torch function call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        if kwargs.get("pin_memory"):  # e.g. the rotary embedding's CP slice index
            kwargs["pin_memory"] = False
        name = getattr(func, "__name__", "")
        if name == "cuda" and args and isinstance(args[0], torch.Tensor):
            return args[0]
        if name == "to" and args and isinstance(args[0], torch.Tensor):
            args = tuple(_cpu_if_cuda(a) if i > 0 else a for i, a in enumerate(args))
        if name == "type" and args and isinstance(args[0], torch.Tensor):
            if len(args) == 1 and not kwargs:
                # Report CPU tensors as CUDA ones so Megatron's type-string checks pass.
                return func(*args).replace("torch.", "torch.cuda.", 1)
            target = args[1] if len(args) > 1 else kwargs.get("dtype")
            if isinstance(target, str) and ".cuda." in target:
                args = (args[0], target.replace(".cuda.", ".", 1)) + tuple(args[2:])
        if name in ("pin_memory",) and args and isinstance(args[0], torch.Tensor):
            return args[0]
        if func is torch.autograd.backward:
            return _backward_under_mode(self, func, args, kwargs)
        if func is torch.Tensor.backward:
            return _backward_under_mode(self, _tensor_backward, args, kwargs)
        return func(*args, **kwargs)


def _tensor_backward(tensor, gradient=None, retain_graph=None, create_graph=False, inputs=None):
    """``Tensor.backward`` by way of ``torch.autograd.backward`` (which it calls itself)."""
    torch.autograd.backward(tensor, gradient, retain_graph, create_graph, inputs=inputs)


def _backward_under_mode(mode: TorchFunctionMode, func, args, kwargs):
    """Run ``torch.autograd.backward`` with the remap on.

    torch 2.13's ``autograd.backward`` dispatches to function modes, whose handler runs with the
    mode popped; but the backward of Megatron's sequence-parallel linear layers allocates on
    ``torch.cuda.current_device()`` (tensor_parallel/layers.py), so the engine must run under the
    remap. The mode is pushed back and the dispatch check skipped for this one call.
    """
    import torch.autograd as autograd

    dispatch_check = autograd.has_torch_function
    autograd.has_torch_function = lambda *_: False
    try:
        with mode:
            return func(*args, **kwargs)
    finally:
        autograd.has_torch_function = dispatch_check


def _noop(*_args, **_kwargs):
    return None


def _new_noop():
    """A no-op function object of its own: torch.compile's tracer refuses one function object
    standing in for several torch.cuda functions (it has different rules for each)."""

    def noop(*_args, **_kwargs):
        return None

    return noop


class _NullStream:
    """Stand-in for ``torch.cuda.Stream`` / events: CPU work is already synchronous."""

    def __init__(self, *_args, **_kwargs):
        pass

    def wait_stream(self, *_a, **_k):
        return None

    def wait_event(self, *_a, **_k):
        return None

    def record_event(self, *_a, **_k):
        return _NullStream()

    def record(self, *_a, **_k):
        return None

    def synchronize(self):
        return None

    def query(self):
        return True

    def elapsed_time(self, _other):
        return 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.synchronize = _new_noop()
    cuda.set_device = _new_noop()
    cuda.empty_cache = _new_noop()
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *_a, **_k: contextlib.nullcontext()
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = _new_noop()
    # The CUDA RNG tracker (tensor_parallel/random.py) saves and restores CUDA generator states;
    # on CPU the CPU generator plays that role.
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # Activation recompute (tensor_parallel.checkpoint) reads it through the submodule.
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: torch.default_generator.manual_seed(int(seed))


# The RNG tracker restores generator states through torch.cuda._lazy_call, which never runs
# without CUDA: the CPU generator would be left on a per-TP-rank seed and TP=1 and TP=2 would
# initialize different weights. Seen in 0.16.1 and 0.19.2 (tests/test_megatron_versions.py shows
# the bug and the fix on each); the patch restores the CPU generator instead.
RNG_STATE_PATCH = Patch(
    name="restore the CPU generator in the CUDA RNG tracker",
    target="megatron.core.tensor_parallel.random:_set_cuda_rng_state",
    versions=">=0.16.1,<=0.19.2",
    parameters=("new_state", "device", "graph_safe"),
)


def _set_rng_state_on_cpu(new_state, device=-1, graph_safe=False):
    torch.default_generator.set_state(new_state)


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    RNG_STATE_PATCH.verify()
    mcore_random._set_cuda_rng_state = _set_rng_state_on_cpu


# The MoE router's gating GEMM tests `te_general_gemm is not None`, but 0.16.1 defines that name only
# when Transformer Engine imports: without TE every MoE forward raises NameError. 0.19.2 sets it to
# None; here it is defined as None where missing, which selects Megatron's own torch.mm path.
MOE_ROUTER_GEMM_PATCH = Patch(
    name="define the MoE router's te_general_gemm as None without Transformer Engine",
    target="megatron.core.transformer.moe.moe_utils:RouterGatingLinearFunction.forward",
    versions=">=0.16.1,<=0.19.2",
    parameters=("ctx", "inp", "weight", "bias", "router_dtype"),
)


def _patch_megatron_moe_router() -> None:
    from megatron.core.transformer.moe import moe_utils

    MOE_ROUTER_GEMM_PATCH.verify()
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


# The alltoall token dispatcher hands its split sizes to all_to_all_single through
# maybe_move_tensor_to_cpu(..., as_numpy=True), which converts only CUDA tensors: on CPU the sizes
# stay tensors, which all_to_all_single's binding refuses (TypeError). Seen in 0.16.1 and 0.19.2;
# the replacement does what the function does for a CUDA tensor, for a CPU one.
MOE_SPLITS_TO_NUMPY_PATCH = Patch(
    name="alltoall dispatcher split sizes as numpy on CPU",
    target="megatron.core.transformer.moe.token_dispatcher:maybe_move_tensor_to_cpu",
    versions=">=0.16.1,<=0.19.2",
    parameters=("tensor", "as_numpy", "record_stream"),
)


def _splits_on_cpu(tensor, as_numpy=False, record_stream=False):
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.cpu().numpy()
    return tensor


def _patch_megatron_moe_dispatcher() -> None:
    from megatron.core.transformer.moe import token_dispatcher

    MOE_SPLITS_TO_NUMPY_PATCH.verify()
    token_dispatcher.maybe_move_tensor_to_cpu = _splits_on_cpu


def _run_backward_under_the_mode() -> None:
    """torch.autograd.backward dispatches through torch-function modes, and a mode is off inside its
    own handler: everything a backward pass runs would escape the remap (the custom backward of
    Megatron's MoE all-gather and all-to-all asks for CUDA buffers). The engine call inside it is
    not dispatched, so it re-enters the mode there."""
    import torch.autograd as autograd

    engine_run_backward = autograd._engine_run_backward

    def run_backward_in_mode(*args, **kwargs):
        with _mode:
            return engine_run_backward(*args, **kwargs)

    autograd._engine_run_backward = run_backward_in_mode


def enable_cpu_compat() -> bool:
    """Install the CUDA->CPU remap once per process when CUDA is absent.

    Returns True when the remap is active (no CUDA), False on a CUDA machine (nothing changed).
    """
    global _mode
    if torch.cuda.is_available():
        return False
    with _lock:
        if _mode is None:
            _patch_torch_cuda()
            _patch_megatron_rng()
            _patch_megatron_moe_router()
            _patch_megatron_moe_dispatcher()
            # Megatron's jit_fuser is torch.compile (the MoE router's expert-bias update uses it):
            # dynamo cannot trace under the CUDA->CPU remap mode and trips over the torch.cuda
            # stand-ins above, and a CPU fusion would buy nothing. Compiled functions run eagerly.
            torch._dynamo.config.disable = True
            _mode = _CudaToCpuMode()
            _mode.__enter__()
            _run_backward_under_the_mode()
    return True


def cpu_compat_active() -> bool:
    return _mode is not None
