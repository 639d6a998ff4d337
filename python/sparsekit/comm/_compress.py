"""Top-k gradient compression with error feedback (DGC-style warm-up) and mask-aware packing."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from ..select import topk_mask


class TopKCompression:
    """Keep the top-k ``|g + residual|`` per bucket, exchange values+indices by all-gather.

    ``ratio``: kept fraction after warm-up. ``error_feedback``: the unsent part accumulates in a
    per-bucket residual added to the next step's gradient. ``warmup_steps``: DGC warm-up, the kept
    fraction falls exponentially from ``warmup_start`` to ``ratio`` over that many steps.
    Selection uses sparsekit's engine (ties -> lowest index) and the sum over ranks is taken in rank
    order, so every rank gets a bit-identical result.
    """

    def __init__(
        self,
        ratio: float = 0.01,
        *,
        error_feedback: bool = True,
        warmup_steps: int = 0,
        warmup_start: float = 0.25,
    ) -> None:
        if not (0 < ratio <= 1):
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.ratio = ratio
        self.error_feedback = error_feedback
        self.warmup_steps = warmup_steps
        self.warmup_start = max(warmup_start, ratio)
        self.steps = 0
        self.residuals: dict[Any, torch.Tensor] = {}
        self.bytes_sent = 0
        self.bytes_dense = 0

    def current_ratio(self) -> float:
        """Kept fraction at the current step (after the DGC warm-up schedule)."""
        if self.steps >= self.warmup_steps:
            return self.ratio
        t = self.steps / self.warmup_steps
        return float(self.warmup_start * (self.ratio / self.warmup_start) ** t)

    def step(self) -> None:
        """Advance the warm-up schedule (GradientSync calls it once per finish())."""
        self.steps += 1

    def allreduce(self, flat: torch.Tensor, key: Any, group: Any = None) -> torch.Tensor:
        """Average ``flat`` (a local gradient bucket) over ranks, compressed; returns a new tensor."""
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        acc = flat.float() if flat.dtype != torch.float32 else flat.clone()
        res = self.residuals.get(key) if self.error_feedback else None
        if res is not None and res.shape == acc.shape:  # (a DDP bucket rebuild changes shapes: start over)
            acc += res
        n = acc.numel()
        k = max(1, min(n, int(round(self.current_ratio() * n))))
        mask = topk_mask(acc.detach(), k)
        idx = mask.nonzero().view(-1)
        if n < 2**31:  # int32 indices: 8 bytes per kept entry instead of 12
            idx = idx.to(torch.int32)
        vals = acc[idx]
        if self.error_feedback:
            res = acc.clone()
            res[idx] = 0
            self.residuals[key] = res
        self.bytes_sent += k * (vals.element_size() + idx.element_size())
        self.bytes_dense += n * flat.element_size()
        out = torch.zeros_like(acc)
        if world == 1:
            out[idx] = vals
        else:
            gv = [torch.empty_like(vals) for _ in range(world)]
            gi = [torch.empty_like(idx) for _ in range(world)]
            dist.all_gather(gv, vals.contiguous(), group=group)
            dist.all_gather(gi, idx.contiguous(), group=group)
            for v, i in zip(gv, gi):  # rank order: identical on every rank
                out.index_add_(0, i, v)
            out.div_(world)
        return out.to(flat.dtype)

    def ddp_comm_hook(self, state: Any, bucket: Any) -> torch.futures.Future:
        """DDP comm hook form: ``ddp.register_comm_hook(process_group, comp.ddp_comm_hook)`` (or
        :func:`register_comm_hook`). ``state`` is the process group (None: the default one). The
        exchange is synchronous inside the hook; DDP's bucket rebuild after the first step resets
        the residuals of buckets whose size changed."""
        buf = bucket.buffer()
        out = self.allreduce(buf, ("ddp", bucket.index()), group=state)
        if bucket.is_last():
            self.step()
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(out)
        return fut


# DDP checks the hook's annotations as objects; this module's are strings (postponed evaluation).
TopKCompression.ddp_comm_hook.__annotations__ = {
    "state": object,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}


def register_comm_hook(ddp_model: Any, compression: TopKCompression, *, process_group: Any = None) -> None:
    """Give a ``DistributedDataParallel`` model top-k compression without leaving DDP."""
    if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(f"ddp_model must be a DistributedDataParallel, got {type(ddp_model).__name__}")
    if not isinstance(compression, TopKCompression):
        raise TypeError(f"compression must be a TopKCompression, got {type(compression).__name__}")
    ddp_model.register_comm_hook(process_group, compression.ddp_comm_hook)


def pack_masked(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate the kept (mask True) entries of each tensor into one dense 1-D buffer."""
    if len(tensors) != len(masks):
        raise ValueError(f"tensors and masks must have equal lengths, got {len(tensors)} and {len(masks)}")
    parts = []
    for i, (t, m) in enumerate(zip(tensors, masks)):
        if m.dtype != torch.bool:
            raise TypeError(f"masks[{i}] must be a bool tensor, got {m.dtype}")
        if m.shape != t.shape:
            raise ValueError(f"masks[{i}] shape {tuple(m.shape)} != tensors[{i}] shape {tuple(t.shape)}")
        parts.append(t.reshape(-1)[m.reshape(-1)])
    return torch.cat(parts) if parts else torch.empty(0)


def unpack(flat: torch.Tensor, out: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
    """Inverse of :func:`pack_masked`: scatter ``flat`` into the kept positions of ``out`` (others 0)."""
    need = sum(int(m.sum()) for m in masks)
    if flat.numel() != need:
        raise ValueError(f"flat has {flat.numel()} entries, masks keep {need}")
    off = 0
    for t, m in zip(out, masks):
        mm = m.reshape(-1)
        c = int(mm.sum())
        t.zero_()
        t.view(-1)[mm] = flat[off : off + c].to(t.dtype)
        off += c


def masked_allreduce(
    grads: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], *, dense: bool = False, group: Any = None
) -> int:
    """Average ``grads`` in place over ranks, sending only the masked entries (all of them if
    ``dense``, e.g. on a RigL grow step). Masks must be identical on every rank. Returns bytes sent."""
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if dense:
        flat = torch.cat([g.reshape(-1) for g in grads])
    else:
        flat = pack_masked(grads, masks)
    if world > 1:
        dist.all_reduce(flat, group=group)
        flat.div_(world)
    if dense:
        off = 0
        for g in grads:
            g.view(-1).copy_(flat[off : off + g.numel()])
            off += g.numel()
    else:
        unpack(flat, grads, masks)
    return flat.numel() * flat.element_size()
