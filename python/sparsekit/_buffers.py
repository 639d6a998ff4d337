"""Outputs of the Rust kernels from the core's buffer cache (``rust/sparsekit-core/src/buffers.rs``).

torch's CPU allocator returns large tensors to the OS when they are freed, so each call's fresh output is
faulted in again page by page; for the block-sparse forward and the routing tables that costs about as much
as the kernel. Outputs of at least 1 MiB are taken from a cache of buffers freed by earlier calls (same size
only), so a training loop's steps write into memory that is already mapped. See :func:`sparsekit.buffer_cache_info`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch

from . import _core


_bypass = False


@contextlib.contextmanager
def bypassed() -> Iterator[None]:
    """Inside, outputs are fresh ``torch.empty`` tensors and the cache is left as it is (benchmarks compare
    both in one process)."""
    global _bypass
    old, _bypass = _bypass, True
    try:
        yield
    finally:
        _bypass = old


def empty(shape: tuple[int, ...] | int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor (like ``torch.empty``), from the buffer cache when it is large enough
    and the cache is on (``SPARSEKIT_BUFFER_CACHE_MB``, default 1024; 0 turns it off)."""
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = math.prod(dims) * dtype.itemsize
    if _bypass or nbytes < _core.buffer_cache_min_bytes or _core.buffer_cache_stats()[2] < nbytes:
        return torch.empty(dims, dtype=dtype)
    return torch.from_numpy(_core.cached_empty(nbytes)).view(dtype).view(dims)
