"""Dispatch and combine: :func:`permute` gathers token copies into expert-grouped order, :func:`unpermute`
combines them back weighted by the routing weights. Both directions are gathers, so forward and backward
are deterministic (no atomics, same bits every run): on CPU tensors Rust kernels
(``sparsekit._core.moe_permute`` / ``moe_gather_sum`` / ``moe_unpermute`` / ``moe_unpermute_backward``: each
output row written by one task, no ``[T*k, d]`` temporaries in the combine), elsewhere ``index_select``.
All are ``torch.library`` custom ops with fake implementations so ``torch.compile`` traces through them;
a double backward (``create_graph=True``) runs differentiable torch gathers."""

from __future__ import annotations

import torch

from .. import _buffers, _core
from .._arrays import DTYPE_TAGS, contiguous_bits
from .. import _cuda
from ._routing import RoutingPlan


def _rust(*ts: torch.Tensor) -> bool:
    """CPU tensors of one supported dtype take the Rust kernels (CUDA tensors, and CPU tensors inside
    ``simulated_cuda()``, take the torch gathers)."""
    t0 = ts[0]
    return (t0.device.type == "cpu" and t0.dtype in DTYPE_TAGS and all(t.dtype == t0.dtype for t in ts)
            and not _cuda.runs_on_device(t0))  # fmt: skip


_flat = contiguous_bits  # the flat numpy view Rust borrows


def _row_width(t: torch.Tensor) -> int:
    d = 1
    for s in t.shape[1:]:
        d *= int(s)
    return d


@torch.library.custom_op("sparsekit::moe_permute", mutates_args=())
def _permute_op(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    if _rust(x):
        x = x.contiguous()
        out = _buffers.empty((order.shape[0],) + tuple(x.shape[1:]), x.dtype)
        _core.moe_permute(_flat(x), _row_width(x), order.numpy(), inverse.numpy(), k, _flat(out), DTYPE_TAGS[x.dtype])
        return out
    return x.index_select(0, torch.div(order, k, rounding_mode="floor"))


@_permute_op.register_fake
def _permute_fake(x, order, inverse, k):  # type: ignore[no-untyped-def]
    return x.new_empty((order.shape[0],) + tuple(x.shape[1:]))


@torch.library.custom_op("sparsekit::moe_gather_sum", mutates_args=())
def _gather_sum_op(g: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    """``gx[t] = sum_j g[inverse[t*k + j]]``: permute's backward (a gather and a fixed-order sum)."""
    T = inverse.shape[0] // k
    if _rust(g):
        g = g.contiguous()
        gx = _buffers.empty((T,) + tuple(g.shape[1:]), g.dtype)
        _core.moe_gather_sum(_flat(g), _row_width(g), order.numpy(), inverse.numpy(), k, _flat(gx), DTYPE_TAGS[g.dtype])
        return gx
    return g.index_select(0, inverse).view(T, k, *g.shape[1:]).sum(1)


@_gather_sum_op.register_fake
def _gather_sum_fake(g, order, inverse, k):  # type: ignore[no-untyped-def]
    return g.new_empty((inverse.shape[0] // k,) + tuple(g.shape[1:]))


def _permute_setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
    x, order, inverse, k = inputs
    ctx.save_for_backward(order, inverse)
    ctx.k, ctx.T = k, x.shape[0]


def _permute_backward(ctx, g):  # type: ignore[no-untyped-def]
    order, inverse = ctx.saved_tensors
    if torch.is_grad_enabled():  # double backward: differentiable torch ops
        return g.index_select(0, inverse).view(ctx.T, ctx.k, *g.shape[1:]).sum(1), None, None, None
    return _gather_sum_op(g, order, inverse, ctx.k), None, None, None


_permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)


@torch.library.custom_op("sparsekit::moe_unpermute", mutates_args=())
def _unpermute_op(y: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    T = weights.shape[0]
    if _rust(y):
        y = y.contiguous()
        w = weights.to(y.dtype).contiguous()
        out = _buffers.empty((T,) + tuple(y.shape[1:]), y.dtype)
        _core.moe_unpermute(_flat(y), _row_width(y), _flat(w), order.numpy(), inverse.numpy(), k, _flat(out),
                            DTYPE_TAGS[y.dtype])  # fmt: skip
        return out
    yy = y.index_select(0, inverse).view(T, k, *y.shape[1:])
    return (yy * weights.to(y.dtype).view(T, k, *([1] * (y.dim() - 1)))).sum(1)


@_unpermute_op.register_fake
def _unpermute_fake(y, weights, order, inverse, k):  # type: ignore[no-untyped-def]
    return y.new_empty((weights.shape[0],) + tuple(y.shape[1:]))


def _unpermute_grads_torch(g, y, weights, order, inverse, k):  # type: ignore[no-untyped-def]
    T = weights.shape[0]
    tok = torch.div(order, k, rounding_mode="floor")
    w_rows = weights.reshape(-1).index_select(0, order).to(g.dtype).view(-1, *([1] * (g.dim() - 1)))
    yy = y.index_select(0, inverse).view(T, k, *y.shape[1:])
    gw = (yy * g.unsqueeze(1)).reshape(T, k, -1).sum(-1).to(weights.dtype)
    return g.index_select(0, tok) * w_rows, gw


@torch.library.custom_op("sparsekit::moe_unpermute_backward", mutates_args=())
def _unpermute_bwd_op(g: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor,
                      k: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gradients of :func:`unpermute` for the output gradient ``g``: ``(grad_y, grad_weights)``, gathers
    (each row of ``grad_y`` written once: ``inverse`` is a permutation)."""
    if _rust(g, y):
        g, y = g.contiguous(), y.contiguous()
        w = weights.to(y.dtype).contiguous()
        gy = _buffers.empty(tuple(y.shape), y.dtype)
        gw = _buffers.empty(tuple(weights.shape), y.dtype)
        _core.moe_unpermute_backward(_flat(g), _flat(y), _row_width(y), _flat(w), order.numpy(), inverse.numpy(), k,
                                     _flat(gy), _flat(gw), DTYPE_TAGS[y.dtype])  # fmt: skip
        return gy, gw.to(weights.dtype)
    gy, gw = _unpermute_grads_torch(g, y, weights, order, inverse, k)
    return gy.contiguous(), gw.contiguous()


@_unpermute_bwd_op.register_fake
def _unpermute_bwd_fake(g, y, weights, order, inverse, k):  # type: ignore[no-untyped-def]
    return torch.empty_like(y), torch.empty_like(weights)


def _unpermute_setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
    y, weights, order, inverse, k = inputs
    ctx.save_for_backward(y, weights, order, inverse)
    ctx.k = k


def _unpermute_backward(ctx, g):  # type: ignore[no-untyped-def]
    y, weights, order, inverse = ctx.saved_tensors
    if torch.is_grad_enabled():  # double backward: differentiable torch ops
        gy, gw = _unpermute_grads_torch(g, y, weights, order, inverse, ctx.k)
    else:
        gy, gw = _unpermute_bwd_op(g, y, weights, order, inverse, ctx.k)
    return gy, gw, None, None, None


_unpermute_op.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


def _check_plan(plan: RoutingPlan) -> None:
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan must be a RoutingPlan (from sparsekit.moe.route), got {type(plan).__name__}")


def permute(x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Token copies ``x [T, ...]`` in expert-grouped order -> ``[T*k, ...]``: row ``p`` is
    ``x[plan.order[p] // k]``; expert ``e``'s rows are ``plan.offsets[e]:plan.offsets[e+1]``, dropped
    slots follow ``offsets[E]``. Backward: a gather through ``plan.inverse`` and a sum over the k copies."""
    _check_plan(plan)
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError("x must be a torch.Tensor with a token dimension")
    if x.shape[0] != plan.num_tokens:
        raise ValueError(f"x has {x.shape[0]} tokens, the plan routes {plan.num_tokens}")
    if x.device != plan.order.device:
        raise ValueError(f"x is on {x.device}, the plan on {plan.order.device}")
    return _permute_op(x, plan.order, plan.inverse, plan.k)


def unpermute(y: torch.Tensor, plan: RoutingPlan, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Combine expert outputs ``y [T*k, ...]`` (grouped order, as from :func:`permute`) back to tokens:
    ``out[t] = sum_j w[t, j] * kept[t, j] * y[inverse[t*k + j]]`` (``w`` = ``plan.weights`` unless given).
    Exact gradients for ``y`` and the weights (so the router trains), all gathers."""
    _check_plan(plan)
    if not isinstance(y, torch.Tensor) or y.dim() < 1:
        raise TypeError("y must be a torch.Tensor with a row dimension")
    n = plan.num_tokens * plan.k
    if y.shape[0] != n:
        raise ValueError(f"y has {y.shape[0]} rows, the plan has T*k = {n} slots")
    if y.device != plan.order.device:
        raise ValueError(f"y is on {y.device}, the plan on {plan.order.device}")
    w = plan.weights if weights is None else weights
    if tuple(w.shape) != tuple(plan.expert_ids.shape):
        raise ValueError(f"weights must have shape {tuple(plan.expert_ids.shape)}, got {tuple(w.shape)}")
    w = w * plan.kept.to(w.dtype)
    return _unpermute_op(y, w, plan.order, plan.inverse, plan.k)


__all__ = ["permute", "unpermute"]
