"""GradientSync: bucketed, overlapped gradient averaging on torch.distributed."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist

from ._plan import CommPlan, plan_buckets


class GradientSync:
    """Average gradients across ranks with bucketed async all-reduce overlapped with backward.

    Each bucket's collective starts once all of its gradients are ready and every earlier bucket
    was launched (buckets go out in plan order on every rank, so collectives always match).
    Unused parameters: no per-step scan; ``finish()`` launches the buckets that are still open,
    with zeros for the gradients that never arrived (a parameter with no gradient on every rank
    keeps ``grad=None``-equivalent zeros). Call ``finish()`` before ``optimizer.step()``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        process_group: Any = None,
        bucket_cap_mb: float = 25,
        plan: CommPlan | None = None,
        compression: Any = None,
    ) -> None:
        if bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb}")
        self.compression = compression
        self.params = [p for p in model.parameters() if p.requires_grad]
        devs = {p.device for p in self.params}
        if len(devs) > 1:
            raise ValueError(f"model: parameters on mixed devices {sorted(map(str, devs))}")
        self.pg = process_group
        self.world = dist.get_world_size(process_group) if dist.is_initialized() else 1
        self.plan = plan if plan is not None else plan_buckets(self.params, bucket_cap_mb=bucket_cap_mb)
        if self.world > 1:
            fps: list[Any] = [None] * self.world
            dist.all_gather_object(fps, self.plan.fingerprint, group=process_group)
            if len(set(fps)) != 1:
                raise RuntimeError(
                    f"GradientSync: ranks have different communication plans (fingerprints {fps}); "
                    "every rank must build the same model"
                )
        self._bucket_of = {}
        for b, idx in enumerate(self.plan.buckets):
            for i in idx:
                self._bucket_of[i] = b
        self._enabled = True
        self._reset()
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._make_hook(i)) for i, p in enumerate(self.params)
        ]

    def _reset(self) -> None:
        self._pending = [len(b) for b in self.plan.buckets]
        self._next = 0
        self._works: list[tuple[int, Any, torch.Tensor]] = []

    def _make_hook(self, i: int) -> Any:
        def hook(p: torch.Tensor) -> None:
            if not self._enabled or self.world == 1:
                return
            if p.grad is not None and p.grad.is_sparse:
                raise ValueError(f"parameter {i}: sparse gradients are not supported")
            b = self._bucket_of[i]
            self._pending[b] -= 1
            while self._next < len(self._pending) and self._pending[self._next] == 0:
                self._launch(self._next)
                self._next += 1

        return hook

    def _launch(self, b: int) -> None:
        ps = [self.params[i] for i in self.plan.buckets[b]]
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps]
        )
        if self.compression is not None:
            self._works.append((b, None, flat))
            return
        flat.div_(self.world)
        work = dist.all_reduce(flat, group=self.pg, async_op=True)
        self._works.append((b, work, flat))

    def finish(self) -> None:
        """Launch still-open buckets (unused parameters), wait for all, write averaged grads."""
        if self.world == 1 or not self._enabled:
            self._reset()
            return
        while self._next < len(self._pending):
            self._launch(self._next)
            self._next += 1
        for b, work, flat in self._works:
            if work is None:
                flat = self.compression.allreduce(flat, b, group=self.pg)
            try:
                if work is not None:
                    work.wait()
            except RuntimeError as e:
                raise RuntimeError(f"GradientSync: bucket {b} collective failed: {e}") from e
            off = 0
            for i in self.plan.buckets[b]:
                p = self.params[i]
                n = p.numel()
                g = flat[off : off + n].view_as(p)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
                off += n
        if self.compression is not None:
            self.compression.step()
        self._reset()

    wait = finish

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
