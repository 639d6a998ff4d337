"""``BlockSparseLinear``: a ``torch.nn.Linear`` whose weight is block-sparse (fixed layout)."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from sparsekit.blocksparse import BlockSparseMatrix
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
    def from_linear(cls, linear: torch.nn.Linear, block: Tuple[int, int], mask: torch.Tensor) -> "BlockSparseLinear":
        """Keep the blocks of ``linear.weight`` selected by ``mask``."""
        m = cls(linear.in_features, linear.out_features, block, mask=mask, bias=linear.bias is not None)
        w = BlockSparseMatrix.from_dense(linear.weight.detach(), block, mask=mask)
        with torch.no_grad():
            m.values.copy_(w.values)
            if linear.bias is not None and m.bias is not None:
                m.bias.copy_(linear.bias)
        return m

    def to_linear(self) -> torch.nn.Linear:
        """A dense ``torch.nn.Linear`` with the same function."""
        lin = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.weight.to_dense())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin
