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
"""

from . import _core, comm, moe, nn, ops, sparsity
from .blocksparse import BlockSparseMatrix
from .select import block_topk_mask, global_topk_masks, kth_largest, nm_mask, quantile, topk_mask

__version__: str = _core.__version__

__all__ = [
    "BlockSparseMatrix",
    "__version__",
    "block_topk_mask",
    "get_num_threads",
    "global_topk_masks",
    "kth_largest",
    "nm_mask",
    "quantile",
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
