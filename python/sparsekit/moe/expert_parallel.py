"""Expert parallelism for :class:`sparsekit.moe.MoE` over a ``torch.distributed`` process group.

The ``E`` experts are split across the ``W`` ranks of the expert-parallel group: rank ``r`` holds experts
``[r*E/W, (r+1)*E/W)``. Every rank routes its own tokens with the replicated router, then

1. the per-expert kept counts (plus a small fixed header) go to their owners with ONE ``all_to_all_single``
   of int64; the received counts and this rank's counts come to the host in one copy: that copy is the
   single host synchronisation of the forward (``all_to_all_single`` needs its split sizes as Python ints);
2. the token rows (already contiguous per expert in the plan's grouped order, so the rows for rank ``r`` are
   one slice) go out with ``all_to_all_single``; the received rows, grouped by source rank then expert, are
   reordered so each local expert sees one contiguous slab (source ranks in rank order: deterministic, and
   the same rows in the same order as a one-process run on the concatenated batch);
3. the local experts run, the rows are put back in source-rank order and return with the reverse
   ``all_to_all_single``; the combine (:func:`unpermute`) weights them as in the one-process layer.

The backward runs the two all-to-alls in reverse with the split sizes kept from the forward (no host sync).
Every check that can fail on one rank only (bad input, NaN logits) is reported through the header of the
counts exchange, so every rank raises instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

from typing import Any

import torch

from ._dispatch import permute, unpermute
from ._routing import route

#: header fields carried in front of the counts for every destination rank. ``grad`` (bit 0: the token rows
#: need a gradient, bit 1: the local experts' weights do) must agree: it decides which of the two reverse
#: all-to-alls the backward runs, and ranks that disagree would wait for each other there forever.
_HEADER = ("status", "n_experts", "d_model", "d_ff", "k", "dtype", "grad")
_DTYPE_CODES = {torch.float32: 1, torch.float64: 2, torch.float16: 3, torch.bfloat16: 4}


def resolve_group(group: Any) -> Any:
    """``True`` means the default (world) group; anything else is passed to ``torch.distributed`` as is."""
    import torch.distributed as dist

    if group is True:
        return dist.group.WORLD
    return group


def send_split_sizes(counts: torch.Tensor | list[int], world_size: int) -> list[int]:
    """Rows this rank sends to each rank: the plan's per-expert kept ``counts [E]`` summed over each rank's
    contiguous block of ``E / world_size`` experts (the plan groups rows by ascending expert, so the rows
    for rank ``r`` are one slice of the grouped tensor)."""
    c = torch.as_tensor(counts, dtype=torch.int64).reshape(-1)
    if world_size < 1 or c.numel() % world_size:
        raise ValueError(f"n_experts={c.numel()} must be divisible by the world size {world_size}")
    return [int(v) for v in c.view(world_size, -1).sum(1).tolist()]


def expert_major_index(recv_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``recv_counts [W, E_local]``: rows received from rank ``s`` for local expert ``e``, laid out rank-major
    (all of rank 0's rows by expert, then rank 1's, ...). Returns ``(perm, inv)`` (int64, CPU): ``rows[perm]``
    is expert-major (expert 0's rows from rank 0, 1, ..., then expert 1's, ...), ``rows_em[inv]`` undoes it.
    O(rows), no sort."""
    rc = torch.as_tensor(recv_counts, dtype=torch.int64)
    if rc.dim() != 2 or bool((rc < 0).any()):
        raise ValueError("recv_counts must be a [W, E_local] tensor of counts >= 0")
    n = int(rc.sum())
    src_start = (torch.cumsum(rc.reshape(-1), 0) - rc.reshape(-1)).view(rc.shape)  # segment starts, rank-major
    lens_em = rc.t().reshape(-1)  # segment lengths in expert-major order
    starts_em = src_start.t().reshape(-1)
    dst_start = torch.cumsum(lens_em, 0) - lens_em
    perm = torch.repeat_interleave(starts_em - dst_start, lens_em, output_size=n) + torch.arange(n)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(n)
    return perm, inv


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of rows with autograd: the backward is the reverse exchange with the split sizes
    swapped. (``torch.distributed.nn.functional.all_to_all_single`` does this too but is deprecated and warns
    on every call in the installed torch; the functional-collectives replacement is private.)"""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):  # type: ignore[no-untyped-def, override]
        import torch.distributed as dist

        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        x = x.contiguous()
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        return _AllToAll.apply(g, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


class _Reorder(torch.autograd.Function):
    """``x[perm]`` for a permutation ``perm`` with inverse ``inv``: a gather both ways (no atomics)."""

    @staticmethod
    def forward(ctx, x, perm, inv):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(inv)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        (inv,) = ctx.saved_tensors
        return g.index_select(0, inv), None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any = None) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` of the rows of ``x``: ``in_splits[r]`` rows go to rank ``r``,
    ``out_splits[r]`` rows come from it. Its backward is the reverse exchange (every rank must run it)."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), resolve_group(group))


def check_config(layer: Any) -> None:
    """Once per layer (first forward): an ``all_gather`` of a fixed-size vector of the layer's configuration,
    so ranks holding different layers get a clear error on every rank. It must be fixed-size: gloo aborts the
    process (or fills garbage) when the chunk sizes of an all-to-all differ across ranks."""
    import torch.distributed as dist

    group = layer._ep_group
    mine = torch.tensor([layer.n_experts, layer.d_model, layer.d_ff, layer.k, layer.ep_world_size, layer.n_shared],
                        dtype=torch.int64, device=layer.gate.device)  # fmt: skip
    got = [torch.empty_like(mine) for _ in range(layer.ep_world_size)]
    dist.all_gather(got, mine, group=group)
    rows = [g.tolist() for g in got]
    if any(r != rows[0] for r in rows):
        names = ("n_experts", "d_model", "d_ff", "k", "world_size", "n_shared")
        desc = "; ".join(f"rank {i}: " + ", ".join(f"{n}={v}" for n, v in zip(names, r)) for i, r in enumerate(rows))
        raise ValueError(f"expert_parallel_group: the ranks hold MoE layers of different configurations ({desc})")
    layer._ep_checked = True


def ep_forward(layer: Any, x: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
    """Expert-parallel forward of ``layer`` (a :class:`MoE` with ``expert_parallel_group``) on this rank's
    ``x [..., d_model]``. Returns ``(y [T, d], plan, logits, h)``."""
    import torch.distributed as dist

    if not getattr(layer, "_ep_checked", False):
        check_config(layer)
    group, W, El, E = layer._ep_group, layer.ep_world_size, layer.n_local_experts, layer.n_experts
    dev = layer.gate.device
    err: BaseException | None = None
    plan = logits = h = xp = None
    try:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != layer.d_model:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected [..., d_model={layer.d_model}]")
        if x.dtype not in _DTYPE_CODES:
            raise TypeError(f"x must be a floating tensor (float32/float64/float16/bfloat16), got {x.dtype}")
        if x.device != dev:
            raise ValueError(f"x is on {x.device}, the layer on {dev}")
        h = x.reshape(-1, layer.d_model)
        logits = h @ layer.gate.t()
        bias = layer.expert_bias if layer.balancer.method == "aux_free" else None
        plan = route(logits, layer.k, bias=bias, **layer.route_kwargs)
        xp = permute(h, plan)
        counts = plan.counts.to(torch.int64)
        code = _DTYPE_CODES[x.dtype]
        on = torch.is_grad_enabled()
        w_grad = any(w.requires_grad for w in (layer.w1, layer.w3, layer.w2))
        grad = int(on and xp.requires_grad) | 2 * int(on and w_grad)
    except Exception as e:  # reported to every rank through the counts exchange below, then raised
        err, counts, code, grad = e, torch.zeros(E, dtype=torch.int64, device=dev), 0, 0
    header = torch.tensor([1 if err is not None else 0, E, layer.d_model, layer.d_ff, layer.k, code, grad],
                          dtype=torch.int64)  # fmt: skip
    H = len(_HEADER)
    msg = torch.cat([header.to(dev).expand(W, H), counts.view(W, El)], 1).contiguous()
    recv = torch.empty_like(msg)
    dist.all_to_all_single(recv, msg, group=group)  # the one small exchange of counts
    host = torch.cat([recv.reshape(-1), counts]).cpu()  # the forward's one host sync: split sizes as ints
    rmsg = host[: W * (H + El)].view(W, H + El)
    heads, recv_counts, local = rmsg[:, :H], rmsg[:, H:], host[W * (H + El):]
    failed = [s for s in range(W) if int(heads[s, 0])]
    if failed:
        if err is not None:
            raise err
        raise RuntimeError(f"expert-parallel MoE: rank(s) {failed} of the group failed before the token exchange "
                           "(see their errors); this rank stops too instead of waiting")  # fmt: skip
    if any(heads[s, 1:].tolist() != heads[0, 1:].tolist() for s in range(W)):
        desc = "; ".join(f"rank {s}: " + ", ".join(f"{n}={v}" for n, v in zip(_HEADER[1:], heads[s, 1:].tolist()))
                         for s in range(W))  # fmt: skip
        raise RuntimeError(f"expert-parallel MoE: the ranks called layers that disagree ({desc})")
    assert plan is not None and xp is not None and logits is not None and h is not None
    send = send_split_sizes(local, W)
    recv_splits = [int(v) for v in recv_counts.sum(1).tolist()]
    n_kept = sum(send)
    xr = _AllToAll.apply(xp[:n_kept], recv_splits, send, group)  # rows grouped by (source rank, expert)
    perm, inv = expert_major_index(recv_counts)
    off = torch.zeros(El + 1, dtype=torch.int64)
    torch.cumsum(recv_counts.sum(0), 0, out=off[1:])  # host tensor: the experts' loop needs no sync
    from .layer import grouped_swiglu

    perm, inv = perm.to(dev, non_blocking=True), inv.to(dev, non_blocking=True)  # host -> device: no sync
    ye = grouped_swiglu(_Reorder.apply(xr, perm, inv), off, layer.w1, layer.w3, layer.w2)
    yb = _AllToAll.apply(_Reorder.apply(ye, inv, perm), send, recv_splits, group)
    n_slots = xp.shape[0]
    if n_slots > n_kept:  # dropped slots: zero rows (the combine multiplies them by kept = 0)
        yb = torch.cat([yb, yb.new_zeros((n_slots - n_kept,) + tuple(yb.shape[1:]))])
    return unpermute(yb, plan), plan, logits, h


def full_state_dict(layer: Any, dst: int = 0) -> dict[str, torch.Tensor] | None:
    """Gather an expert-parallel layer's state to group rank ``dst``: a dict with the experts of every rank
    concatenated (``w1``/``w3`` ``[E, d_ff, d]``, ``w2 [E, d, d_ff]``), loadable into a one-process
    :class:`MoE` of the same configuration or, with :meth:`MoE.load_full_state_dict`, into an expert-parallel
    one of any world size dividing ``E``. Collective (every rank calls it); other ranks get ``None``."""
    import torch.distributed as dist

    group, W = layer._ep_group, layer.ep_world_size
    me = dist.get_rank(group)
    out: dict[str, torch.Tensor] | None = {} if me == dst else None
    for name, t in layer.state_dict().items():
        t = t.detach()
        if name in ("w1", "w2", "w3"):
            parts = [torch.empty_like(t) for _ in range(W)] if me == dst else None
            dist.gather(t.contiguous(), parts, dst=dist.get_global_rank(group, dst), group=group)
            if out is not None and parts is not None:
                out[name] = torch.cat(parts)
        elif out is not None:
            out[name] = t.clone()
    return out


__all__ = ["all_to_all", "expert_major_index", "full_state_dict", "send_split_sizes"]
