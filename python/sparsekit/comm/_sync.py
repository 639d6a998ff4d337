"""GradientSync: bucketed, overlapped gradient averaging on torch.distributed, with per-size-class
policies, chunked large parameters and a DDP-style ready-order rebuild after the first step."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist

from ._plan import CLASS_NAMES, CommPlan, chunk_bounds, plan_buckets

POLICIES = ("async", "sync", "reduce_scatter")


def _parse_policy(name: str, v: Any) -> tuple[str, int]:
    """'async' | 'sync' | 'reduce_scatter' | ('local', N) | 'local:N' -> (kind, every)."""
    if isinstance(v, tuple) and len(v) == 2 and v[0] == "local":
        kind, every = "local", v[1]
    elif isinstance(v, str) and v.startswith("local:"):
        kind, every = "local", v.split(":", 1)[1]
    elif v in POLICIES:
        return str(v), 1
    else:
        raise ValueError(
            f"policies[{name!r}] must be 'async', 'sync', 'reduce_scatter' or ('local', N), got {v!r}"
        )
    try:
        n = int(every)
    except (TypeError, ValueError):
        raise ValueError(f"policies[{name!r}]: local accumulation needs an integer N, got {every!r}") from None
    if n < 1:
        raise ValueError(f"policies[{name!r}]: local accumulation needs N >= 1, got {n}")
    return "async", n


class GradientSync:
    """Average gradients across ranks with bucketed async all-reduce overlapped with backward.

    Buckets come from :func:`plan_buckets` (native mode: parameters of 16 MB or more alone, in their
    size class). ``policies`` maps a class name (``"small"`` < 16 MB fused, ``"medium"`` 16-64,
    ``"large"`` 64-256, ``"huge"`` > 256 MB) to how its buckets travel:

    - ``"async"`` (default): all-reduce launched as soon as the bucket's last gradient is ready;
    - ``"sync"``: reduced by ``finish()`` after backward (blocking), in priority order if ``priority``;
    - ``"reduce_scatter"``: each rank receives only its shard of the averaged bucket (ZeRO-style,
      rank ``r`` owns flat elements ``[r*S, (r+1)*S)``, ``S = ceil(n / world)``; see :meth:`shard`),
      the rest of those gradients is set to zero;
    - ``("local", N)``: accumulate locally and all-reduce only on every N-th ``finish()``.

    ``chunk_mb``: a lone (large) parameter is all-reduced in chunks of about that size, each its own
    async collective (pipelining). ``rebuild=True`` (default, when no ``plan`` is given): the order in
    which gradients became ready in the first step is recorded, rank 0's order is broadcast, and the
    buckets are re-planned in that order (as DDP does).

    Fused buckets live in one flat buffer each, allocated once; after ``finish()`` the gradients of their
    parameters are views into it (like DDP's ``gradient_as_bucket_view=True``), so a gradient zeroed and
    accumulated in place is reduced without being copied in or out, and a fresh one (``zero_grad()``'s
    default ``set_to_none=True``) is copied in once.

    Buckets launch in plan order on every rank (a bucket waits for all earlier ones), so the sequence
    of collectives is always identical. Unused parameters: no per-step scan; ``finish()`` launches
    the buckets still open, with zeros for gradients that never arrived. Call ``finish()`` before
    ``optimizer.step()``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        process_group: Any = None,
        bucket_cap_mb: float = 25,
        plan: CommPlan | None = None,
        compression: Any = None,
        policies: Mapping[str, Any] | None = None,
        chunk_mb: float | None = None,
        priority: bool = False,
        rebuild: bool = True,
    ) -> None:
        if not (bucket_cap_mb > 0):
            raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb}")
        self.compression = compression
        self.params = [p for p in model.parameters() if p.requires_grad]
        devs = {p.device for p in self.params}
        if len(devs) > 1:
            raise ValueError(f"model: parameters on mixed devices {sorted(map(str, devs))}")
        self._policy: dict[int, tuple[str, int]] = {c: ("async", 1) for c in range(len(CLASS_NAMES))}
        for name, v in (policies or {}).items():
            if name not in CLASS_NAMES:
                raise ValueError(f"policies: unknown size class {name!r}; expected one of {CLASS_NAMES}")
            self._policy[CLASS_NAMES.index(name)] = _parse_policy(name, v)
        self.priority = bool(priority)
        self.pg = process_group
        self.world = dist.get_world_size(process_group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(process_group) if dist.is_initialized() else 0
        self._cap, self._chunk_mb = bucket_cap_mb, chunk_mb
        self._rebuild = rebuild and plan is None and self.world > 1
        self._ready: list[int] = []
        self._seen: set[int] = set()
        self._set_plan(plan if plan is not None else plan_buckets(self.params, bucket_cap_mb=bucket_cap_mb, chunk_mb=chunk_mb))
        if self.world > 1:
            fps: list[Any] = [None] * self.world
            dist.all_gather_object(fps, self.plan.fingerprint, group=process_group)
            if len(set(fps)) != 1:
                raise RuntimeError(
                    f"GradientSync: ranks have different communication plans (fingerprints {fps}); "
                    "every rank must build the same model"
                )
        self._enabled = True
        self.steps = 0  # enabled finish() calls with world size > 1 (local-only buckets included)
        self._reset()
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._make_hook(i)) for i, p in enumerate(self.params)
        ]

    # -- plan bookkeeping ------------------------------------------------------------------------
    def _set_plan(self, plan: CommPlan) -> None:
        if sorted(i for b in plan.buckets for i in b) != list(range(len(self.params))):
            raise ValueError("plan: buckets must hold every trainable parameter index exactly once")
        self.plan = plan
        self._buffers: dict[int, torch.Tensor] = {}  # bucket -> its persistent flat buffer (see _flat)
        self._bucket_of = {i: b for b, idx in enumerate(plan.buckets) for i in idx}
        self._class = plan.classes

    def _kind(self, b: int) -> tuple[str, int]:
        return self._policy[min(self._class[b], len(CLASS_NAMES) - 1)]

    def _reset(self) -> None:
        """Per-step state: which buckets travel this step, in which order."""
        active = [b for b in range(len(self.plan.buckets)) if self.steps % self._kind(b)[1] == self._kind(b)[1] - 1]
        self._seq = [b for b in active if self._kind(b)[0] != "sync"]  # launched during backward
        self._deferred = [b for b in active if self._kind(b)[0] == "sync"]  # launched by finish()
        if self.priority:
            prio = self.plan.priorities
            self._deferred.sort(key=lambda b: prio[b])
        self._pending = [len(b) for b in self.plan.buckets]
        self._next = 0
        self._works: list[tuple[int, list[Any], torch.Tensor]] = []

    def _make_hook(self, i: int) -> Any:
        def hook(p: torch.Tensor) -> None:
            if self._rebuild and i not in self._seen:
                self._seen.add(i)
                self._ready.append(i)
            if not self._enabled or self.world == 1:
                return
            if p.grad is not None and p.grad.is_sparse:
                raise ValueError(f"parameter {i}: sparse gradients are not supported")
            b = self._bucket_of[i]
            self._pending[b] -= 1
            while self._next < len(self._seq) and self._pending[self._seq[self._next]] == 0:
                self._launch(self._seq[self._next])
                self._next += 1

        return hook

    # -- collectives -----------------------------------------------------------------------------
    def _flat(self, b: int) -> torch.Tensor:
        ps = [self.params[i] for i in self.plan.buckets[b]]
        g = ps[0].grad
        if len(ps) == 1 and g is not None and g.is_contiguous() and self.compression is None:
            return g.view(-1)  # a lone parameter is reduced in place: no copy in, no copy out
        if self.compression is not None or self._kind(b)[0] == "reduce_scatter":
            return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps])
        # All-reduced buckets live in one buffer per bucket, kept across steps (no fresh allocation, so no
        # page faults, every step). After the reduction the gradients become views into it (`_write`), so
        # a gradient accumulated in place (zero_grad(set_to_none=False), no_sync) is already in the
        # buffer and is neither copied in nor out; a fresh one (set_to_none=True) is copied in once.
        buf = self._buffers.get(b)
        if buf is None:
            buf = self._buffers[b] = torch.empty(sum(p.numel() for p in ps), dtype=ps[0].dtype, device=ps[0].device)
        off = 0
        for p in ps:
            n = p.numel()
            view = buf[off : off + n]
            if p.grad is None:
                view.zero_()
            elif p.grad.data_ptr() != view.data_ptr() or not p.grad.is_contiguous():
                view.view_as(p).copy_(p.grad)
            off += n
        return buf

    def shard(self, b: int) -> tuple[int, int]:
        """This rank's element range ``[start, end)`` of bucket ``b``'s flat buffer (reduce_scatter)."""
        n = sum(self.params[i].numel() for i in self.plan.buckets[b])
        s = -(-n // self.world)
        return min(n, self.rank * s), min(n, (self.rank + 1) * s)

    def _launch(self, b: int, blocking: bool = False) -> None:
        flat = self._flat(b)
        if self.compression is not None:
            self._works.append((b, [], flat))
            return
        flat.div_(self.world)
        kind = self._kind(b)[0]
        works: list[Any] = []
        if kind == "reduce_scatter":
            n = flat.numel()
            s = -(-n // self.world)
            padded = torch.zeros(s * self.world, dtype=flat.dtype, device=flat.device)
            padded[:n] = flat
            out = torch.empty(s, dtype=flat.dtype, device=flat.device)
            works.append(dist.reduce_scatter_tensor(out, padded, group=self.pg, async_op=True))
            self._works.append((b, works, out))
            return
        bounds = [0, flat.numel()]
        if len(self.plan.buckets[b]) == 1 and self.plan.chunk_bytes:
            bounds = chunk_bounds(flat.numel(), flat.numel() * flat.element_size(), self.plan.chunk_bytes)
        for lo, hi in zip(bounds, bounds[1:]):
            works.append(dist.all_reduce(flat[lo:hi], group=self.pg, async_op=not blocking))
        self._works.append((b, works, flat))

    def finish(self) -> None:
        """Launch still-open buckets (unused parameters) and the deferred ones, wait for all,
        write averaged grads."""
        if self.world == 1 or not self._enabled:
            self._reset()
            return
        while self._next < len(self._seq):
            self._launch(self._seq[self._next])
            self._next += 1
        for b in self._deferred:
            self._launch(b, blocking=True)
        for b, works, flat in self._works:
            try:
                if self.compression is not None:
                    flat = self.compression.allreduce(flat, b, group=self.pg)
                for w in works:
                    if w is not None:
                        w.wait()
            except RuntimeError as e:
                raise RuntimeError(f"GradientSync: bucket {b} ({self._describe(b)}) collective failed: {e}") from e
            self._write(b, flat)
        if self.compression is not None:
            self.compression.step()
        self.steps += 1
        if self._rebuild:
            self._rebuild_from_ready_order()
        self._reset()

    wait = finish

    def _write(self, b: int, flat: torch.Tensor) -> None:
        sharded = self.compression is None and self._kind(b)[0] == "reduce_scatter"
        if sharded:  # flat is this rank's shard: place it, zero the rest
            lo, hi = self.shard(b)
            full = torch.zeros(sum(self.params[i].numel() for i in self.plan.buckets[b]), dtype=flat.dtype, device=flat.device)
            full[lo:hi] = flat[: hi - lo]
            flat = full
        off = 0
        for i in self.plan.buckets[b]:
            p = self.params[i]
            n = p.numel()
            g = flat[off : off + n].view_as(p)
            if p.grad is not None and p.grad.data_ptr() == g.data_ptr() and p.grad.numel() == n and p.grad.is_contiguous():
                pass  # reduced in place
            elif b in self._buffers and flat is self._buffers[b]:
                p.grad = g  # the gradient becomes a view into the bucket buffer (see _flat)
            elif p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            off += n

    def _describe(self, b: int) -> str:
        return f"{CLASS_NAMES[min(self._class[b], len(CLASS_NAMES) - 1)]}, params {self.plan.buckets[b][:4]}{'...' if len(self.plan.buckets[b]) > 4 else ''}"

    def _rebuild_from_ready_order(self) -> None:
        """Re-plan in the first step's observed ready order (rank 0's, broadcast: ranks may differ)."""
        self._rebuild = False
        n = len(self.params)
        seen = set(self._ready)
        order = self._ready + [i for i in range(n - 1, -1, -1) if i not in seen]  # never ready: last
        t = torch.tensor(order, dtype=torch.int64)
        dist.broadcast(t, src=dist.get_global_rank(self.pg, 0) if self.pg is not None else 0, group=self.pg)
        plan = plan_buckets(self.params, bucket_cap_mb=self._cap, chunk_mb=self._chunk_mb, ready_order=t.tolist())
        res = getattr(self.compression, "residuals", None)
        per_param: dict[int, torch.Tensor] = {}
        if res:  # error-feedback residuals follow their parameters into the new buckets
            for b, idx in enumerate(self.plan.buckets):
                if b in res:
                    off = 0
                    for i in idx:
                        per_param[i] = res[b][off : off + self.params[i].numel()]
                        off += self.params[i].numel()
            for b in range(len(self.plan.buckets)):
                res.pop(b, None)
        self._set_plan(plan)
        if per_param and res is not None:
            for b, idx in enumerate(plan.buckets):
                if all(i in per_param for i in idx):
                    res[b] = torch.cat([per_param[i] for i in idx])

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (no communication) inside the context."""
        old = self._enabled
        self._enabled = False
        try:
            yield
        finally:
            self._enabled = old
            self._reset()

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._hooks:
            h.remove()
