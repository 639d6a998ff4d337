"""Block-sparse (BSR) matrices with transpose metadata, for the kernels in :mod:`sparsekit.ops`."""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def _check_layout(row_offsets: torch.Tensor, col_indices: torch.Tensor, block_cols: int) -> None:
    """Refuses layouts the kernels could not read safely (the Rust core checks again on every call)."""
    nnz = col_indices.numel()
    if row_offsets.numel() and (int(row_offsets[0]) != 0 or int(row_offsets[-1]) != nnz):
        raise ValueError(f"row_offsets: must start at 0 and end at nnz = {nnz}")
    if bool((torch.diff(row_offsets) < 0).any()):
        raise ValueError("row_offsets: must be non-decreasing")
    if nnz and (int(col_indices.min()) < 0 or int(col_indices.max()) >= block_cols):
        raise ValueError(f"col_indices: must lie in [0, {block_cols})")
    # Strictly increasing within each block-row: a step <= 0 may only happen where a new row starts.
    starts = torch.zeros(nnz, dtype=torch.bool)
    starts[row_offsets[:-1][row_offsets[:-1] < nnz]] = True
    if nnz > 1 and bool(((torch.diff(col_indices) <= 0) & ~starts[1:]).any()):
        raise ValueError("col_indices: must be strictly increasing within each block-row")


def block_rows(row_offsets: torch.Tensor, nnz: int) -> torch.Tensor:
    """The block-row of each of the ``nnz`` stored blocks (``searchsorted``: ``repeat_interleave`` with a
    tensor of values is orders of magnitude slower on small inputs)."""
    return torch.searchsorted(row_offsets[1:], torch.arange(nnz, device=row_offsets.device), right=True)


class BlockSparseMatrix:
    """An ``[N, K]`` matrix stored as ``nnz`` dense ``(bh, bw)`` blocks in block-row order.

    Layout tensors (int64): ``row_offsets`` [N/bh+1], ``col_indices`` [nnz] (strictly increasing within a block-row),
    ``t_offsets`` [K/bw+1], ``t_perm`` [nnz] (j-th block in column order -> row-ordered index),
    ``t_row_indices`` [nnz]; ``values`` is ``[nnz, bh, bw]``.
    """

    def __init__(self, shape: Tuple[int, int], block: Tuple[int, int], row_offsets: torch.Tensor,
                 col_indices: torch.Tensor, values: torch.Tensor) -> None:
        n, k = int(shape[0]), int(shape[1])
        bh, bw = int(block[0]), int(block[1])
        if bh <= 0 or bw <= 0:
            raise ValueError(f"block: sizes must be positive, got {block}")
        if n % bh or k % bw:
            raise ValueError(f"shape: {shape} is not divisible by block {block}")
        self.shape = (n, k)
        self.block = (bh, bw)
        self.row_offsets = row_offsets.to(torch.int64).contiguous()
        self.col_indices = col_indices.to(torch.int64).contiguous()
        nnz = self.col_indices.numel()
        if self.row_offsets.shape != (n // bh + 1,):
            raise ValueError(f"row_offsets: expected shape ({n // bh + 1},), got {tuple(self.row_offsets.shape)}")
        if values.shape != (nnz, bh, bw):
            raise ValueError(f"values: expected shape ({nnz}, {bh}, {bw}), got {tuple(values.shape)}")
        self.values = values
        _check_layout(self.row_offsets, self.col_indices, k // bw)
        rows = block_rows(self.row_offsets, nnz)
        order = torch.argsort(self.col_indices * (n // bh + 1) + rows, stable=True)
        self.t_perm = order.to(torch.int64)
        self.t_row_indices = rows[order].to(torch.int64)
        counts = torch.bincount(self.col_indices, minlength=k // bw) if nnz else torch.zeros(k // bw, dtype=torch.int64)
        self.t_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])

    @property
    def nnz_blocks(self) -> int:
        """Number of stored blocks."""
        return int(self.col_indices.numel())

    @property
    def density(self) -> float:
        """Fraction of blocks stored."""
        total = (self.shape[0] // self.block[0]) * (self.shape[1] // self.block[1])
        return self.nnz_blocks / total if total else 0.0

    @classmethod
    def from_dense(cls, w: torch.Tensor, block: Tuple[int, int], mask: Optional[torch.Tensor] = None) -> "BlockSparseMatrix":
        """Blocks of the 2-D ``w`` selected by the bool block ``mask`` [N/bh, K/bw] (default: non-zero blocks)."""
        if w.dim() != 2:
            raise ValueError(f"w: expected a 2-D tensor, got {w.dim()}-D")
        bh, bw = int(block[0]), int(block[1])
        if bh <= 0 or bw <= 0:
            raise ValueError(f"block: sizes must be positive, got {block}")
        n, k = w.shape
        if n % bh or k % bw:
            raise ValueError(f"w: shape {tuple(w.shape)} is not divisible by block {block}")
        blocks = w.reshape(n // bh, bh, k // bw, bw).transpose(1, 2)
        if mask is None:
            mask = blocks.ne(0).any(dim=(2, 3))
        elif mask.shape != (n // bh, k // bw) or mask.dtype != torch.bool:
            raise ValueError(f"mask: expected a bool tensor of shape ({n // bh}, {k // bw})")
        rows, cols = mask.nonzero(as_tuple=True)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(mask.sum(1), 0)])
        return cls((n, k), (bh, bw), offsets, cols, blocks[rows, cols].contiguous())

    def to_dense(self) -> torch.Tensor:
        """The dense ``[N, K]`` matrix."""
        n, k = self.shape
        bh, bw = self.block
        out = self.values.new_zeros(n // bh, k // bw, bh, bw)
        rows = block_rows(self.row_offsets, self.nnz_blocks)
        out[rows, self.col_indices] = self.values
        return out.transpose(1, 2).reshape(n, k)

    def to_torch(self) -> torch.Tensor:
        """A ``torch.sparse_bsr`` tensor with the same blocks."""
        return torch.sparse_bsr_tensor(self.row_offsets, self.col_indices, self.values, size=self.shape)

    @classmethod
    def from_torch(cls, t: torch.Tensor) -> "BlockSparseMatrix":
        """From a ``torch.sparse_bsr`` tensor."""
        if t.layout != torch.sparse_bsr:
            raise ValueError(f"t: expected a torch.sparse_bsr tensor, got layout {t.layout}")
        v = t.values()
        return cls((t.shape[0], t.shape[1]), (v.shape[1], v.shape[2]), t.crow_indices(), t.col_indices(), v)
