"""Dynamic sparse training: :class:`DynamicSparsity` (magnitude / SET / RigL / gradient top-k / custom
scores), schedules (:class:`Constant`, :class:`Progressive`, :class:`Cubic`), distributions (uniform,
global, ERK) and structures (unstructured, N:M, blocks). See docs/sparsity.md."""

from .controller import DynamicSparsity, erk_counts, pack_mask, unpack_mask
from .schedules import Constant, Cubic, Progressive, Schedule

__all__ = [
    "Constant",
    "Cubic",
    "DynamicSparsity",
    "Progressive",
    "Schedule",
    "erk_counts",
    "pack_mask",
    "unpack_mask",
]
