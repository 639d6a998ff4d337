"""``BlockSparseLinear``: a ``torch.nn.Linear`` whose weight is block-sparse (its blocks can move in place)."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from sparsekit.blocksparse import BlockSparseMatrix, block_rows
from sparsekit.ops import bsr_linear


class BlockSparseLinear(torch.nn.Module):
    """``y = x @ W^T + b`` with ``W`` [out_features, in_features] stored as ``block`` blocks.

    The layout comes from ``mask`` (bool [out/bh, in/bw]) or a random one of the given ``density``.
    """

    def __init__(self, in_features: int, out_features: int, block: Tuple[int, int], *, density: Optional[float] = None,
                 mask: Optional[torch.Tensor] = None, bias: bool = True) -> None:
        super().__init__()
        bh, bw = int(block[0]), int(block[1])
        if bh <= 0 or bw <= 0 or out_features % bh or in_features % bw:
            raise ValueError(f"block: {block} must be positive and divide ({out_features}, {in_features})")
        if mask is None:
            d = 1.0 if density is None else float(density)
            if not 0.0 <= d <= 1.0:
                raise ValueError(f"density: must be in [0, 1], got {density}")
            mask = torch.rand(out_features // bh, in_features // bw) < d
        elif density is not None:
            raise ValueError("density: give either density or mask, not both")
        bound = 1.0 / math.sqrt(in_features)
        w = torch.empty(out_features, in_features).uniform_(-bound, bound)
        self._w = BlockSparseMatrix.from_dense(w, (bh, bw), mask=mask)
        self.values = torch.nn.Parameter(self._w.values)
        self.bias = torch.nn.Parameter(torch.empty(out_features).uniform_(-bound, bound)) if bias else None
        self.in_features, self.out_features = in_features, out_features

    @property
    def weight(self) -> BlockSparseMatrix:
        """The block-sparse weight (its ``values`` are this module's parameter)."""
        self._w.values = self.values
        return self._w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + bias`` for ``x`` of shape ``[..., in_features]``."""
        # The parameter goes in as `values` (no attribute write on the matrix: torch.compile traces this).
        return bsr_linear(x, self._w, self.bias, values=self.values)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, block: Tuple[int, int], density: Optional[float] = None, *,
                    mask: Optional[torch.Tensor] = None) -> "BlockSparseLinear":
        """Keep the blocks of ``linear.weight``: those of highest L2 norm for a ``density`` (the fraction of
        blocks, as :func:`sparsekit.block_topk_mask` counts it: exact, ties to the lower row-major block), or
        those of a bool block ``mask`` [out/bh, in/bw]. Give exactly one of the two."""
        if (density is None) == (mask is None):
            raise ValueError("from_linear: give exactly one of density and mask")
        if mask is None:
            from sparsekit.select import block_topk_mask

            _, mask = block_topk_mask(linear.weight.detach(), block, density=density, return_block_mask=True)
        m = cls(linear.in_features, linear.out_features, block, mask=mask, bias=linear.bias is not None)
        w = BlockSparseMatrix.from_dense(linear.weight.detach(), block, mask=mask)
        with torch.no_grad():
            m.values.copy_(w.values)
            if linear.bias is not None and m.bias is not None:
                m.bias.copy_(linear.bias)
        return m

    def block_mask(self) -> torch.Tensor:
        """The stored blocks as a bool mask [out/bh, in/bw]."""
        w = self._w
        (n, k), (bh, bw) = w.shape, w.block
        out = torch.zeros(n // bh, k // bw, dtype=torch.bool, device=w.row_offsets.device)
        out[block_rows(w.row_offsets, w.nnz_blocks), w.col_indices] = True
        return out

    @torch.no_grad()
    def update_layout(self, mask: torch.Tensor, optimizer: Optional[torch.optim.Optimizer] = None) -> Tuple[int, int]:
        """Move the stored blocks to the bool block ``mask`` [out/bh, in/bw] in place, for block-structured
        dynamic sparse training: ``mask`` holds as many blocks as now (a drop-and-grow step), so ``values``
        keeps its shape and stays the same ``Parameter`` (an optimizer holding it needs no rebuild). Kept
        blocks keep their values; grown blocks start at zero (as RigL grows connections). With
        ``optimizer``, every state tensor of ``values`` shaped like it (e.g. Adam's moments) moves the same
        way, zero for grown blocks. Returns ``(kept, grown)`` block counts."""
        w = self._w
        (n, k), (bh, bw) = w.shape, w.block
        dev = self.values.device
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (n // bh, k // bw):
            raise ValueError(f"mask: expected a bool tensor of shape ({n // bh}, {k // bw})")
        mask = mask.to(dev)
        if int(mask.sum()) != w.nnz_blocks:
            raise ValueError(f"mask: holds {int(mask.sum())} blocks, the layout {w.nnz_blocks}; "
                             "update_layout moves blocks (build a new module to change the count)")
        old_index = torch.full((n // bh, k // bw), -1, dtype=torch.int64, device=dev)
        old_index[block_rows(w.row_offsets, w.nnz_blocks), w.col_indices] = torch.arange(w.nnz_blocks, device=dev)
        rows, cols = mask.nonzero(as_tuple=True)
        src = old_index[rows, cols]  # new block i <- old block src[i], or -1: grown
        kept = src >= 0

        def move(t: torch.Tensor) -> None:
            moved = torch.zeros_like(t)
            moved[kept] = t[src[kept]]
            t.copy_(moved)

        move(self.values)
        if optimizer is not None:
            for v in optimizer.state.get(self.values, {}).values():
                if isinstance(v, torch.Tensor) and v.shape == self.values.shape:
                    move(v)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), torch.cumsum(mask.sum(1), 0)])
        self._w = BlockSparseMatrix((n, k), (bh, bw), offsets, cols, self.values)
        n_kept = int(kept.sum())
        return n_kept, w.nnz_blocks - n_kept

    def to_linear(self) -> torch.nn.Linear:
        """A dense ``torch.nn.Linear`` with the same function."""
        lin = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.weight.to_dense())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin
