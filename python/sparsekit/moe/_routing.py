"""MoE routing: :func:`route` (DeepSeek-V3 gate semantics) -> :class:`RoutingPlan`.

CPU tensors run the Rust core (``sparsekit._core.route_plan``: one fused rayon pass per row that also
counts the chosen experts per task, then one parallel stable scatter); CUDA tensors, and CPU tensors inside
``sparsekit.testing.simulated_cuda()``, run the kernels of ``cuda/route.cu`` through
``sparsekit._cuda_route`` with no host synchronisation. Both give the same plan.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from .. import _buffers, _core
from .. import _cuda
from .. import _cuda_route as _cr

SCORES = ("softmax", "sigmoid")
DROP_POLICIES = ("probs", "position")


class RoutingPlan(NamedTuple):
    """Where every token slot goes. ``T`` tokens, ``k`` slots each, ``E`` experts; flat slot ``s = t*k + j``.

    - ``expert_ids [T, k]`` int64: chosen experts, by descending choice score (ties: lower index).
    - ``weights [T, k]``: routing weights from the unbiased scores (normalised if asked, times ``scale``);
      differentiable w.r.t. the logits (never the bias). Dropped slots keep their weight here; the
      combine (:func:`unpermute`) multiplies by ``kept``.
    - ``scores [T, k]``: the chosen experts' unbiased scores (the drop priority of ``"probs"``).
    - ``order [T*k]`` int64: kept slots grouped by expert (ascending expert; token order inside), then
      the dropped slots in slot order. ``inverse``: ``order[inverse[s]] == s``.
    - ``counts [E]`` kept slots per expert; ``offsets [E+1]`` their exclusive scan (expert ``e``'s rows
      of the grouped tensor are ``offsets[e]:offsets[e+1]``).
    - ``kept [T, k]`` bool; ``dropped`` 0-d int64 tensor (slots dropped by capacity);
      ``capacity`` the per-expert capacity used (None: dropless); ``n_experts``, ``k``.
    """

    expert_ids: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor
    order: torch.Tensor
    inverse: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    kept: torch.Tensor
    dropped: torch.Tensor
    capacity: int | None
    n_experts: int
    k: int

    @property
    def num_tokens(self) -> int:
        """T, the number of tokens routed."""
        return int(self.expert_ids.shape[0])


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def capacity_for(num_tokens: int, k: int, n_experts: int, capacity_factor: float | None) -> int | None:
    """Per-expert capacity ``ceil(T*k/E * capacity_factor)`` (None: dropless)."""
    if capacity_factor is None:
        return None
    return int(math.ceil(num_tokens * k / n_experts * capacity_factor))


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _scores(lf: torch.Tensor, score: str) -> torch.Tensor:
    if score == "softmax":
        return torch.softmax(lf, dim=-1)
    if score == "sigmoid":
        return torch.sigmoid(lf)
    return lf


# --------------------------------------------------------------------------- the Rust (CPU) path
def route_topk(choice: torch.Tensor, k: int, n_groups: int = 1, topk_groups: int = 1, group_mode: str = "max") -> torch.Tensor:
    """Rust top-k over precomputed choice scores ``[T, E]`` (float32): the contract of
    ``sparsekit._cuda_route.route_topk`` (ties to the lower index; group limiting) -> ``expert_ids``."""
    x = choice.detach().contiguous()
    T, E = x.shape
    ids = torch.empty((T, k), dtype=torch.int64)
    sel = torch.empty((T, k), dtype=x.dtype)
    w = torch.empty((T, k), dtype=x.dtype)
    _core.route_topk(x.reshape(-1).numpy(), None, str(x.dtype).replace("torch.", ""), E, k, "identity", n_groups, topk_groups,
                     group_mode, False, 1.0, ids.view(-1).numpy(), sel.view(-1).numpy(), w.view(-1).numpy())  # fmt: skip
    return ids


def route_tables(expert_ids: torch.Tensor, n_experts: int, capacity: int | None = None, drop_policy: str = "probs",
                 priority: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Rust routing tables of ``expert_ids [T, k]``: ``(order, inverse, counts, offsets, kept)`` with the
    contract of ``sparsekit._cuda_route.route_tables`` (ids must be in range)."""
    ids = expert_ids.detach().contiguous()
    n = ids.numel()
    order = torch.empty(n, dtype=torch.int64)
    inverse = torch.empty(n, dtype=torch.int64)
    counts = torch.empty(n_experts, dtype=torch.int64)
    offsets = torch.empty(n_experts + 1, dtype=torch.int64)
    kept = torch.empty(ids.shape, dtype=torch.bool)
    prio = None
    if capacity is not None and drop_policy == "probs":
        if priority is None:
            raise ValueError('priority is required for drop_policy="probs" with a capacity')
        prio = priority.detach().to(torch.float32).contiguous().reshape(-1).numpy()
    cap = None if capacity is None else min(int(capacity), n)
    _core.route_tables(ids.reshape(-1).numpy(), n_experts, cap, drop_policy, prio, order.numpy(), inverse.numpy(),
                       counts.numpy(), offsets.numpy(), kept.view(-1).numpy())  # fmt: skip
    return order, inverse, counts, offsets, kept


def _route_rust(logits: torch.Tensor, bias: torch.Tensor | None, k: int, score: str, G: int, TG: int, mode: str,
                normalize: bool, scale: float, capacity: int | None, drop_policy: str) -> tuple[torch.Tensor, ...]:  # fmt: skip
    ct = _compute_dtype(logits)
    x = logits.detach().to(ct).contiguous()
    T, E = x.shape
    n = T * k
    # every output preallocated here and written in place by one Rust call (gate + tables, GIL released)
    # (large ones from the buffer cache: reused across steps, no page faults)
    ids = _buffers.empty((T, k), torch.int64)
    sel = _buffers.empty((T, k), ct)
    w = _buffers.empty((T, k), ct)
    order = _buffers.empty(n, torch.int64)
    inverse = _buffers.empty(n, torch.int64)
    counts = torch.empty(E, dtype=torch.int64)
    offsets = torch.empty(E + 1, dtype=torch.int64)
    kept = _buffers.empty((T, k), torch.bool)
    b = None if bias is None else bias.detach().to(ct).contiguous().numpy()
    _core.route_plan(x.reshape(-1).numpy(), b, str(ct).replace("torch.", ""), E, k, score, G, TG, mode, normalize,
                     float(scale), capacity, drop_policy, ids.view(-1).numpy(), sel.view(-1).numpy(), w.view(-1).numpy(),
                     order.numpy(), inverse.numpy(), counts.numpy(), offsets.numpy(), kept.view(-1).numpy())  # fmt: skip
    return ids, w.to(logits.dtype), sel, order, inverse, counts, offsets, kept


def _route_device(logits: torch.Tensor, bias: torch.Tensor | None, k: int, score: str, G: int, TG: int, mode: str,
                  normalize: bool, scale: float, capacity: int | None, drop_policy: str) -> tuple[torch.Tensor, ...]:  # fmt: skip
    ct = _compute_dtype(logits)
    s = _scores(logits.detach().to(ct), score)
    choice = s if bias is None else s + bias.detach().to(device=s.device, dtype=ct)
    ids, nan_count = _cr.route_topk(choice.to(torch.float32).contiguous(), k, G, TG, mode)
    _raise_flag(nan_count, "logits contains NaN (or +inf / an all -inf row under softmax)", logits)
    sel = torch.gather(s, 1, ids)
    w = (sel / sel.sum(-1, keepdim=True) if normalize else sel) * scale
    t = _cr.route_tables(ids, s.shape[1], capacity, drop_policy, sel.to(torch.float32).contiguous())
    _raise_flag(t.invalid, "internal error: expert ids out of range", logits)
    return ids, w.to(logits.dtype), sel, t.order, t.inverse, t.counts, t.offsets, t.kept


def _raise_flag(flag: torch.Tensor, msg: str, like: torch.Tensor) -> None:
    """A device-side error count: raised eagerly for CPU tensors (the simulation), an async device
    assert (no host sync) on CUDA."""
    if flag.device.type == "cpu":
        if int(flag.sum()) != 0:
            raise ValueError(msg)
    else:
        torch._assert_async(flag.sum() == 0, msg)


# ---------------------------------------------------------------------------- the custom op
@torch.library.custom_op("sparsekit::moe_route", mutates_args=())
def _route_op(logits: torch.Tensor, bias: torch.Tensor | None, k: int, score: str, n_groups: int, topk_groups: int,
              group_mode: str, normalize: bool, scale: float, capacity: int | None, drop_policy: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    fn = _route_device if _cuda.runs_on_device(logits) else _route_rust
    out = fn(logits, bias, k, score, n_groups, topk_groups, group_mode, normalize, scale, capacity, drop_policy)
    return tuple(o.contiguous() for o in out)  # type: ignore[return-value]


@_route_op.register_fake
def _route_fake(logits, bias, k, score, n_groups, topk_groups, group_mode, normalize, scale, capacity, drop_policy):  # type: ignore[no-untyped-def]
    T, E = logits.shape
    ct = _compute_dtype(logits)
    i64 = dict(dtype=torch.int64, device=logits.device)
    return (logits.new_empty((T, k), **i64), logits.new_empty((T, k)), logits.new_empty((T, k), dtype=ct),
            logits.new_empty((T * k,), **i64), logits.new_empty((T * k,), **i64), logits.new_empty((E,), **i64),
            logits.new_empty((E + 1,), **i64), logits.new_empty((T, k), dtype=torch.bool))  # fmt: skip


def _route_setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
    logits, _bias, _k, score, _g, _tg, _mode, normalize, scale, _cap, _pol = inputs
    ctx.save_for_backward(logits, output[0])
    ctx.score, ctx.normalize, ctx.scale = score, normalize, scale


def _route_backward(ctx, g_ids, g_w, *rest):  # type: ignore[no-untyped-def]
    logits, ids = ctx.saved_tensors
    if g_w is None:
        return (None,) * 11
    ct = _compute_dtype(logits)
    s = _scores(logits.to(ct), ctx.score)
    g = g_w.to(ct) * ctx.scale
    sel = torch.gather(s, 1, ids)
    if ctx.normalize:
        total = sel.sum(-1, keepdim=True)
        g = g / total - (g * sel).sum(-1, keepdim=True) / (total * total)
    full = torch.zeros_like(s).scatter(1, ids, g)  # ids distinct per row: a plain scatter, no atomics
    if ctx.score == "softmax":
        grad = s * (full - (full * s).sum(-1, keepdim=True))
    elif ctx.score == "sigmoid":
        grad = full * s * (1 - s)
    else:
        grad = full
    return (grad.to(logits.dtype),) + (None,) * 10


_route_op.register_autograd(_route_backward, setup_context=_route_setup)


# ---------------------------------------------------------------------------- the public function
def route(logits: torch.Tensor, k: int, *, score: str = "softmax", bias: torch.Tensor | None = None,
          n_groups: int | None = None, topk_groups: int | None = None, capacity_factor: float | None = None,
          drop_policy: str = "probs", normalize: bool | None = None, scale: float = 1.0) -> RoutingPlan:  # fmt: skip
    """Route ``logits [T, E]`` to ``k`` experts per token, with DeepSeek-V3's ``Gate`` semantics.

    scores = softmax(logits) or sigmoid(logits) (float32, float64 for float64 logits); the choice adds
    ``bias [E]`` (aux-loss-free balancing; it chooses experts and never weights them); with
    ``n_groups`` only experts of the ``topk_groups`` best groups are chosen (group score: max, or the
    sum of the top two when a bias is given); top-k ties go to the lower expert index. ``weights`` are
    the chosen unbiased scores, divided by their sum when ``normalize`` (default: True for sigmoid,
    False for softmax, as DeepSeek-V3), times ``scale``. ``capacity_factor`` None is dropless; otherwise
    each expert keeps ``ceil(T*k/E * capacity_factor)`` slots: those of highest score (``"probs"``,
    ties to the earlier slot) or the first ones in token order (``"position"``).

    Errors (ValueError/TypeError naming the argument): k <= 0 or k > the experts allowed, topk_groups
    > n_groups, E not divisible by n_groups, NaN logits, +inf logits or all -inf rows under softmax
    (-inf alone is allowed: weight 0), non-finite or wrongly sized bias, bad dtypes/devices.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [tokens, experts], got shape {tuple(logits.shape)}")
    T, E = logits.shape
    if E < 1:
        raise ValueError("logits must have at least one expert column (E = 0)")
    if not _is_int(k):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
    if n_groups is not None and (not _is_int(n_groups) or n_groups < 1):
        raise ValueError(f"n_groups must be a positive int or None, got {n_groups!r}")
    G = 1 if n_groups is None else n_groups
    if E % G:
        raise ValueError(f"n_groups={G} must divide the number of experts E={E}")
    if topk_groups is not None and (not _is_int(topk_groups) or topk_groups < 1):
        raise ValueError(f"topk_groups must be a positive int or None, got {topk_groups!r}")
    TG = G if topk_groups is None else topk_groups
    if TG > G:
        raise ValueError(f"topk_groups={TG} must be <= n_groups={G}")
    allowed = TG * (E // G)
    if k <= 0 or k > allowed:
        raise ValueError(f"k must be in [1, {allowed}] (E={E}, experts in the topk_groups best groups), got {k}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise TypeError("bias must be a floating-point torch.Tensor")
        if tuple(bias.shape) != (E,):
            raise ValueError(f"bias must have shape ({E},) (one per expert), got {tuple(bias.shape)}")
        if bias.device != logits.device:
            raise ValueError(f"bias is on {bias.device}, logits on {logits.device}")
    mode = "top2" if bias is not None else "max"
    if G > 1 and mode == "top2" and E // G < 2:
        raise ValueError(f"with a bias, group scores sum the top two: n_groups={G} leaves < 2 experts per group")
    if capacity_factor is not None:
        if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)) or not capacity_factor > 0 \
                or not math.isfinite(capacity_factor):  # fmt: skip
            raise ValueError(f"capacity_factor must be a positive finite number or None, got {capacity_factor!r}")
    if normalize is None:
        normalize = score == "sigmoid"
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool or None, got {type(normalize).__name__}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    capacity = capacity_for(T, k, E, capacity_factor)
    if not torch.compiler.is_compiling() and logits.device.type == "cpu" and not _cuda.runs_on_device(logits):
        if bias is not None and not bool(torch.isfinite(bias).all()):
            raise ValueError("bias must be finite")
    ids, w, sel, order, inverse, counts, offsets, kept = _route_op(
        logits, bias, k, score, G, TG, mode, normalize, float(scale), capacity, drop_policy
    )
    dropped = T * k - offsets[E]
    return RoutingPlan(ids, w, sel, order, inverse, counts, offsets, kept, dropped, capacity, E, k)


__all__ = ["RoutingPlan", "capacity_for", "route", "route_tables", "route_topk"]
