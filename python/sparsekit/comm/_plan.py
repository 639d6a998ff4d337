"""Bucket planning: DDP-compatible bucket assignment, shard assignment, plan fingerprint."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

MiB = 1024 * 1024


@dataclass(frozen=True)
class CommPlan:
    """A communication plan: buckets of parameter indices (in launch order) and their size limits."""

    buckets: list[list[int]]
    bucket_limits: list[int]
    sizes: list[int] = field(repr=False)
    keys: list[str] = field(repr=False)

    @property
    def fingerprint(self) -> str:
        """A hash of the plan (buckets, sizes, dtypes/devices) that every rank must agree on."""
        h = hashlib.sha256()
        for b in self.buckets:
            h.update(repr([(i, self.sizes[i], self.keys[i]) for i in b]).encode())
            h.update(b"|")
        return h.hexdigest()[:16]

    def bucket_bytes(self) -> list[int]:
        """Bytes per bucket."""
        return [sum(self.sizes[i] for i in b) for b in self.buckets]


def _specs(params: Any) -> tuple[Any, list[Any], list[bool]]:
    if isinstance(params, np.ndarray):  # precomputed byte sizes, one dtype/device
        if params.ndim != 1 or params.dtype.kind not in "iu":
            raise TypeError("params_or_specs as an array must be a 1-D integer array of byte sizes")
        if (params < 0).any():
            raise ValueError("params_or_specs: nbytes must be >= 0")
        n = len(params)
        return params.astype(np.int64), ["0"] * n, [False] * n
    if params and all(isinstance(p, torch.Tensor) for p in params):
        dd = [(p.dtype, p.device) for p in params]
        return [p.nbytes for p in params], [f"{d}@{v}" for d, v in dd], [p.is_sparse for p in params]
    sizes: list[int] = []
    keys: list[str] = []
    sparse: list[bool] = []
    for i, p in enumerate(params):
        if isinstance(p, torch.Tensor):
            sizes.append(p.numel() * p.element_size())
            keys.append(f"{p.dtype}@{p.device}")
            sparse.append(p.is_sparse)
        else:
            try:
                nbytes, key = p
            except (TypeError, ValueError):
                raise TypeError(
                    f"params_or_specs[{i}] must be a tensor or a (nbytes, dtype_key) pair, got {type(p).__name__}"
                ) from None
            if int(nbytes) < 0:
                raise ValueError(f"params_or_specs[{i}]: nbytes must be >= 0, got {nbytes}")
            sizes.append(int(nbytes))
            keys.append(str(key))
            sparse.append(False)
    return sizes, keys, sparse


def plan_buckets(
    params_or_specs: Sequence[Any],
    *,
    bucket_cap_mb: float = 25,
    first_bucket_mb: float = 1,
    order: str = "reverse",
    ready_order: Sequence[int] | None = None,
    ddp_compatible: bool = False,
) -> CommPlan:
    """Plan gradient buckets.

    ``params_or_specs``: tensors, or ``(nbytes, dtype_key)`` pairs. Buckets never mix dtype/device
    keys. With ``ddp_compatible=True`` the result equals
    ``torch.distributed._compute_bucket_assignment_by_size(tensors, [first, cap], tensor_indices=ready_order)[0]``.
    (Like torch, with ``ready_order`` the i-th tensor's size/dtype is read at position i and
    labelled ``ready_order[i]``; without ``ddp_compatible``, ``ready_order[i]`` names the
    parameter whose size is used.) ``order="reverse"`` (default) walks parameters in reverse registration order (gradient-ready
    order of backward); ``ready_order`` (an observed order) overrides it.
    """
    if not (bucket_cap_mb > 0):
        raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb}")
    if not (first_bucket_mb > 0):
        raise ValueError(f"first_bucket_mb must be > 0, got {first_bucket_mb}")
    if order not in ("reverse", "ready", "forward"):
        raise ValueError(f"order must be 'reverse', 'ready' or 'forward', got {order!r}")
    sizes, keys, sparse = _specs(params_or_specs)
    n = len(sizes)
    limits = [int(first_bucket_mb * MiB), int(bucket_cap_mb * MiB)]
    if ready_order is not None:
        idx = [int(i) for i in ready_order]
        if sorted(idx) != list(range(n)):
            raise ValueError("ready_order must be a permutation of range(len(params_or_specs))")
    elif ddp_compatible or order == "forward":
        idx = list(range(n))
    elif order == "reverse":
        idx = list(range(n - 1, -1, -1))
    else:
        raise ValueError("order='ready' needs ready_order")
    # torch's function reads the i-th tensor's size/dtype at POSITION i and labels it
    # tensor_indices[i] (DDP passes its tensors already permuted); ddp_compatible mirrors that.
    positional = ddp_compatible and ready_order is not None
    lab = np.asarray(idx, dtype=np.int64)
    src = np.arange(n, dtype=np.int64) if positional else lab
    sz = np.asarray(sizes, dtype=np.int64)[src] if n else np.zeros(0, np.int64)
    sp = np.asarray(sparse, dtype=bool)[src] if n else np.zeros(0, bool)
    kid_of: dict[str, int] = {}
    kid_all = np.fromiter((kid_of.setdefault(k, len(kid_of)) for k in keys), np.int64, n)
    kid = kid_all[src]
    # (first position, indices, limit) per bucket; buckets are closed in walk order
    result: list[tuple[int, list[int], int]] = []
    for j in np.flatnonzero(sp):
        result.append((int(j), [int(lab[j])], 0))
    leftovers = []
    for k in range(len(kid_of)):
        pos = np.flatnonzero((kid == k) & ~sp)
        cs = np.cumsum(sz[pos])
        start, base, li = 0, 0, 0
        while start < len(pos):
            e = int(np.searchsorted(cs, base + limits[li], side="left"))
            if e >= len(pos):
                leftovers.append((int(pos[start]), lab[pos[start:]].tolist(), limits[li]))
                break
            result.append((int(pos[e]), lab[pos[start : e + 1]].tolist(), limits[li]))
            base = int(cs[e])
            start = e + 1
            li = min(li + 1, len(limits) - 1)
    result.sort(key=lambda r: r[0])  # closing order of the walk, as torch emits
    leftovers.sort(key=lambda r: r[0])  # (torch: hash-map order; we use first-seen order)
    final: list[tuple[list[int], int]] = [(r[1], r[2]) for r in result + leftovers]
    if ready_order is None and (ddp_compatible or order == "forward"):
        final.sort(key=lambda r: min(r[0]))
    return CommPlan([r[0] for r in final], [r[1] for r in final], np.asarray(sizes, dtype=np.int64).tolist(), keys)


def assign_shards(nbytes: Sequence[int], world_size: int) -> tuple[list[int], float]:
    """ZeRO-style shard assignment: each item to a rank, greedy largest-first balancing bytes.

    Returns ``(owner_rank_per_item, max/mean imbalance)``. Deterministic (ties by index / rank).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    a = np.asarray(nbytes, dtype=np.int64)
    if (a < 0).any():
        raise ValueError("nbytes must be >= 0")
    owner = [0] * len(a)
    load = [0] * world_size
    for i in np.argsort(-a, kind="stable"):
        r = min(range(world_size), key=lambda q: (load[q], q))
        owner[int(i)] = r
        load[r] += int(a[i])
    mean = sum(load) / world_size
    return owner, (max(load) / mean if mean > 0 else 1.0)
