"""Selection on CUDA tensors: launch code for ``cuda/select.cu``, written once against a backend.

A backend knows how to hand a tensor to a kernel and how to launch one: :class:`CupyBackend` runs
on the GPU (``cupy.RawModule`` on torch's current stream, tensors shared zero-copy by DLPack),
:func:`sim_backend` runs the same kernels on the CPU through ``sparsekit._cudasim`` for the tests. So
the code below is the very code users run. Inputs arrive validated by ``sparsekit.select``
(contiguous, one dtype, one device, ``0 <= k <= n``); NaN is detected by the kernels.

Selection is a most-significant-digit radix select over the order-preserving key bits (8 bits a pass),
across all tensors at once (each pass launches once per tensor into one shared histogram: nothing is
concatenated), then one mask pass, plus a tie-trimming pass only when the k-th key is tied and only
part of the tie is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from ._cuda import compile_options, get_module, import_cupy, kernel_source

RADIX_BITS = 8
CHUNK = 4096  # elements per block in the mask kernels (SK_CHUNK in common.cuh)
THREADS = 256
MAX_GRID = 4096


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
_KERNELS = ("radix_hist", "mask_at_least", "mask_trim_equal", "nm_mask")
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


class CupyBackend:
    """Kernels compiled by ``cupy.RawModule`` for the tensors' device, launched on torch's current stream."""

    def __init__(self, device: torch.device) -> None:
        self.cupy = import_cupy()
        self.device = device
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.module = get_module("select", NAME_EXPRESSIONS, self.index)

    def bits(self, t: torch.Tensor, ctype: str) -> Any:
        np_type = _UNSIGNED[ctype][0]
        signed = {np.uint16: torch.int16, np.uint32: torch.int32, np.uint64: torch.int64}[np_type]
        return self.cupy.from_dlpack(t.view(signed)).view(np_type)

    def plain(self, t: torch.Tensor) -> Any:
        return self.cupy.from_dlpack(t)

    def launch(self, name: str, grid: int, block: int, args: tuple[Any, ...]) -> None:
        stream = torch.cuda.current_stream(self.device).cuda_stream
        with self.cupy.cuda.Device(self.index), self.cupy.cuda.ExternalStream(stream):
            self.module.get_function(name)((grid,), (block,), args)


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


def _grid(n: int, per_block: int) -> int:
    return max(1, min(MAX_GRID, math.ceil(n / per_block)))


# --------------------------------------------------------------------------------- radix select
def _threshold(be: Backend, xs: Sequence[torch.Tensor], fmt: KeyFormat, by: str, rank: int) -> tuple[int, int, int]:
    """(key, greater, equal) of the ``rank``-th largest key (1-based) over all of ``xs``."""
    device = xs[0].device
    prefix, prefix_shift, greater, remaining, equal = 0, fmt.bits, 0, rank, 0
    name = _kernel_name("radix_hist", fmt, by)
    for digit_shift in range(fmt.bits - RADIX_BITS, -1, -RADIX_BITS):
        hist = torch.zeros(1 << RADIX_BITS, dtype=torch.int64, device=device)
        nan = torch.zeros(1, dtype=torch.int32, device=device)
        for x in xs:
            n = x.numel()
            if n == 0:
                continue
            be.launch(name, _grid(n, THREADS), THREADS, (
                be.bits(x, fmt.ctype), np.int64(n), np.uint64(prefix), np.int32(prefix_shift), np.int32(digit_shift),
                _UNSIGNED[fmt.ctype][0](fmt.nan_abs), be.bits(hist, "unsigned long long"), be.bits(nan, "unsigned int"),
            ))  # fmt: skip
        if prefix_shift == fmt.bits and int(nan.item()):
            raise ValueError("x contains NaN; NaN scores cannot be ranked (replace them, e.g. with torch.nan_to_num)")
        counts = hist.tolist()
        above = 0
        for digit in range(len(counts) - 1, -1, -1):
            if above + counts[digit] >= remaining:
                break
            above += counts[digit]
        greater += above
        remaining -= above
        equal = counts[digit]
        prefix, prefix_shift = (prefix << RADIX_BITS) | digit, digit_shift
    return prefix, greater, equal


def _check_no_nan(xs: Sequence[torch.Tensor]) -> None:
    if any(bool(torch.isnan(x).any()) for x in xs if x.numel()):
        raise ValueError("x contains NaN; NaN scores cannot be ranked (replace them, e.g. with torch.nan_to_num)")


def topk_masks(tensors: list[torch.Tensor], k: int, by: str, *, backend: Backend | None = None) -> list[torch.Tensor]:
    """One exact top-k across ``tensors`` (same semantics as the CPU path); bool masks on their device."""
    masks = [torch.zeros(t.shape, dtype=torch.bool, device=t.device) for t in tensors]
    flat = [t.reshape(-1) for t in tensors]
    if k == 0 or not flat:
        _check_no_nan(flat)
        return masks
    be = _backend(flat[0], backend)
    fmt = FORMATS[flat[0].dtype]
    key, greater, equal = _threshold(be, flat, fmt, by, k)
    at_least = _kernel_name("mask_at_least", fmt, by)
    equal_counts = []
    for x, m in zip(flat, masks):
        blocks = math.ceil(x.numel() / CHUNK)
        counts = torch.zeros(blocks, dtype=torch.int64, device=x.device)
        if blocks:
            be.launch(at_least, blocks, THREADS, (
                be.bits(x, fmt.ctype), np.int64(x.numel()), np.uint64(key), be.plain(m.view(-1)),
                be.bits(counts, "unsigned long long"),
            ))  # fmt: skip
        equal_counts.append(counts)
    take = k - greater
    if take < equal:
        # Hand out the `take` kept ties in global index order: blocks in tensor order, then index.
        counts = torch.cat(equal_counts)
        before = torch.cumsum(counts, 0) - counts
        keep = (take - before).clamp(min=0)
        trim = _kernel_name("mask_trim_equal", fmt, by)
        offset = 0
        for x, m, c in zip(flat, masks, equal_counts):
            blocks = c.numel()
            if blocks:
                be.launch(trim, blocks, THREADS, (
                    be.bits(x, fmt.ctype), np.int64(x.numel()), np.uint64(key), be.plain(m.view(-1)),
                    be.bits(c, "unsigned long long"), be.plain(keep[offset : offset + blocks].contiguous()),
                ))  # fmt: skip
            offset += blocks
    return masks


def _value_of_key(key: int, fmt: KeyFormat, dtype: torch.dtype, by: str) -> float:
    sign = 1 << (fmt.bits - 1)
    full = (1 << fmt.bits) - 1
    bits = key if by == "abs" else (key & ~sign if key & sign else ~key & full)
    signed = bits - (1 << fmt.bits) if bits & sign else bits
    return float(torch.tensor([signed], dtype=fmt.bits_dtype).view(dtype).item())


def kth_values(x: torch.Tensor, ranks: list[int], by: str, *, backend: Backend | None = None) -> list[float]:
    """For each 1-based rank, the value of the rank-th largest score (``|x|`` for ``by="abs"``)."""
    flat = x.reshape(-1)
    be = _backend(flat, backend)
    fmt = FORMATS[flat.dtype]
    return [_value_of_key(_threshold(be, [flat], fmt, by, r)[0], fmt, flat.dtype, by) for r in ranks]


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
    be.launch(_kernel_name("nm_mask", fmt, by), _grid(groups, THREADS), THREADS, (
        be.bits(x.reshape(-1), fmt.ctype), be.plain(out.view(-1)), np.int64(groups), np.int64(length), np.int64(inner),
        np.int32(n), np.int32(m), _UNSIGNED[fmt.ctype][0](fmt.nan_abs), be.bits(nan, "unsigned int"),
    ))  # fmt: skip
    if int(nan.item()):
        raise ValueError("x contains NaN; NaN scores cannot be ranked (replace them, e.g. with torch.nan_to_num)")
    return out


__all__ = ["CupyBackend", "SimBackend", "kth_values", "nm_mask", "sim_backend", "topk_masks"]
