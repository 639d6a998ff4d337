"""sparsekit: exact, fast selection and sparse-training building blocks for PyTorch.

Selection (``sparsekit.select``): :func:`topk_mask`, :func:`global_topk_masks`, :func:`nm_mask`,
:func:`block_topk_mask`, :func:`kth_largest`, :func:`quantile`. CPU tensors run in the Rust core
(``sparsekit._core``), CUDA tensors in the kernels under ``cuda/`` (needs ``pip install sparsekit[cuda]``).

Subpackages: ``sparsekit.sparsity`` (dynamic sparse training), ``sparsekit.moe`` (routing, dispatch, the MoE
layer, load balancing), ``sparsekit.comm`` (gradient buckets and sync over torch.distributed),
``sparsekit.ops`` / ``sparsekit.nn`` (block-sparse GEMM ops and ``BlockSparseLinear``) with
:class:`BlockSparseMatrix`; ``sparsekit.testing`` (the CUDA simulation switch).

Threads: the Rust core uses its own rayon pool, sized by the ``SPARSEKIT_NUM_THREADS`` environment
variable (default: all cores) or :func:`set_num_threads`; it is rebuilt in forked children
(DataLoader workers), so forking is safe.

Memory: large kernel outputs (block-sparse products, routing tables) come from a cache of buffers freed by
earlier calls, so a training loop does not fault fresh pages in every step; see :func:`buffer_cache_info`.
"""

from . import _core, comm, moe, nn, ops, sparsity
from .blocksparse import BlockSparseMatrix
from .select import block_topk_mask, global_topk_masks, kth_largest, nm_mask, quantile, topk_mask

__version__: str = _core.__version__

__all__ = [
    "BlockSparseMatrix",
    "__version__",
    "block_topk_mask",
    "buffer_cache_info",
    "empty_buffer_cache",
    "get_num_threads",
    "global_topk_masks",
    "kth_largest",
    "nm_mask",
    "quantile",
    "set_buffer_cache_limit",
    "set_num_threads",
    "topk_mask",
]


def set_num_threads(n: int) -> None:
    """Set the Rust core's worker thread count, in ``[0, 1024]``; ``0`` restores the default
    (``SPARSEKIT_NUM_THREADS``, capped at 1024, or the number of cores). Results never depend on it.

    Raises:
        ValueError: ``n`` not an int in ``[0, 1024]``. A pool the OS then cannot start raises
        ``RuntimeError`` at the next parallel call.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= _core.MAX_THREADS:
        raise ValueError(f"n must be an int in [0, {_core.MAX_THREADS}], got {n!r}")
    _core.set_num_threads(n)


def get_num_threads() -> int:
    """The Rust core's worker thread count for the next call."""
    return _core.get_num_threads()


def buffer_cache_info() -> dict:
    """The cache of large output buffers: ``{"idle_buffers", "idle_bytes", "limit_bytes", "min_bytes"}``.

    Outputs of the Rust kernels of at least ``min_bytes`` (1 MiB) are taken from buffers that earlier
    outputs of exactly the same size left when they were freed, so repeated steps write into memory that is
    already mapped (torch's CPU allocator gives large blocks back to the OS, and faulting a fresh 32 MiB
    output in costs about as much as a block-sparse product at 10 % density). At most ``limit_bytes`` are
    kept idle (``SPARSEKIT_BUFFER_CACHE_MB``, default 1024; 0 turns the cache off), oldest freed first;
    buffers in use are never counted or touched.
    """
    n, idle, limit = _core.buffer_cache_stats()
    return {"idle_buffers": n, "idle_bytes": idle, "limit_bytes": limit, "min_bytes": _core.buffer_cache_min_bytes}


def set_buffer_cache_limit(mb: float) -> None:
    """Keep at most ``mb`` MiB of idle output buffers (0 turns the cache off); idle buffers over the new
    limit are freed at once.

    Raises:
        ValueError: ``mb`` negative or not a number.
    """
    if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not mb >= 0:
        raise ValueError(f"mb must be a number >= 0, got {mb!r}")
    _core.buffer_cache_set_limit(int(mb * (1 << 20)))


def empty_buffer_cache() -> None:
    """Free every idle output buffer (their memory goes back to the OS); tensors in use are unaffected."""
    _core.buffer_cache_clear()
