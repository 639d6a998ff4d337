"""Mixture-of-Experts routing on CUDA tensors: launch code for ``cuda/route.cu``, written once against a
backend (``sparsekit._cuda``, as ``sparsekit._cuda_select``): ``CupyBackend`` on a GPU (``cupy.RawModule`` on torch's
current stream, tensors by DLPack), :func:`sim_backend` on the CPU shim for the tests, so the tests run
the very code users run.

No host synchronisation anywhere: every output has a size known from the input shapes, the scans are
``torch.cumsum`` on the device, and the NaN / out-of-range counts stay on the device as ``int32 [1]``
tensors for the caller to act on.

:func:`route_topk` picks each row's top-k experts (with DeepSeek-V3 group limiting);
:func:`route_tables` builds the token-slot permutation grouped by expert with a stable counting sort
(histogram per (bucket, tile) + exclusive scan + stable scatter; capacity by position, or by priority
through 8-bit LSD counting-sort passes), O(T*k + E), int64 positions throughout.

Tie and edge rules (the Rust path implements the same contract):

- scores and priorities rank by value with ``-0.0 == +0.0``; ties go to the lower expert / group /
  slot index; ``-inf`` is an ordinary lowest score;
- NaN is counted (``nan_count``); on this path a NaN score or priority ranks below ``-inf`` (the
  contract leaves the ranking with NaN unspecified); a ``"top2"`` group whose two largest scores are
  ``+inf`` and ``-inf`` (sum NaN) scores ``+inf``, its largest (as the Rust path does);
- expert ids outside ``[0, n_experts)`` are counted into ``invalid``, never kept, never counted in
  ``counts``, and listed with the dropped slots.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch

from ._cuda import Backend, SimBackend, backend_for

THREADS = 256  # threads per block of both kernels
MAX_TOPK_GRID = 65535  # route_topk blocks at most (grid-stride over rows)
TOPK_SIZES = (256, 1024, 4096)  # route_topk<MAX_E> instantiations: shared keys of the row, 2 x 4 B x MAX_E
MAX_EXPERTS = TOPK_SIZES[-1]  # route_topk's limit on E (route_tables has none)
MIN_ROUNDS = 8  # rounds of 32 positions per warp tile in route_pass, at least
DIGIT_BITS = 8  # LSD digit of the priority passes: 4 passes over the 32-bit keys
NAME_EXPRESSIONS: tuple[str, ...] = tuple(f"route_topk<{size}>" for size in TOPK_SIZES)  # route_pass is extern "C"
GROUP_MODES = ("max", "top2")
DROP_POLICIES = ("probs", "position")
# route_pass codes (SK_BY_* / SK_MODE_* in route.cu)
BY_EXPERT, BY_KEPT, BY_PRIORITY = 0, 1, 2
MODE_COUNT, MODE_SCATTER, MODE_MARK = 0, 1, 2


class RouteTables(NamedTuple):
    """Routing tables of :func:`route_tables` (all on the input's device)."""

    order: torch.Tensor  # [T*k] int64: kept slots by expert (slot order inside), then dropped slots
    inverse: torch.Tensor  # [T*k] int64: order[inverse[s]] == s
    counts: torch.Tensor  # [E] int64: kept slots per expert
    offsets: torch.Tensor  # [E+1] int64: exclusive scan of counts; offsets[E] = kept total
    kept: torch.Tensor  # [T, k] bool
    invalid: torch.Tensor  # [1] int32: slots whose expert id is outside [0, E) (never kept)
    nan_count: torch.Tensor  # [1] int32: NaN priorities (0 when priority is None)


def sim_backend(schedule: str = "forward", seed: int = 0, threads: int | None = None, race_check: bool = False) -> SimBackend:
    """The routing kernels on the CPU shim (tests): ``schedule`` ("forward", "reverse", "random" with
    ``seed``) is the order the shim resumes a block's threads in, ``threads`` its worker count."""
    return SimBackend("route", NAME_EXPRESSIONS, schedule, seed, threads, race_check)


def _backend(t: torch.Tensor, backend: Backend | None) -> Backend:
    return backend_for("route", NAME_EXPRESSIONS, t, backend)


def _int_arg(name: str, v: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi if hi is not None else 'inf'}], got {v}")
    return int(v)


def _check_tensor(name: str, t: Any, dtype: torch.dtype) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {str(dtype).replace('torch.', '')}, got {str(t.dtype).replace('torch.', '')}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


# ------------------------------------------------------------------------------------------ top-k
def route_topk(choice: torch.Tensor, k: int, n_groups: int | None = None, topk_groups: int | None = None,
               group_mode: str = "max", *, backend: Any = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per row of ``choice [T, E]`` (float32, contiguous), the ``k`` experts with the largest scores in
    descending order, ties to the lower expert index -> ``(expert_ids [T, k] int64, nan_count [1] int32)``
    on ``choice``'s device, with no host synchronisation.

    With ``n_groups > 1`` (dividing E) only experts of the ``topk_groups`` best groups can be chosen
    (group score: ``"max"`` of its scores, or ``"top2"``: the float32 sum of its two largest; ties to the
    lower group index). ``n_groups`` None or 1: no group limiting. E up to 4096, ``1 <= k <=
    topk_groups * E / n_groups``. NaN scores are counted in ``nan_count`` (saturating at 2^31 - 1)."""
    _check_tensor("choice", choice, torch.float32)
    rows, n_experts = choice.shape
    _int_arg("E (choice.shape[1])", n_experts, 1, MAX_EXPERTS)
    groups = 1 if n_groups is None else _int_arg("n_groups", n_groups, 1, n_experts)
    if n_experts % groups:
        raise ValueError(f"n_groups={groups} must divide the number of experts E={n_experts}")
    keep_groups = groups if topk_groups is None else _int_arg("topk_groups", topk_groups, 1, groups)
    if group_mode not in GROUP_MODES:
        raise ValueError(f"group_mode must be one of {GROUP_MODES}, got {group_mode!r}")
    if groups > 1 and group_mode == "top2" and n_experts // groups < 2:
        raise ValueError(f'group_mode="top2" needs >= 2 experts per group, got n_groups={groups} for E={n_experts}')
    _int_arg("k", k, 1, keep_groups * (n_experts // groups))
    ids = torch.empty((rows, k), dtype=torch.int64, device=choice.device)
    nan_count = torch.zeros(1, dtype=torch.int32, device=choice.device)
    if rows == 0:
        return ids, nan_count
    be = _backend(choice, backend)
    size = next(s for s in TOPK_SIZES if s >= n_experts)
    block = min(THREADS, 32 * -(-n_experts // 32))
    be.launch(f"route_topk<{size}>", min(rows, MAX_TOPK_GRID), block, (
        be.bits(choice.view(-1), "unsigned int"), np.int64(rows), np.int32(n_experts), np.int32(k), np.int32(groups),
        np.int32(keep_groups), np.int32(group_mode == "top2"), be.plain(ids.view(-1)), be.plain(nan_count),
    ))  # fmt: skip
    return ids, nan_count


# ----------------------------------------------------------------------------------------- tables
class _Pass:
    """One stable counting-sort pass over ``n`` positions into ``buckets`` buckets (route_pass)."""

    def __init__(self, be: Any, n: int, buckets: int, device: torch.device, ids: Any, prio: Any, kept: Any) -> None:
        self.be, self.n, self.buckets, self.ids, self.prio, self.kept = be, n, buckets, ids, prio, kept
        # a tile of 32 * rounds positions per warp, at least one position per bucket (or all n in one
        # tile): the per-(bucket, tile) table then holds at most n + buckets entries (O(T*k + E))
        self.rounds = max(1, min(max(MIN_ROUNDS, -(-buckets // 32)), -(-n // 32)))
        self.tiles = -(-n // (32 * self.rounds))
        self.device = device
        self.dummy = torch.zeros(1, dtype=torch.int64, device=device)

    def _launch(self, in_order: torch.Tensor | None, by: int, shift: int, mode: int, cursor: torch.Tensor,
                out_order: torch.Tensor | None, out_inverse: torch.Tensor | None, starts: torch.Tensor | None,
                capacity: int, n_experts: int) -> None:  # fmt: skip
        be, d = self.be, self.dummy
        grid = -(-self.tiles * 32 // THREADS)
        be.launch("route_pass", grid, THREADS, (
            np.int64(self.n), np.int64(self.tiles), np.int32(self.rounds),
            be.plain(in_order if in_order is not None else d), np.int32(in_order is not None), np.int32(by),
            np.int32(n_experts), np.int32(shift), self.ids, self.prio, self.kept, np.int32(mode), be.plain(cursor),
            be.plain(out_order if out_order is not None else d), be.plain(out_inverse if out_inverse is not None else d),
            np.int32(out_inverse is not None), be.plain(starts if starts is not None else d), np.int64(capacity),
        ))  # fmt: skip

    def run(self, in_order: torch.Tensor | None, by: int, n_experts: int, *, shift: int = 0, mode: int = MODE_SCATTER,
            capacity: int = 0, inverse: bool = False
            ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:  # fmt: skip
        """Count, scan, then scatter (-> new order, inverse if asked) or mark kept slots (capacity).
        Returns ``(order, inverse, starts)`` with ``starts [buckets]`` the first position of each bucket."""
        cursor = torch.zeros(self.buckets * self.tiles, dtype=torch.int64, device=self.device)
        self._launch(in_order, by, shift, MODE_COUNT, cursor, None, None, None, 0, n_experts)
        cursor = torch.cumsum(cursor, 0).sub_(cursor)  # exclusive scan over (bucket, tile): stable across tiles
        starts = cursor.view(self.buckets, self.tiles)[:, 0].clone()
        order = inv = None
        if mode == MODE_SCATTER:
            order = torch.empty(self.n, dtype=torch.int64, device=self.device)
            inv = torch.empty(self.n, dtype=torch.int64, device=self.device) if inverse else None
            self._launch(in_order, by, shift, MODE_SCATTER, cursor, order, inv, None, 0, n_experts)
        else:
            self._launch(in_order, by, shift, MODE_MARK, cursor, None, None, starts, capacity, n_experts)
        return order, inv, starts


def _saturate(count: torch.Tensor) -> torch.Tensor:
    """An int64 count on the device as ``int32 [1]``, saturating at 2^31 - 1 (no host sync)."""
    return count.clamp(max=2**31 - 1).to(torch.int32).reshape(1)


def route_tables(expert_ids: torch.Tensor, n_experts: int, capacity: int | None = None, drop_policy: str = "probs",
                 priority: torch.Tensor | None = None, *, backend: Any = None) -> RouteTables:  # fmt: skip
    """Routing tables of ``expert_ids [T, k]`` (int64) over ``n_experts`` experts, with no host sync.

    ``order [T*k]`` lists the kept slots (flat slot ``s = t*k + j``) grouped by expert in ascending expert
    order, inside an expert in ascending slot index, then the dropped slots in ascending slot index;
    ``inverse`` is its inverse permutation; ``counts [E]`` kept slots per expert, ``offsets [E+1]`` their
    exclusive scan; ``kept [T, k]``. ``capacity=None`` is dropless; with a capacity C each expert keeps
    its first C slots by slot index (``drop_policy="position"``) or its C slots of highest ``priority``
    (``[T, k]`` float32, required; ties to the lower slot index; ``"probs"``). Ids outside ``[0, E)``
    are counted in ``invalid`` and dropped; NaN priorities are counted in ``nan_count``."""
    _check_tensor("expert_ids", expert_ids, torch.int64)
    E = _int_arg("n_experts", n_experts, 1, 2**31 - 2)
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
    n = expert_ids.numel()
    cap = None if capacity is None else min(_int_arg("capacity", capacity, 0), n)  # C >= T*k keeps everything
    use_priority = cap is not None and drop_policy == "probs"
    if use_priority:
        if priority is None:
            raise ValueError('priority is required for drop_policy="probs" with a capacity')
        _check_tensor("priority", priority, torch.float32)
        if priority.shape != expert_ids.shape:
            raise ValueError(f"priority shape {tuple(priority.shape)} != expert_ids shape {tuple(expert_ids.shape)}")
        if priority.device != expert_ids.device:
            raise ValueError(f"priority is on {priority.device}, expert_ids on {expert_ids.device}")
    device = expert_ids.device
    flat_ids = expert_ids.view(-1)
    in_range = (flat_ids >= 0) & (flat_ids < E)
    # counts on the device (saturating at 2^31 - 1, like route_topk's nan_count)
    invalid = _saturate(n - in_range.sum())
    nan_count = (
        _saturate(torch.isnan(priority).sum()) if use_priority and priority is not None
        else torch.zeros(1, dtype=torch.int32, device=device)
    )  # fmt: skip
    if n == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        zeros = torch.zeros(E + 1, dtype=torch.int64, device=device)
        return RouteTables(empty, empty.clone(), zeros[:E].clone(), zeros, in_range.view(expert_ids.shape), invalid,
                           nan_count)  # fmt: skip
    be = _backend(expert_ids, backend)
    kept = in_range if cap is None else torch.empty(n, dtype=torch.bool, device=device)
    ids_arg, kept_arg = be.plain(flat_ids), be.plain(kept)
    prio = priority if use_priority and priority is not None else torch.zeros(1, dtype=torch.float32, device=device)
    prio_arg = be.bits(prio.view(-1), "unsigned int")
    experts = _Pass(be, n, E + 1, device, ids_arg, prio_arg, kept_arg)  # bucket E: out-of-range / dropped
    if cap is not None:
        order = None
        if use_priority:  # stable LSD passes: slots by descending priority, ties in slot order
            digits = _Pass(be, n, 1 << DIGIT_BITS, device, ids_arg, prio_arg, kept_arg)
            for shift in range(0, 32, DIGIT_BITS):
                order, _, _ = digits.run(order, BY_PRIORITY, E, shift=shift)
        # by expert (stable: priority or slot order inside): kept = rank inside the expert < capacity
        experts.run(order, BY_EXPERT, E, mode=MODE_MARK, capacity=cap)
    final, inverse, starts = experts.run(None, BY_KEPT, E, inverse=True)
    assert final is not None and inverse is not None
    counts = starts[1:] - starts[:-1]  # starts = offsets: bucket E (dropped) begins at the kept total
    return RouteTables(final, inverse, counts, starts, kept.view(expert_ids.shape), invalid, nan_count)


__all__ = ["RouteTables", "route_tables", "route_topk", "sim_backend"]
