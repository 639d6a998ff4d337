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
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from ._cuda import compile_options, get_function, import_cupy, kernel_source

RADIX_BITS = 11  # widest digit of a radix pass (SK_RADIX_BITS in common.cuh)
CHUNK = 4096  # elements of one tensor per block-step (SK_CHUNK in common.cuh)
THREADS = 256
MAX_NM_GRID = 4096  # nm_mask blocks at most (grid-stride over groups)
MAX_HIST_GRID = 1024  # radix_hist blocks at most (grid-stride over chunks): bounds the global atomics
STATE_WORDS = 4  # SK_STATE_WORDS: prefix, remaining, greater, equal
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
_UNSIGNED = {"unsigned int": (np.uint32, torch.uint32), "unsigned long long": (np.uint64, torch.uint64),
             "unsigned short": (np.uint16, torch.uint16)}  # fmt: skip
_KERNELS = ("radix_hist", "mask_at_least", "mask_trim_equal", "nm_mask")  # templates; radix_pick is extern "C"
NAME_EXPRESSIONS: tuple[str, ...] = tuple(
    f"{kernel}<{ctype}, {by_value}>" for kernel in _KERNELS for ctype in _UNSIGNED for by_value in (0, 1)
)


def _kernel_name(kernel: str, fmt: KeyFormat, by: str) -> str:
    return f"{kernel}<{fmt.ctype}, {int(by == 'value')}>"


class Backend(Protocol):
    def bits(self, t: torch.Tensor, ctype: str) -> Any:
        """``t`` (1-D, contiguous) as an array of the unsigned C type ``ctype``, zero-copy."""

    def plain(self, t: torch.Tensor) -> Any:
        """``t`` as a kernel argument of its own dtype (bool, int64)."""

    def launch(self, name: str, grid: int, block: int, args: tuple[Any, ...]) -> None: ...


class _DeviceArg:
    """A tensor waiting to be handed to cupy by DLPack, viewed as ``np_type`` if given."""

    __slots__ = ("np_type", "tensor")

    def __init__(self, tensor: torch.Tensor, np_type: Any = None) -> None:
        self.tensor, self.np_type = tensor, np_type


_SIGNED_OF = {np.uint16: torch.int16, np.uint32: torch.int32, np.uint64: torch.int64}


class CupyBackend:
    """Kernels compiled by ``cupy.RawModule`` for the tensors' device, launched on torch's current
    stream of that device under a cupy device guard.

    Tensors cross by DLPack, zero-copy. The exchange happens inside the launch's stream context, so
    producer (torch's current stream) and consumer are the same stream and no cross-stream event is
    needed. Unsigned views go through the signed dtype of the same width (torch's DLPack export of
    uint32/uint64 is limited) and are reinterpreted by cupy. The pointer table of a many-tensor
    selection necessarily holds raw device addresses; every tensor it names is kept alive by the
    launch code until the call's final host synchronisation. The argument types are checked by the CPU
    shim (:class:`SimBackend`), which runs this same launch code."""

    def __init__(self, device: torch.device) -> None:
        self.cupy = import_cupy()
        self.device = device
        self.index = device.index if device.index is not None else torch.cuda.current_device()

    def bits(self, t: torch.Tensor, ctype: str) -> Any:
        return _DeviceArg(t, _UNSIGNED[ctype][0])

    def plain(self, t: torch.Tensor) -> Any:
        return _DeviceArg(t)

    def _to_cupy(self, arg: Any) -> Any:
        if not isinstance(arg, _DeviceArg):
            return arg
        if arg.np_type is None:
            return self.cupy.from_dlpack(arg.tensor)
        return self.cupy.from_dlpack(arg.tensor.view(_SIGNED_OF[arg.np_type])).view(arg.np_type)

    def launch(self, name: str, grid: int, block: int, args: tuple[Any, ...]) -> None:
        kernel = get_function("select", NAME_EXPRESSIONS, self.index, name)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        with self.cupy.cuda.Device(self.index), self.cupy.cuda.ExternalStream(stream):
            kernel((grid,), (block,), tuple(self._to_cupy(a) for a in args))


class SimBackend:
    """The same kernels on the CPU through the fiber shim (tests): tensors are CPU tensors."""

    def __init__(self, schedule: str = "forward", seed: int = 0, threads: int | None = None) -> None:
        from ._cudasim import SimRawModule

        self.module = SimRawModule(
            kernel_source("select"), compile_options(), NAME_EXPRESSIONS, schedule=schedule, seed=seed, threads=threads
        )

    def bits(self, t: torch.Tensor, ctype: str) -> Any:
        return t.view(_UNSIGNED[ctype][1])

    def plain(self, t: torch.Tensor) -> Any:
        return t

    def launch(self, name: str, grid: int, block: int, args: tuple[Any, ...]) -> None:
        self.module.get_function(name)((grid,), (block,), args)


def sim_backend(schedule: str = "forward", seed: int = 0, threads: int | None = None) -> SimBackend:
    return SimBackend(schedule, seed, threads)


def _backend(t: torch.Tensor, backend: Backend | None) -> Backend:
    return backend if backend is not None else CupyBackend(t.device)


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
        self.words = torch.from_numpy(words).to(xs[0].device)
        self.xs = be.bits(self.words[:t], "unsigned long long")
        self.outs = be.bits(self.words[t : 2 * t], "unsigned long long")
        self.lens = be.plain(self.words[2 * t : 3 * t])
        self.chunk_start = be.plain(self.words[3 * t : state0])
        self.states = self.words[state0 : state0 + (r + 1) * STATE_WORDS].view(r + 1, STATE_WORDS)
        self.nan = self.words[-1:]


def _select(be: Backend, tab: _Table, fmt: KeyFormat, by: str, ranks: Sequence[int]) -> torch.Tensor:
    """Radix select of each 1-based rank (the same ``ranks`` the table was built with) over the table,
    all on the device with no synchronisation.

    Returns ``states``: ``states[r]`` = (key of the rank-th largest, rank left, keys greater, keys equal)
    as int64 words. ``tab.nan`` counts NaNs (the first pass, shared by all ranks, counts them even when
    ``ranks`` is empty)."""
    passes = radix_passes(fmt.bits)
    bins = 1 << RADIX_BITS
    hist = torch.zeros((1 + len(ranks) * (len(passes) - 1), bins), dtype=torch.int64, device=tab.words.device)
    hist_name, nan_abs = _kernel_name("radix_hist", fmt, by), _UNSIGNED[fmt.ctype][0](fmt.nan_abs)
    grid = _grid(tab.chunks, 1, MAX_HIST_GRID)
    nan_arg = be.bits(tab.nan, "unsigned long long")

    def histogram(state: torch.Tensor, row: int, pass_: tuple[int, int, int], count_nan: bool) -> None:
        prefix_shift, digit_shift, digit_bits = pass_
        be.launch(hist_name, grid, THREADS, (
            tab.xs, tab.lens, tab.chunk_start, np.int32(tab.count), be.plain(state), np.int32(prefix_shift),
            np.int32(digit_shift), np.int32(digit_bits), np.int32(count_nan), nan_abs,
            be.bits(hist[row], "unsigned long long"), nan_arg,
        ))  # fmt: skip

    def pick(state: torch.Tensor, row: int, pass_: tuple[int, int, int]) -> None:
        be.launch("radix_pick", 1, THREADS, (be.bits(hist[row], "unsigned long long"), np.int32(pass_[2]), be.plain(state)))

    histogram(tab.states[len(ranks)], 0, passes[0], True)
    for r in range(len(ranks)):
        pick(tab.states[r], 0, passes[0])
        for p, pass_ in enumerate(passes[1:]):
            row = 1 + r * (len(passes) - 1) + p
            histogram(tab.states[r], row, pass_, False)
            pick(tab.states[r], row, pass_)
    return tab.states[: len(ranks)]


def topk_masks(tensors: list[torch.Tensor], k: int, by: str, *, backend: Backend | None = None) -> list[torch.Tensor]:
    """One exact top-k across ``tensors`` (same semantics as the CPU path); bool masks on their device.

    Launches: one ``radix_hist`` + ``radix_pick`` per pass (2/3/6 passes for 16/32/64-bit keys), one
    ``mask_at_least``, one ``mask_trim_equal`` (returns at once in chunks without a partly kept tie),
    and a single host synchronisation at the end (the NaN count)."""
    flat = [t.reshape(-1) for t in tensors]
    total = sum(x.numel() for x in flat)
    if total == 0:
        return [torch.zeros(t.shape, dtype=torch.bool, device=t.device) for t in tensors]
    alloc = torch.empty if k > 0 else torch.zeros  # mask_at_least writes every element
    masks = [alloc(t.shape, dtype=torch.bool, device=t.device) for t in tensors]
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
    if int(tab.nan.item()):
        raise ValueError(_NAN_MESSAGE)
    return masks


def _value_of_key(key: int, fmt: KeyFormat, dtype: torch.dtype, by: str) -> float:
    sign = 1 << (fmt.bits - 1)
    full = (1 << fmt.bits) - 1
    bits = key if by == "abs" else (key & ~sign if key & sign else ~key & full)
    signed = bits - (1 << fmt.bits) if bits & sign else bits
    return float(torch.tensor([signed], dtype=fmt.bits_dtype).view(dtype).item())


def kth_values(x: torch.Tensor, ranks: list[int], by: str, *, backend: Backend | None = None) -> list[float]:
    """For each 1-based rank, the value of the rank-th largest score (``|x|`` for ``by="abs"``).

    All ranks share the first radix pass; one host synchronisation reads every key back."""
    flat = x.reshape(-1)
    if flat.numel() == 0:
        return []  # ranks must be empty (1 <= rank <= n)
    be = _backend(flat, backend)
    fmt = FORMATS[flat.dtype]
    tab = _Table(be, [flat], None, ranks)
    states = _select(be, tab, fmt, by, ranks)
    words = torch.cat([tab.nan, states[:, 0]]).tolist()
    if words[0]:
        raise ValueError(_NAN_MESSAGE)
    return [_value_of_key(w & 0xFFFF_FFFF_FFFF_FFFF, fmt, flat.dtype, by) for w in words[1:]]


def nm_mask(x: torch.Tensor, n: int, m: int, dim: int, by: str, *, backend: Backend | None = None) -> torch.Tensor:
    """N:M mask along ``dim`` of a contiguous ``x`` (same semantics as the CPU path)."""
    out = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
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
    if int(nan.item()):
        raise ValueError(_NAN_MESSAGE)
    return out


__all__ = ["CupyBackend", "SimBackend", "kth_values", "nm_mask", "sim_backend", "topk_masks"]
