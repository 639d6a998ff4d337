"""The MoE layer: a drop-in FFN of SwiGLU experts, each run over its contiguous slice of grouped tokens."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._dispatch import permute, unpermute
from ._routing import RoutingPlan, route
from .balance import LoadBalancer, switch_loss


def _swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ w1.t()) * (x @ w3.t())) @ w2.t()


@torch.library.custom_op("sparsekit::moe_experts", mutates_args=())
def _experts_op(xp: torch.Tensor, offsets: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(out, h1, h3)``: the expert outputs and the two gate pre-activations, kept for the backward
    (recomputing them there would cost two of the forward's three matmuls again, as torch autograd
    of the same loop would not)."""
    n, d_ff = xp.shape[0], w1.shape[1]
    out = xp.new_zeros((n, w2.shape[1]))
    h1, h3 = xp.new_zeros((n, d_ff)), xp.new_zeros((n, d_ff))
    off = offsets.tolist()
    for e in range(w1.shape[0]):
        a, b = off[e], off[e + 1]
        if b > a:
            x = xp[a:b]
            torch.matmul(x, w1[e].t(), out=h1[a:b])
            torch.matmul(x, w3[e].t(), out=h3[a:b])
            torch.matmul(F.silu(h1[a:b]) * h3[a:b], w2[e].t(), out=out[a:b])
    return out, h1, h3


@_experts_op.register_fake
def _experts_fake(xp, offsets, w1, w3, w2):  # type: ignore[no-untyped-def]
    n, d_ff = xp.shape[0], w1.shape[1]
    return xp.new_empty((n, w2.shape[1])), xp.new_empty((n, d_ff)), xp.new_empty((n, d_ff))


@torch.library.custom_op("sparsekit::moe_experts_backward", mutates_args=())
def _experts_bwd_op(g: torch.Tensor, xp: torch.Tensor, h1: torch.Tensor, h3: torch.Tensor, offsets: torch.Tensor,
                    w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                    need_gx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    gx = torch.zeros_like(xp)  # stays zero without need_gx (the input needs no gradient: two matmuls saved)
    g1, g3, g2 = torch.zeros_like(w1), torch.zeros_like(w3), torch.zeros_like(w2)
    off = offsets.tolist()
    for e in range(w1.shape[0]):
        a, b = off[e], off[e + 1]
        if b <= a:
            continue
        x, dy, p1, p3 = xp[a:b], g[a:b], h1[a:b], h3[a:b]
        sig = torch.sigmoid(p1)
        s1 = p1 * sig  # silu
        g2[e] = dy.t() @ (s1 * p3)
        dh = dy @ w2[e]
        d1 = dh * p3 * (sig * (1 + p1 * (1 - sig)))
        d3 = dh * s1
        g1[e] = d1.t() @ x
        g3[e] = d3.t() @ x
        if need_gx:
            gx[a:b] = d1 @ w1[e] + d3 @ w3[e]
    return gx, g1, g3, g2


@_experts_bwd_op.register_fake
def _experts_bwd_fake(g, xp, h1, h3, offsets, w1, w3, w2, need_gx):  # type: ignore[no-untyped-def]
    return torch.empty_like(xp), torch.empty_like(w1), torch.empty_like(w3), torch.empty_like(w2)


def _experts_setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
    xp, offsets, w1, w3, w2 = inputs
    _, h1, h3 = output
    ctx.mark_non_differentiable(h1, h3)
    ctx.save_for_backward(xp, h1, h3, offsets, w1, w3, w2)


def _experts_backward(ctx, g, _g1, _g3):  # type: ignore[no-untyped-def]
    xp, h1, h3, offsets, w1, w3, w2 = ctx.saved_tensors
    need_gx = bool(ctx.needs_input_grad[0])
    gx, g1, g3, g2 = _experts_bwd_op(g.contiguous(), xp, h1, h3, offsets, w1, w3, w2, need_gx)
    return gx if need_gx else None, None, g1, g3, g2


_experts_op.register_autograd(_experts_backward, setup_context=_experts_setup)


def grouped_swiglu(xp: torch.Tensor, offsets: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert ``e`` over rows ``offsets[e]:offsets[e+1]`` of ``xp``; rows past ``offsets[E]``
    (dropped slots) give zeros. ``w1, w3 [E, d_ff, d]``, ``w2 [E, d, d_ff]``. The backward uses the two
    ``[rows, d_ff]`` pre-activations saved by the forward (the memory torch autograd of the loop keeps too)."""
    return _experts_op(xp, offsets, w1, w3, w2)[0]


class MoE(nn.Module):
    """Mixture-of-Experts FFN: ``y = sum_j w_j * Expert_{e_j}(x) (+ shared experts)`` per token.

    Args: ``d_model``, ``d_ff`` (hidden size of each SwiGLU expert), ``n_experts``, ``k``; ``n_shared``
    always-on shared experts (one SwiGLU of hidden ``n_shared * d_ff``); ``score``, ``n_groups``,
    ``topk_groups``, ``capacity_factor``, ``drop_policy``, ``normalize``, ``scale`` as in
    :func:`sparsekit.moe.route`; ``balancer``: ``"aux_free"`` (a per-expert bias chooses experts,
    updated by :meth:`balancer_step`), ``"aux_loss"`` (``self.aux_loss`` holds the Switch loss of the
    last call, times ``aux_loss_coef``; add it to your loss) or ``"none"``; ``rate``, ``ema`` for the
    :class:`LoadBalancer`; ``process_group`` to all-reduce counts across data-parallel ranks.

    ``expert_parallel_group`` (a ``torch.distributed`` process group, or ``True`` for the default group):
    the experts are split over its ``W`` ranks (``n_experts`` divisible by ``W``); this rank holds experts
    ``[rank*E/W, (rank+1)*E/W)`` only (``w1``/``w3``/``w2`` have ``E/W`` rows; the others are never
    materialised) and tokens travel to their experts' ranks by all-to-all (see
    :mod:`sparsekit.moe.expert_parallel`). The router (``gate``), the shared experts and ``expert_bias`` are
    replicated and must start equal on every rank; their gradients are per-rank and need the data-parallel
    all-reduce (DDP or :class:`sparsekit.comm.GradientSync`; keep the experts out of it, and if it averages
    over ``W`` ranks divide the expert gradients by ``W`` too: see docs/moe.md). Without ``process_group``
    the balancer sums counts over the expert-parallel group. ``state_dict()`` holds this rank's experts;
    :meth:`full_state_dict` gathers all of them, :meth:`load_full_state_dict` loads this rank's slice.

    After a forward: :attr:`last_plan` (the :class:`RoutingPlan`), :meth:`last_counts` (tokens per
    expert of the last forward) and :meth:`balance_stats`. Once per optimizer step call
    :meth:`balancer_step`.
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int, k: int, *, n_shared: int = 0, score: str = "softmax",
                 balancer: str = "aux_free", n_groups: int | None = None, topk_groups: int | None = None,
                 capacity_factor: float | None = None, drop_policy: str = "probs", normalize: bool | None = None,
                 scale: float = 1.0, rate: float = 1e-3, ema: float = 0.9, aux_loss_coef: float = 1e-2,
                 process_group: Any = None, expert_parallel_group: Any = None, device: Any = None,
                 dtype: torch.dtype | None = None) -> None:  # fmt: skip
        super().__init__()
        for name, v in (("d_model", d_model), ("d_ff", d_ff), ("n_experts", n_experts), ("k", k)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if k > n_experts:
            raise ValueError(f"k={k} must be <= n_experts={n_experts}")
        if isinstance(n_shared, bool) or not isinstance(n_shared, int) or n_shared < 0:
            raise ValueError(f"n_shared must be an int >= 0, got {n_shared!r}")
        self.d_model, self.d_ff, self.n_experts, self.k, self.n_shared = d_model, d_ff, n_experts, k, n_shared
        self.route_kwargs = dict(score=score, n_groups=n_groups, topk_groups=topk_groups, capacity_factor=capacity_factor,
                                 drop_policy=drop_policy, normalize=normalize, scale=scale)  # fmt: skip
        # expert parallelism: this rank's block of experts (the whole range without a group)
        self._ep_group: Any = None
        self.ep_world_size, self.ep_rank, self.n_local_experts = 1, 0, n_experts
        if expert_parallel_group is not None:
            import torch.distributed as dist

            from .expert_parallel import resolve_group

            if not dist.is_available() or not dist.is_initialized():
                raise ValueError("expert_parallel_group needs torch.distributed initialised (init_process_group)")
            self._ep_group = resolve_group(expert_parallel_group)
            self.ep_world_size = dist.get_world_size(self._ep_group)
            self.ep_rank = dist.get_rank(self._ep_group)
            if n_experts % self.ep_world_size:
                raise ValueError(f"n_experts={n_experts} must be divisible by the expert_parallel_group size "
                                 f"{self.ep_world_size}")  # fmt: skip
            self.n_local_experts = n_experts // self.ep_world_size
            if process_group is None:  # the replicated bias must see the counts of every rank routing with it
                process_group = self._ep_group
        self.expert_offset = self.ep_rank * self.n_local_experts
        self._ep_checked = False
        self.balancer = LoadBalancer(n_experts, method=balancer, rate=rate, ema=ema, process_group=process_group)
        self.aux_loss_coef = aux_loss_coef
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        el = self.n_local_experts
        self.gate = nn.Parameter(torch.empty(n_experts, d_model, **fk))
        self.w1 = nn.Parameter(torch.empty(el, d_ff, d_model, **fk))
        self.w3 = nn.Parameter(torch.empty(el, d_ff, d_model, **fk))
        self.w2 = nn.Parameter(torch.empty(el, d_model, d_ff, **fk))
        self.expert_bias: torch.Tensor
        self.register_buffer("expert_bias", torch.zeros(n_experts, dtype=torch.float32, device=device))
        if n_shared:
            hs = n_shared * d_ff
            self.s1 = nn.Parameter(torch.empty(hs, d_model, **fk))
            self.s3 = nn.Parameter(torch.empty(hs, d_model, **fk))
            self.s2 = nn.Parameter(torch.empty(d_model, hs, **fk))
        self.reset_parameters()
        self.last_plan: RoutingPlan | None = None
        self.aux_loss: torch.Tensor | None = None

    def reset_parameters(self) -> None:
        """Kaiming-uniform style init of every weight (bias reset to zero)."""
        for name, p in self.named_parameters():
            fan_in = p.shape[-1]
            nn.init.uniform_(p, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        self.expert_bias.zero_()

    @property
    def expert_parallel_group(self) -> Any:
        """The expert-parallel process group (None: every expert is local)."""
        return self._ep_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., d_model]`` -> ``[..., d_model]``. With an ``expert_parallel_group`` this is a collective:
        every rank of the group calls it (and its backward), each with its own tokens (any count, zero too)."""
        if self._ep_group is not None:
            from .expert_parallel import ep_forward

            y, plan, logits, h = ep_forward(self, x)
        else:
            if x.shape[-1] != self.d_model:
                raise ValueError(f"x has last dimension {x.shape[-1]}, expected d_model={self.d_model}")
            h = x.reshape(-1, self.d_model)
            logits = h @ self.gate.t()
            bias = self.expert_bias if self.balancer.method == "aux_free" else None
            plan = route(logits, self.k, bias=bias, **self.route_kwargs)  # type: ignore[arg-type]
            yp = grouped_swiglu(permute(h, plan), plan.offsets, self.w1, self.w3, self.w2)
            y = unpermute(yp, plan)
        if self.n_shared:
            y = y + _swiglu(h, self.s1, self.s3, self.s2)
        if self.balancer.method == "aux_loss":
            probs = torch.softmax(logits.float(), -1) if self.route_kwargs["score"] == "softmax" else torch.sigmoid(logits.float())
            self.aux_loss = self.aux_loss_coef * switch_loss(probs, plan.expert_ids, self.n_experts)
        if not torch.compiler.is_compiling():
            self.last_plan = plan
            self.balancer.observe(plan)
        return y.reshape(x.shape)

    def last_counts(self) -> torch.Tensor:
        """Tokens (kept slots) per expert of the last forward, a tensor ``[E]`` (int64)."""
        if self.last_plan is None:
            raise RuntimeError("last_counts() needs a forward call first")
        return self.last_plan.counts

    def balancer_step(self) -> torch.Tensor | None:
        """Once per optimizer step: reduce this step's counts (across ranks with a process group), update
        the counters and, for ``balancer="aux_free"``, the expert bias (``b_i += rate*sign(mean(c)-c_i)``);
        a no-op for the bias with ``"none"`` / ``"aux_loss"``. Returns the step's counts."""
        return self.balancer.step(self.expert_bias)

    def balance_stats(self) -> dict[str, float]:
        """Imbalance report of the last balancer step (see :meth:`LoadBalancer.stats`)."""
        return self.balancer.stats()

    def full_state_dict(self, dst: int = 0) -> dict[str, torch.Tensor] | None:
        """The state with every expert (``w1``/``w3`` ``[E, d_ff, d]``, ``w2 [E, d, d_ff]``), loadable into a
        one-process layer of the same configuration. Expert parallel: a collective gathering the experts to
        group rank ``dst`` (the others get None); otherwise ``state_dict()``."""
        if self._ep_group is None:
            return {k: v.detach().clone() for k, v in self.state_dict().items()}
        from .expert_parallel import full_state_dict

        return full_state_dict(self, dst)

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state with every expert (from :meth:`full_state_dict` or a one-process layer): replicated
        tensors as they are, this rank's slice ``[expert_offset, expert_offset + n_local_experts)`` of the
        experts."""
        lo, hi = self.expert_offset, self.expert_offset + self.n_local_experts
        local = {}
        for name, t in state.items():
            if name in ("w1", "w2", "w3"):
                if t.shape[0] != self.n_experts:
                    raise ValueError(f"state[{name!r}] has {t.shape[0]} experts, expected n_experts={self.n_experts}")
                t = t[lo:hi]
            local[name] = t
        self.load_state_dict(local)


__all__ = ["MoE", "grouped_swiglu"]
