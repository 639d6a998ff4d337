"""Dispatch and combine: :func:`permute` gathers token copies into expert-grouped order, :func:`unpermute`
combines them back weighted by the routing weights. Both directions are gathers (``index_select``), so
forward and backward are deterministic (no atomics, same bits every run); registered as
``torch.library`` custom ops with fake implementations so ``torch.compile`` traces through them."""

from __future__ import annotations

import torch

from ._routing import RoutingPlan


@torch.library.custom_op("sparsekit::moe_permute", mutates_args=())
def _permute_op(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    return x.index_select(0, torch.div(order, k, rounding_mode="floor"))


@_permute_op.register_fake
def _permute_fake(x, order, inverse, k):  # type: ignore[no-untyped-def]
    return x.new_empty((order.shape[0],) + tuple(x.shape[1:]))


def _permute_setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
    x, order, inverse, k = inputs
    ctx.save_for_backward(inverse)
    ctx.k, ctx.T = k, x.shape[0]


def _permute_backward(ctx, g):  # type: ignore[no-untyped-def]
    (inverse,) = ctx.saved_tensors
    gx = g.index_select(0, inverse).view(ctx.T, ctx.k, *g.shape[1:]).sum(1)  # gather, then a fixed-order sum
    return gx, None, None, None


_permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)


@torch.library.custom_op("sparsekit::moe_unpermute", mutates_args=())
def _unpermute_op(y: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    T = weights.shape[0]
    yy = y.index_select(0, inverse).view(T, k, *y.shape[1:])
    w = weights.to(y.dtype).view(T, k, *([1] * (y.dim() - 1)))
    return (yy * w).sum(1)


@_unpermute_op.register_fake
def _unpermute_fake(y, weights, order, inverse, k):  # type: ignore[no-untyped-def]
    return y.new_empty((weights.shape[0],) + tuple(y.shape[1:]))


def _unpermute_setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
    y, weights, order, inverse, k = inputs
    ctx.save_for_backward(y, weights, order, inverse)
    ctx.k = k


def _unpermute_backward(ctx, g):  # type: ignore[no-untyped-def]
    y, weights, order, inverse = ctx.saved_tensors
    k = ctx.k
    T = weights.shape[0]
    tok = torch.div(order, k, rounding_mode="floor")
    w_rows = weights.reshape(-1).index_select(0, order).to(g.dtype).view(-1, *([1] * (g.dim() - 1)))
    gy = g.index_select(0, tok) * w_rows
    yy = y.index_select(0, inverse).view(T, k, *y.shape[1:])
    gw = (yy * g.unsqueeze(1)).reshape(T, k, -1).sum(-1).to(weights.dtype)
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
