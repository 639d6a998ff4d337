"""Selection on CUDA tensors: launch code for ``cuda/select.cu``, written once against a backend.

A backend knows how to hand a tensor to a kernel and how to launch one: :class:`CupyBackend` runs
on the GPU (``cupy.RawModule`` on torch's current stream, tensors passed zero-copy by address),
:func:`sim_backend` runs the same kernels on the CPU through ``sparsekit._cudasim`` for the tests. So
the code below is the very code users run. Inputs arrive validated by ``sparsekit.select``
(contiguous, one dtype, one device, ``0 <= k <= n``); NaN is detected by the kernels.

Selection is a most-significant-digit radix select over the order-preserving key bits (11-bit digits)
across all tensors at once: a device table of (address, length, first chunk) lets every pass be one
launch over all tensors with nothing concatenated. The select's state (prefix, rank left, counts) lives
on the device, so a top-k is a chain of launches with one host synchronisation at the end: the NaN
count (NaN is detected by the first pass; policy: ``ValueError``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ._cuda import UNSIGNED_TYPES as _UNSIGNED
from ._cuda import Backend, CupyBackend, SimBackend, backend_for

RADIX_BITS = 11  # widest digit of a radix pass (SK_RADIX_BITS in common.cuh)
CHUNK = 4096  # elements of one tensor per block-step (SK_CHUNK in common.cuh)
THREADS = 256
MAX_NM_GRID = 4096  # nm_mask blocks at most (grid-stride over groups)
MAX_HIST_GRID = 1024  # radix_hist blocks at most (grid-stride over chunks): bounds the global atomics
STATE_WORDS = 4  # SK_STATE_WORDS: prefix, remaining, greater, equal
MAX_SELECTS = 1024  # SK_MAX_SELECTS: ranks sharing one radix_hist_multi launch
_NAN_MESSAGE = "x contains NaN; NaN scores cannot be ranked (replace them, e.g. with torch.nan_to_num)"


@dataclass(frozen=True)
class KeyFormat:
    bits: int
    ctype: str  # C type of the raw bits in the kernels
    nan_abs: int  # magnitude bits of +inf: anything above is NaN
    bits_dtype: torch.dtype  # signed torch dtype of the same width, to view the data as bits


FORMATS = {
    torch.float32: KeyFormat(32, "unsigned int", 0x7F80_0000, torch.int32),
    torch.float64: KeyFormat(64, "unsigned long long", 0x7FF0_0000_0000_0000, torch.int64),
    torch.float16: KeyFormat(16, "unsigned short", 0x7C00, torch.int16),
    torch.bfloat16: KeyFormat(16, "unsigned short", 0x7F80, torch.int16),
}
_KERNELS = ("radix_hist", "radix_hist_multi", "mask_at_least", "mask_trim_equal", "nm_mask")  # templates; radix_pick is extern "C"
# Block norms: the raw-bits type, the format (0 f32, 1 f64, 2 f16, 3 bf16) and the norm (0 l1, 1 l2, 2 max).
_NORM_FORMATS = {torch.float32: ("unsigned int", 0), torch.float64: ("unsigned long long", 1),
                 torch.float16: ("unsigned short", 2), torch.bfloat16: ("unsigned short", 3)}  # fmt: skip
_NORMS = {"l1": 0, "l2": 1, "max": 2}
NAME_EXPRESSIONS: tuple[str, ...] = tuple(
    f"{kernel}<{ctype}, {by_value}>" for kernel in _KERNELS for ctype in _UNSIGNED for by_value in (0, 1)
) + tuple(f"block_norms<{ctype}, {fmt}, {norm}>" for ctype, fmt in _NORM_FORMATS.values() for norm in _NORMS.values())


def _kernel_name(kernel: str, fmt: KeyFormat, by: str) -> str:
    return f"{kernel}<{fmt.ctype}, {int(by == 'value')}>"


def sim_backend(schedule: str = "forward", seed: int = 0, threads: int | None = None, race_check: bool = False) -> SimBackend:
    """The selection kernels on the CPU shim (tests)."""
    return SimBackend("select", NAME_EXPRESSIONS, schedule, seed, threads, race_check)


def _backend(t: torch.Tensor, backend: Backend | None) -> Backend:
    return backend_for("select", NAME_EXPRESSIONS, t, backend)


def _grid(n: int, per_block: int, cap: int) -> int:
    return max(1, min(cap, math.ceil(n / per_block)))


# --------------------------------------------------------------------------------- radix select
def radix_passes(bits: int) -> list[tuple[int, int, int]]:
    """``(prefix_shift, digit_shift, digit_bits)`` of each pass, most significant digit first: 11-bit
    digits, the last one narrower (16 bits: 11+5; 32: 11+11+10; 64: 5x11+9)."""
    passes, shift = [], bits
    while shift > 0:
        width = min(RADIX_BITS, shift)
        passes.append((shift, shift - width, width))
        shift -= width
    return passes


class _Table:
    """Everything a select needs from the host, uploaded in one int64 copy: the tensor table of
    ``select.cu`` (data addresses, mask addresses, lengths, chunk numbering ``chunk_start``: each pass
    is one launch over all tensors, nothing concatenated), then the initial state of each rank's select
    (plus one empty-prefix state for the first, shared pass), then the NaN counter."""

    def __init__(self, be: Backend, xs: Sequence[torch.Tensor], outs: Sequence[torch.Tensor] | None,
                 ranks: Sequence[int]) -> None:  # fmt: skip
        t, r = len(xs), len(ranks)
        lens = [x.numel() for x in xs]
        chunk_start = np.zeros(t + 1, dtype=np.int64)
        np.cumsum([-(-n // CHUNK) for n in lens], out=chunk_start[1:])
        state0 = 4 * t + 1
        words = np.zeros(state0 + (r + 1) * STATE_WORDS + 1, dtype=np.int64)
        words[:t] = [x.data_ptr() for x in xs]
        if outs is not None:
            words[t : 2 * t] = [o.data_ptr() for o in outs]
        words[2 * t : 3 * t] = lens
        words[3 * t : state0] = chunk_start
        words[state0 + 1 : state0 + r * STATE_WORDS : STATE_WORDS] = ranks  # SK_REMAINING of each rank
        self.chunks = int(chunk_start[-1])
        self.count = t
        self.words = be.upload(words)
        self.xs = be.bits(self.words[:t], "unsigned long long")
        self.outs = be.bits(self.words[t : 2 * t], "unsigned long long")
        self.lens = be.plain(self.words[2 * t : 3 * t])
        self.chunk_start = be.plain(self.words[3 * t : state0])
        self.states = self.words[state0 : state0 + (r + 1) * STATE_WORDS].view(r + 1, STATE_WORDS)
        self.nan = self.words[-1:]


def _select(be: Backend, tab: _Table, fmt: KeyFormat, by: str, ranks: Sequence[int]) -> torch.Tensor:
    """Radix select of each 1-based rank (the same ``ranks`` the table was built with, ascending) over
    the table, all on the device with no synchronisation.

    Every pass is shared by all ranks (a multi-rank select): the first pass's histogram has no prefix
    and serves every rank; each later pass is one ``radix_hist_multi`` over the data for all ranks (up to
    ``MAX_SELECTS`` per launch), so the data is read once per pass whatever the number of ranks, and
    one ``radix_pick`` launch of a block per rank follows each pass.

    Returns ``states``: ``states[r]`` = (key of the rank-th largest, rank left, keys greater, keys equal)
    as int64 words. ``tab.nan`` counts NaNs (the first pass counts them even when ``ranks`` is empty)."""
    assert list(ranks) == sorted(ranks), "ranks must be ascending (radix_hist_multi relies on it)"
    passes = radix_passes(fmt.bits)
    bins = 1 << RADIX_BITS
    device = tab.words.device
    grid = _grid(tab.chunks, 1, MAX_HIST_GRID)
    prefix_shift, digit_shift, digit_bits = passes[0]
    first = torch.zeros(bins, dtype=torch.int64, device=device)
    be.launch(_kernel_name("radix_hist", fmt, by), grid, THREADS, (
        tab.xs, tab.lens, tab.chunk_start, np.int32(tab.count), be.plain(tab.states[len(ranks)]), np.int32(prefix_shift),
        np.int32(digit_shift), np.int32(digit_bits), np.int32(1), _UNSIGNED[fmt.ctype][0](fmt.nan_abs),
        be.bits(first, "unsigned long long"), be.bits(tab.nan, "unsigned long long"),
    ))  # fmt: skip
    if not ranks:
        return tab.states[:0]
    batches = [(lo, min(lo + MAX_SELECTS, len(ranks))) for lo in range(0, len(ranks), MAX_SELECTS)]
    for lo, hi in batches:
        be.launch("radix_pick", hi - lo, THREADS, (be.bits(first, "unsigned long long"), np.int64(0), np.int32(digit_bits),
                                                   be.plain(tab.states[lo:hi])))  # fmt: skip
    hist = torch.empty((min(len(ranks), MAX_SELECTS), bins), dtype=torch.int64, device=device)
    multi = _kernel_name("radix_hist_multi", fmt, by)
    for prefix_shift, digit_shift, digit_bits in passes[1:]:
        for lo, hi in batches:
            hist.zero_()
            states = be.plain(tab.states[lo:hi])
            be.launch(multi, grid, THREADS, (
                tab.xs, tab.lens, tab.chunk_start, np.int32(tab.count), states, np.int32(hi - lo), np.int32(prefix_shift),
                np.int32(digit_shift), np.int32(digit_bits), be.bits(hist, "unsigned long long"),
            ))  # fmt: skip
            be.launch("radix_pick", hi - lo, THREADS, (be.bits(hist, "unsigned long long"), np.int64(bins),
                                                       np.int32(digit_bits), states))  # fmt: skip
    return tab.states[: len(ranks)]


def topk_masks(
    tensors: list[torch.Tensor], k: int, by: str, *, out: list[torch.Tensor] | None = None, backend: Backend | None = None
) -> list[torch.Tensor]:
    """One exact top-k across ``tensors`` (same semantics as the CPU path); bool masks on their device,
    written into ``out`` (contiguous bool tensors shaped like the inputs) when given.

    Launches: one ``radix_hist`` + ``radix_pick`` per pass (2/3/6 passes for 16/32/64-bit keys), one
    ``mask_at_least``, one ``mask_trim_equal`` (returns at once in chunks without a partly kept tie),
    and a single host synchronisation at the end (the NaN count)."""
    flat = [t.reshape(-1) for t in tensors]
    total = sum(x.numel() for x in flat)
    if out is not None:
        masks = out
        if k == 0:
            for m in masks:
                m.zero_()
    else:
        alloc = torch.empty if k > 0 else torch.zeros  # mask_at_least writes every element
        masks = [alloc(t.shape, dtype=torch.bool, device=t.device) for t in tensors]
    if total == 0:
        return masks
    be = _backend(flat[0], backend)
    fmt = FORMATS[flat[0].dtype]
    device = flat[0].device
    ranks = [k] if k > 0 else []
    tab = _Table(be, flat, [m.view(-1) for m in masks], ranks)
    states = _select(be, tab, fmt, by, ranks)
    if k > 0:
        state = be.plain(states[0])
        counts = torch.empty(tab.chunks, dtype=torch.int64, device=device)
        be.launch(_kernel_name("mask_at_least", fmt, by), tab.chunks, THREADS, (
            tab.xs, tab.outs, tab.lens, tab.chunk_start, np.int32(tab.count), state, be.bits(counts, "unsigned long long"),
        ))  # fmt: skip
        before = torch.cumsum(counts, 0) - counts  # equal keys in earlier chunks: global index order
        be.launch(_kernel_name("mask_trim_equal", fmt, by), tab.chunks, THREADS, (
            tab.xs, tab.outs, tab.lens, tab.chunk_start, np.int32(tab.count), state, np.int64(k),
            be.bits(counts, "unsigned long long"), be.plain(before),
        ))  # fmt: skip
    if int(be.read(tab.nan)[0]):
        raise ValueError(_NAN_MESSAGE)
    return masks


def values_of_keys(keys: torch.Tensor, fmt: KeyFormat, dtype: torch.dtype, by: str) -> torch.Tensor:
    """Map int64 words holding order-preserving keys back to the scores they rank (``|x|`` for
    ``by="abs"``, ``-0.0`` kept for ``by="value"``), on the keys' device with torch integer ops (no sync)."""
    sign = -(1 << 63) if fmt.bits == 64 else 1 << (fmt.bits - 1)
    full = -1 if fmt.bits == 64 else (1 << fmt.bits) - 1
    if by == "abs":
        bits = keys
    else:
        bits = torch.where((keys & sign) != 0, keys & ~sign, ~keys & full)
    if fmt.bits < 64:  # unsigned pattern -> the signed integer of the same width, then reinterpret
        bits = torch.where((bits & sign) != 0, bits - (1 << fmt.bits), bits).to(fmt.bits_dtype)
    return bits.view(dtype)


def kth_values(x: torch.Tensor, ranks: list[int], by: str, *, backend: Backend | None = None) -> torch.Tensor:
    """For each 1-based rank, the rank-th largest score (``|x|`` for ``by="abs"``): a 1-D tensor of
    ``x``'s dtype on its device.

    All ranks share the first radix pass; the values never leave the device, and the one host
    synchronisation is the NaN count."""
    flat = x.reshape(-1)
    if flat.numel() == 0:
        return torch.empty(0, dtype=x.dtype, device=x.device)  # ranks must be empty (1 <= rank <= n)
    be = _backend(flat, backend)
    fmt = FORMATS[flat.dtype]
    unique = sorted(set(ranks))
    tab = _Table(be, [flat], None, unique)
    states = _select(be, tab, fmt, by, unique)
    values = values_of_keys(states[:, 0].clone(), fmt, flat.dtype, by)  # ranks=[]: a NaN scan only
    if unique != list(ranks):
        slot = {r: i for i, r in enumerate(unique)}
        values = values[be.upload(np.array([slot[r] for r in ranks], dtype=np.int64))]
    if int(be.read(tab.nan)[0]):
        raise ValueError(_NAN_MESSAGE)
    return values


def nm_mask(
    x: torch.Tensor, n: int, m: int, dim: int, by: str, *, out: torch.Tensor | None = None, backend: Backend | None = None
) -> torch.Tensor:
    """N:M mask along ``dim`` of a contiguous ``x`` (same semantics as the CPU path); the kernel writes
    every element of ``out`` (allocated if not given)."""
    out = out if out is not None else torch.empty(x.shape, dtype=torch.bool, device=x.device)
    length = x.shape[dim]
    inner = math.prod(x.shape[dim + 1 :])
    groups = x.numel() // m
    if groups == 0:
        return out
    be = _backend(x, backend)
    fmt = FORMATS[x.dtype]
    nan = torch.zeros(1, dtype=torch.int32, device=x.device)
    be.launch(_kernel_name("nm_mask", fmt, by), _grid(groups, THREADS, MAX_NM_GRID), THREADS, (
        be.bits(x.reshape(-1), fmt.ctype), be.plain(out.view(-1)), np.int64(groups), np.int64(length), np.int64(inner),
        np.int32(n), np.int32(m), _UNSIGNED[fmt.ctype][0](fmt.nan_abs), be.bits(nan, "unsigned int"),
    ))  # fmt: skip
    if int(be.read(nan)[0]):
        raise ValueError(_NAN_MESSAGE)
    return out


def block_topk_mask(
    x: torch.Tensor, block: tuple[int, int], k: int, norm: str, *, out: torch.Tensor | None = None,
    backend: Backend | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Block top-k of a contiguous 2-D ``x``: ``block_norms`` computes every block's float64 norm in the
    Rust core's summation order (so both paths choose the same blocks), then the selection kernels keep
    the ``k`` largest by value. A NaN makes its block's norm NaN, which the selection refuses.

    Returns ``(element mask, block mask)``; the element mask is written into ``out`` when given."""
    (bh, bw), (rows, cols) = block, x.shape
    grid = (rows // bh, cols // bw)
    scores = torch.empty(grid, dtype=torch.float64, device=x.device)
    be: Backend | None = backend
    if scores.numel():
        be = _backend(x, backend)
        ctype, fmt = _NORM_FORMATS[x.dtype]
        be.launch(f"block_norms<{ctype}, {fmt}, {_NORMS[norm]}>", _grid(scores.numel(), THREADS, MAX_NM_GRID), THREADS, (
            be.bits(x.reshape(-1), ctype), np.int64(rows), np.int64(cols), np.int32(bh), np.int32(bw),
            be.plain(scores.view(-1)),
        ))  # fmt: skip
    block_mask = topk_masks([scores], k, "value", backend=be)[0]
    mask = out if out is not None else torch.empty(x.shape, dtype=torch.bool, device=x.device)
    mask.view(grid[0], bh, grid[1], bw).copy_(block_mask[:, None, :, None].expand(grid[0], bh, grid[1], bw))
    return mask, block_mask


__all__ = ["block_topk_mask", "kth_values", "nm_mask", "sim_backend", "topk_masks", "values_of_keys"]
