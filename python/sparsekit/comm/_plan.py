"""Bucket planning (Rust core): DDP-compatible and native bucket assignment, size classes,
ByteScheduler-style priorities, shard assignment, plan fingerprint."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .. import _core

MiB = 1024 * 1024
SIZE_CLASSES_MB = (16, 64, 256)
# class 0: < 16 MB (fused), 1: 16-64 MB, 2: 64-256 MB, 3: > 256 MB (each alone)
CLASS_NAMES = ("small", "medium", "large", "huge")


class CommPlan:
    """A communication plan: buckets of parameter indices in launch order.

    ``buckets[b]`` lists parameter indices; ``bucket_limits[b]`` the byte limit it was filled against
    (0 for a lone parameter); ``classes[b]`` its size class (0 = fused small parameters, 1..3 = a
    lone parameter of 16-64, 64-256, > 256 MB); ``priorities[b]`` its ByteScheduler rank (0 = holds the
    parameter the next forward needs first); ``chunk_bytes``: lone parameters are reduced in chunks of
    about this many bytes (0 = whole). ``sizes``/``keys``: bytes and dtype@device per parameter.
    """

    def __init__(
        self,
        indices: np.ndarray,
        offsets: np.ndarray,
        limits: np.ndarray,
        classes: np.ndarray,
        priorities: np.ndarray,
        nbytes: np.ndarray,
        key_ids: np.ndarray,
        key_names: list[str],
        chunk_bytes: int = 0,
    ) -> None:
        self._indices, self._offsets = indices, offsets
        self._limits, self._classes, self._prio = limits, classes, priorities
        self._nbytes, self._key_ids, self._key_names = nbytes, key_ids, key_names
        self.chunk_bytes = int(chunk_bytes)
        self._buckets: list[list[int]] | None = None

    @property
    def buckets(self) -> list[list[int]]:
        """Parameter indices per bucket, in launch order (built once, on first use)."""
        if self._buckets is None:
            flat = self._indices.tolist()
            offs = self._offsets.tolist()
            self._buckets = [flat[a:b] for a, b in zip(offs, offs[1:])]
        return self._buckets

    @property
    def bucket_limits(self) -> list[int]:
        return self._limits.tolist()  # type: ignore[no-any-return]

    @property
    def classes(self) -> list[int]:
        return self._classes.tolist()  # type: ignore[no-any-return]

    @property
    def priorities(self) -> list[int]:
        return self._prio.tolist()  # type: ignore[no-any-return]

    @property
    def sizes(self) -> list[int]:
        return self._nbytes.tolist()  # type: ignore[no-any-return]

    @property
    def keys(self) -> list[str]:
        return [self._key_names[k] for k in self._key_ids.tolist()]

    def __len__(self) -> int:
        return len(self._limits)

    def __repr__(self) -> str:
        return f"CommPlan({len(self)} buckets, {len(self._nbytes)} params, fingerprint={self.fingerprint})"

    @property
    def fingerprint(self) -> str:
        """A hash of the plan (buckets, sizes, classes, dtype and device *type*) every rank must agree on."""
        names = [k.split(":")[0] for k in self._key_names]  # cuda:0 on rank 0 is cuda:1 on rank 1
        fp = _core.comm_fingerprint(
            self._indices, self._offsets, self._limits, self._classes, self._nbytes, self._key_ids, names
        )
        return f"{fp:016x}"

    def bucket_bytes(self) -> list[int]:
        """Bytes per bucket."""
        return np.add.reduceat(self._nbytes[self._indices], self._offsets[:-1]).tolist() if len(self) else []

    def launch_order(self, priority: bool = False) -> list[int]:
        """Bucket order: plan (ready) order, or by priority (input layers first) if ``priority``."""
        order = list(range(len(self)))
        if not priority:
            return order
        prio = self.priorities
        return sorted(order, key=lambda b: prio[b])


def _specs(params: Any, keys: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    if isinstance(params, np.ndarray):  # precomputed byte sizes (+ optional key ids)
        if params.ndim != 1 or params.dtype.kind not in "iu":
            raise TypeError("params_or_specs as an array must be a 1-D integer array of byte sizes")
        nb = np.ascontiguousarray(params, dtype=np.int64)
        if keys is None:
            kid = np.zeros(len(nb), np.int64)
        else:
            kid = np.ascontiguousarray(keys, dtype=np.int64)
            if kid.shape != nb.shape or (len(kid) and kid.min() < 0):
                raise ValueError("keys must be a 1-D array of non-negative key ids, one per size")
        n_keys = int(kid.max()) + 1 if len(kid) else 0
        return nb, kid, np.zeros(len(nb), np.int64), [str(k) for k in range(n_keys)]
    if keys is not None:
        raise TypeError("keys is only accepted with params_or_specs given as an array of byte sizes")
    if not isinstance(params, list):
        try:
            params = list(params)
        except TypeError:
            raise TypeError(
                f"params_or_specs must be a sequence of tensors or (nbytes, dtype_key) pairs, got {type(params).__name__}"
            ) from None
    nb, kid, sp, names = _core.comm_read_specs(params, torch.Tensor, torch.nn.Parameter)
    return nb, kid, sp, names


def plan_buckets(
    params_or_specs: Any,
    *,
    bucket_cap_mb: float = 25,
    first_bucket_mb: float = 1,
    order: str = "reverse",
    ready_order: Sequence[int] | None = None,
    ddp_compatible: bool = False,
    size_classes_mb: Sequence[float] | None = SIZE_CLASSES_MB,
    chunk_mb: float | None = None,
    keys: Any = None,
) -> CommPlan:
    """Plan gradient buckets (in Rust; identical on every rank).

    ``params_or_specs``: tensors, ``(nbytes, dtype_key)`` pairs, or a 1-D integer array of byte
    sizes (with ``keys``, an array of small integer dtype/device ids; default one key). Buckets
    never mix dtype/device keys; sparse tensors get a bucket each.

    ``ddp_compatible=True``: the result equals
    ``torch.distributed._compute_bucket_assignment_by_size(tensors, [first, cap], tensor_indices=ready_order)[0]``
    (like torch, with ``ready_order`` the i-th tensor's size/dtype is read at position i and labelled
    ``ready_order[i]``; torch emits leftover per-dtype buckets in hash-map order, we use first-seen order).

    Native mode (default): parameters of at least ``size_classes_mb[0]`` MB get a bucket of their own
    tagged with their size class (``plan.classes``), split into ``chunk_mb`` chunks when reduced;
    smaller ones are fused as DDP does. ``order="reverse"`` (default) walks parameters in reverse
    registration order (backward's ready order), ``"forward"`` in registration order; ``ready_order``
    (an observed order, ``ready_order[i]`` = the i-th parameter whose gradient became ready) overrides it.
    """
    if not (bucket_cap_mb > 0):
        raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb}")
    if not (first_bucket_mb > 0):
        raise ValueError(f"first_bucket_mb must be > 0, got {first_bucket_mb}")
    if order not in ("reverse", "ready", "forward"):
        raise ValueError(f"order must be 'reverse', 'ready' or 'forward', got {order!r}")
    if chunk_mb is not None and not (chunk_mb > 0):
        raise ValueError(f"chunk_mb must be > 0 or None, got {chunk_mb}")
    classes = None
    if size_classes_mb is not None and not ddp_compatible:
        classes = [int(c * MiB) for c in size_classes_mb]
        if not classes or any(c <= 0 for c in classes) or any(a >= b for a, b in zip(classes, classes[1:])):
            raise ValueError(f"size_classes_mb must be positive and strictly increasing, got {size_classes_mb}")
        if len(classes) > len(CLASS_NAMES) - 1:
            raise ValueError(f"size_classes_mb: at most {len(CLASS_NAMES) - 1} bounds (classes {CLASS_NAMES}), got {size_classes_mb}")
    nb, kid, sp, names = _specs(params_or_specs, keys)
    n = len(nb)
    limits = [max(1, int(first_bucket_mb * MiB)), max(1, int(bucket_cap_mb * MiB))]
    if ready_order is not None:
        idx = np.asarray(ready_order)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise ValueError("ready_order must be a 1-D sequence of ints (a permutation of range(n))")
        idx = np.ascontiguousarray(idx, dtype=np.int64)
        if len(idx) != n:
            raise ValueError(f"ready_order must be a permutation of range({n}), got {len(idx)} entries")
        sort_by_min = False
    elif order == "ready":
        raise ValueError("order='ready' needs ready_order")
    elif ddp_compatible or order == "forward":
        idx, sort_by_min = None, True
    else:
        idx, sort_by_min = np.arange(n - 1, -1, -1, dtype=np.int64), False
    positional = ddp_compatible and ready_order is not None
    out = _core.comm_plan(nb, kid, sp, idx, positional, limits, sort_by_min, classes)
    chunk = int(chunk_mb * MiB) if chunk_mb is not None else 0
    return CommPlan(*out, nb, kid, names, chunk_bytes=chunk)


def assign_shards(nbytes: Sequence[int], world_size: int) -> tuple[list[int], float]:
    """ZeRO-style shard assignment: each item to a rank, greedy largest-first (LPT) balancing bytes.

    Returns ``(owner_rank_per_item, max/mean imbalance)``. Deterministic (ties by index / rank).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    a = np.ascontiguousarray(np.asarray(nbytes, dtype=np.int64).reshape(-1))
    if (a < 0).any():
        raise ValueError("nbytes must be >= 0")
    owner, load = _core.comm_assign_shards(a, world_size)
    total = int(load.sum())
    return owner.tolist(), (float(load.max()) * world_size / total if total > 0 else 1.0)


def chunk_bounds(numel: int, nbytes: int, chunk_bytes: int) -> list[int]:
    """Element offsets of the ~``chunk_bytes`` chunks a lone parameter is reduced in."""
    return list(_core.comm_chunk_bounds(numel, nbytes, chunk_bytes))
