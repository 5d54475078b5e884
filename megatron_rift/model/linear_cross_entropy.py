"""The output layer and the vocab-parallel cross-entropy computed together, over chunks of tokens
(``--cross-entropy-loss-fusion``): the per-token CE that ``GPTModel(..., labels=...)`` returns,
without a ``[tokens, vocab / TP]`` logits tensor for the whole micro-batch in the forward or the
backward. Only one chunk's logits exist at a time.

Why it is exact
---------------
For a token with final hidden state ``h``, target ``y`` and logits ``z = W h`` (``W`` this rank's
vocabulary rows), ``ce = log sum_j exp(z_j - m) - (z_y - m)`` with ``m = max_j z_j``, and
``d ce / d z = softmax(z) - onehot(y)``. Besides ``h`` and ``W``, the backward needs only two
numbers per token: ``m`` and ``s = sum_j exp(z_j - m)``, the very two that Megatron's
``vocab_parallel_cross_entropy`` all-reduces over the tensor-parallel group. So the forward keeps
``m`` and ``s`` per token and drops each chunk's logits. The backward recomputes them with the same
GEMM on the same inputs, rebuilds ``softmax = exp(z - m) / s`` with Megatron's own operations,
subtracts the one-hot and scales each token's row by its upstream gradient ``g_t``:

    dh = (g (softmax - onehot)) W        summed over TP ranks (all-reduce; reduce-scatter under SP)
    dW = sum_t g_t (softmax_t - onehot_t)^T h_t

``g_t`` can be anything: RIFT's ``r * p`` on negatives, DPO's sequence-level terms, zero on masked
tokens. Nothing is approximated, so the results are the unfused path's up to the order of float
sums (``dW`` is summed chunk by chunk). Computing gradients in the forward (Liger-Kernel's way)
cannot be exact here: ``g_t`` exists only in the backward, and ``dW`` weights each token's outer
product by its own ``g_t``. The price is one extra logits GEMM (the recompute): 4 GEMMs, not 3.

Where the weight gradient goes: with Megatron's DDP (``weight.main_grad`` and its
``grad_added_to_main_grad`` flag exist) each chunk's ``dW`` is added straight into ``main_grad``,
the protocol of Megatron's own gradient-accumulation fusion, so no ``[vocab / TP, hidden]``
gradient tensor is allocated and DDP, the distributed optimizer and the tied embedding's gradient
all-reduce see the sum the unfused path gives. No gradient is returned for the weight then: a tied
embedding's own gradient still reaches DDP's hook (Megatron marks that weight ``zero_out_wgrad``),
and the trainer's DDP does not overlap the gradient reduce (which would need the hook per weight).
Without ``main_grad`` (plain modules, tests) the gradient is returned as usual.

How it attaches (Megatron-Core 0.16-0.19, nothing patched): :func:`use_linear_cross_entropy` swaps
``GPTModel.output_layer`` for :class:`LinearCrossEntropyOutputLayer` (a ``ColumnParallelLinear``
holding the same weight, so checkpoints and state dicts are unchanged) and adds a forward pre-hook
that hands ``labels`` to it and calls GPTModel with ``labels=None``. GPTModel then returns what the
output layer returned, transposed to ``[b, s]``: the per-token CE. Without labels (generation,
logits checks) the layer is a plain ``ColumnParallelLinear``. From 0.18, ``GPTModel.forward``'s
``output_processor`` would be the place; the swap keeps one path for every supported version.
No GPU kernel (cut-cross-entropy, Liger) is used: this portable path is the reference on any device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import ColumnParallelLinear

# Tokens per chunk: a chunk's fp32 logits are chunk x vocab/TP x 4 bytes (Qwen2.5's 151,936-token
# vocabulary: 311 MB at TP=1). benchmarks/output_layer.py measured the trade-off.
DEFAULT_CHUNK_TOKENS = 512
# Vocabulary rows per low-precision weight-gradient GEMM (a 12 MB block at hidden 1536).
_WGRAD_ROWS = 4096


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _gather_sequence(hidden: torch.Tensor, group) -> torch.Tensor:
    """Sequence parallelism: every rank's [n / TP, h] rows, in rank order, as [n, h]."""
    total = hidden.new_empty((_group_size(group) * hidden.shape[0], *hidden.shape[1:]))
    dist.all_gather_into_tensor(total, hidden.contiguous(), group=group)
    return total


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits [c, v/tp] of one chunk, rounded like the unfused path (GEMM in the weight's
    dtype, then ``.float()`` as ``vocab_parallel_cross_entropy`` does)."""
    return torch.matmul(hidden, weight.t()).float()


def _weight_grad_target(weight: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(the buffer dW is summed into, whether it is Megatron DDP's ``main_grad``)."""
    main_grad = getattr(weight, "main_grad", None)
    if main_grad is not None and hasattr(weight, "grad_added_to_main_grad"):
        weight.grad_added_to_main_grad = True  # DDP's hook then skips adding a param.grad
        return main_grad, True
    # Summed in fp32 at least (a bf16 weight's gradient is rounded once, at the end).
    dtype = torch.promote_types(weight.dtype, torch.float32)
    return torch.zeros(weight.shape, dtype=dtype, device=weight.device), False


def _add_weight_grad(total: torch.Tensor, grad: torch.Tensor, hidden: torch.Tensor) -> None:
    """``total += grad.T @ hidden`` ([v, h] += [c, v].T @ [c, h]) without a [v, h] temporary."""
    if grad.dtype == total.dtype:
        total.addmm_(grad.t(), hidden.to(total.dtype))
        return
    # A bf16 GEMM cannot accumulate into an fp32 buffer in place (CPU torch has no out_dtype):
    # GEMM in the weight's dtype, as the unfused path does, a block of vocabulary rows at a time.
    for v0 in range(0, total.shape[0], _WGRAD_ROWS):
        v1 = min(total.shape[0], v0 + _WGRAD_ROWS)
        total[v0:v1] += torch.matmul(grad[:, v0:v1].t(), hidden)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """ce[n] of logits ``hidden[n, h] @ weight[v, h].T`` against ``labels[n]`` (global vocabulary
    ids; this rank holds ids ``[rank * v, (rank + 1) * v)``), ``chunk`` tokens at a time. Under
    sequence parallelism ``hidden`` is this rank's ``[n / TP, h]`` rows (gathered in the forward and
    again in the backward, as Megatron's linear layers do, so only the shard is saved)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, tp_group, sequence_parallel):
        tp = _group_size(tp_group)
        total = _gather_sequence(hidden, tp_group) if sequence_parallel else hidden
        shard = weight.shape[0]
        first = (dist.get_rank(tp_group) if tp > 1 else 0) * shard
        target = labels - first
        elsewhere = (target < 0) | (target >= shard)  # the target's logit lives on another rank
        target = target.masked_fill(elsewhere, 0)
        n = total.shape[0]
        stats = torch.empty(2, n, dtype=torch.float32, device=total.device)  # max, sum of exp
        ce = torch.empty(n, dtype=torch.float32, device=total.device)
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            logits = _chunk_logits(total[lo:hi], weight)
            peak = logits.max(dim=-1).values
            if tp > 1:
                dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=tp_group)
            logits -= peak.unsqueeze(-1)
            picked = logits.gather(1, target[lo:hi, None]).squeeze(1)
            picked.masked_fill_(elsewhere[lo:hi], 0.0)
            summed = torch.stack([picked, logits.exp_().sum(dim=-1)])
            if tp > 1:  # Megatron's two SUM all-reduces (target logit, sum of exp) in one call
                dist.all_reduce(summed, group=tp_group)
            ce[lo:hi] = torch.log(summed[1]) - summed[0]
            stats[0, lo:hi], stats[1, lo:hi] = peak, summed[1]
            del logits
        ctx.save_for_backward(hidden, weight, target, elsewhere, stats)
        ctx.chunk, ctx.tp_group, ctx.sequence_parallel = chunk, tp_group, sequence_parallel
        return ce

    @staticmethod
    def backward(ctx, grad_ce):
        hidden, weight, target, elsewhere, stats = ctx.saved_tensors
        tp_group, sequence_parallel = ctx.tp_group, ctx.sequence_parallel
        total = _gather_sequence(hidden, tp_group) if sequence_parallel else hidden
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_total = torch.empty_like(total) if want_hidden else None
        grad_weight, into_main_grad = _weight_grad_target(weight) if want_weight else (None, False)
        keep = 1.0 - elsewhere.float()  # Megatron's softmax_update: 0 where another rank holds y
        n, chunk = total.shape[0], ctx.chunk
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            # softmax - onehot, scaled by each token's upstream gradient: the operations of
            # vocab_parallel_cross_entropy's forward and backward, on recomputed logits.
            grad = _chunk_logits(total[lo:hi], weight)
            grad -= stats[0, lo:hi].unsqueeze(-1)
            grad.exp_().div_(stats[1, lo:hi].unsqueeze(-1))
            rows = torch.arange(hi - lo, device=grad.device)
            grad[rows, target[lo:hi]] -= keep[lo:hi]
            grad *= grad_ce[lo:hi].unsqueeze(-1)
            grad = grad.to(weight.dtype)  # the unfused path's dgrad/wgrad GEMMs take this dtype
            if want_hidden:
                torch.matmul(grad, weight, out=grad_total[lo:hi])
            if want_weight:
                _add_weight_grad(grad_weight, grad, total[lo:hi])
            del grad
        grad_hidden = grad_total
        if want_hidden and _group_size(tp_group) > 1:
            # Each rank's vocabulary shard contributes to every token's dh: sum them, as
            # ColumnParallelLinear does (all-reduce; reduce-scatter back to the shards under SP).
            if sequence_parallel:
                grad_hidden = torch.empty_like(hidden)
                dist.reduce_scatter_tensor(grad_hidden, grad_total, group=tp_group)
            else:
                dist.all_reduce(grad_hidden, group=tp_group)
        if into_main_grad:
            grad_weight = None  # already in main_grad
        elif want_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    tp_group=None,
    sequence_parallel: bool = False,
) -> torch.Tensor:
    """Per-token cross-entropy [s, b] of the logits ``hidden @ weight.T``, never materialized whole.

    ``hidden`` [s, b, h] (this rank's [s / TP, b, h] under sequence parallelism), ``weight``
    [vocab / TP, h] (this rank's vocabulary shard), ``labels`` [s, b] global token ids. The
    hidden states' gradient is reduced over ``tp_group`` as ``ColumnParallelLinear``'s is (direct
    ``torch.distributed`` calls, which also run on gloo).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    sequence_parallel = sequence_parallel and _group_size(tp_group) > 1
    s, b = labels.shape
    rows = s // _group_size(tp_group) if sequence_parallel else s
    if tuple(hidden.shape[:2]) != (rows, b):
        raise ValueError(
            f"hidden states {tuple(hidden.shape)} do not match labels [s, b] = {(s, b)}"
            + (" (sequence parallel: s / TP rows)" if sequence_parallel else "")
        )
    ce = _ChunkedLinearCrossEntropy.apply(
        hidden.reshape(rows * b, -1),
        weight,
        labels.reshape(-1),
        chunk_tokens,
        tp_group,
        sequence_parallel,
    )
    return ce.view(s, b)


class LinearCrossEntropyOutputLayer(ColumnParallelLinear):
    """GPTModel's output layer, computing the per-token CE itself when labels were handed to it
    (by :func:`use_linear_cross_entropy`'s hook); otherwise Megatron's ``ColumnParallelLinear``."""

    @classmethod
    def replacing(cls, layer: ColumnParallelLinear, chunk_tokens: int):
        """A layer built like ``layer`` (no new weight, no initialization) holding its weight."""
        new = cls(
            layer.input_size,
            layer.output_size,
            config=layer.config,
            init_method=layer.config.init_method,
            bias=False,
            gather_output=layer.gather_output,
            skip_weight_param_allocation=True,
            embedding_activation_buffer=layer.embedding_activation_buffer,
            grad_output_buffer=layer.grad_output_buffer,
            tp_group=layer.tp_group,
        )
        if layer.weight is not None:  # None: tied to the embedding on this stage
            new.weight = layer.weight
        new.chunk_tokens = chunk_tokens
        new.pending_labels = None
        return new

    def forward(self, input_, weight=None, runtime_gather_output=None):
        labels, self.pending_labels = self.pending_labels, None
        if labels is None:
            return super().forward(input_, weight, runtime_gather_output)
        weight = self.weight if weight is None else weight
        ce = linear_cross_entropy(
            input_,
            weight,
            labels.transpose(0, 1),  # GPTModel's labels are [b, s]
            self.chunk_tokens,
            self.tp_group,
            self.sequence_parallel,
        )
        return ce, None  # GPTModel (labels=None) returns it as [b, s]


def _hand_labels_to_output_layer(model, args, kwargs):
    labels = kwargs.get("labels")
    if labels is None and len(args) > 4:  # forward(input_ids, position_ids, mask, decoder, labels)
        labels, args = args[4], (*args[:4], None, *args[5:])
    if labels is None:
        return None
    model.output_layer.pending_labels = labels
    return args, {**kwargs, "labels": None}


def _check_labels_consumed(model, args, output):
    if model.output_layer.pending_labels is not None:
        model.output_layer.pending_labels = None
        raise RuntimeError(
            "GPTModel did not call its output layer with the labels handed to it: this "
            "Megatron-Core version computes its output differently; run without "
            "--cross-entropy-loss-fusion"
        )


def use_linear_cross_entropy(model, chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
    """Make ``model`` (a ``GPTModel``; a last pipeline stage) compute ``forward(..., labels=...)``
    with :func:`linear_cross_entropy`. A stage without the output layer is left as it is.
    Returns ``model``."""
    if not model.post_process:
        return model
    config = model.config
    problems = []
    if type(model.output_layer) is not ColumnParallelLinear:
        problems.append(f"its output layer is a {type(model.output_layer).__name__}")
    if getattr(config, "mtp_num_layers", None):
        problems.append("multi-token prediction calls the output layer several times")
    if getattr(config, "defer_embedding_wgrad_compute", False):
        problems.append("defer_embedding_wgrad_compute defers the output layer's weight gradient")
    if getattr(config, "use_mup", False):
        problems.append("MuP scales the logits after the output layer")
    if problems:
        raise ValueError(
            "--cross-entropy-loss-fusion cannot be used with this model: " + "; ".join(problems)
        )
    model.output_layer = LinearCrossEntropyOutputLayer.replacing(model.output_layer, chunk_tokens)
    model.register_forward_pre_hook(_hand_labels_to_output_layer, with_kwargs=True)
    model.register_forward_hook(_check_labels_consumed, always_call=True)
    return model
