"""Block-sparse GEMM kernels (cuda/spmm.cu) on the CPU shim through the launch code, vs float64 torch."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from sparsekit import _cuda_spmm as sp


@dataclass
class Layout:
    row_offsets: torch.Tensor
    col_indices: torch.Tensor
    t_offsets: torch.Tensor
    t_perm: torch.Tensor
    t_row_indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]
    block: tuple[int, int]

    def dense(self) -> torch.Tensor:
        bh, bw = self.block
        out = torch.zeros(self.shape, dtype=torch.float64)
        rows = torch.repeat_interleave(torch.arange(len(self.row_offsets) - 1), self.row_offsets.diff())
        for p, (r, c) in enumerate(zip(rows.tolist(), self.col_indices.tolist())):
            out[r * bh:(r + 1) * bh, c * bw:(c + 1) * bw] = self.values[p].double()
        return out


def make_layout(mask: torch.Tensor, block: tuple[int, int], dtype: torch.dtype, gen: torch.Generator) -> Layout:
    bh, bw = block
    rows, cols = mask.nonzero(as_tuple=True)  # row-major order: sorted within a block-row
    counts = mask.sum(1)
    row_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    t_perm = torch.argsort(cols * mask.shape[0] + rows)
    t_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(0).cumsum(0)])
    values = torch.randn((len(rows), bh, bw), generator=gen, dtype=torch.float64).to(dtype)
    return Layout(row_offsets, cols.clone(), t_offsets, t_perm, rows[t_perm].clone(), values,
                  (mask.shape[0] * bh, mask.shape[1] * bw), block)


CASES = [  # (M, block rows, block cols, block, density)
    (5, 2, 3, (16, 16), 0.5),
    (33, 3, 2, (32, 16), 0.6),
    (17, 2, 2, (16, 32), 1.0),
    (20, 1, 1, (64, 64), 1.0),
    (9, 3, 3, (16, 16), 0.0),
]


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ops_vs_reference(schedule: str, case: tuple, dtype: torch.dtype) -> None:
    m, nr, nc, block, density = case
    gen = torch.Generator().manual_seed(hash((case, schedule)) % 2**31)
    mask = torch.rand((nr, nc), generator=gen) < density
    if nr > 1 and density > 0:
        mask[0] = False  # an empty block-row
    w = make_layout(mask, block, dtype, gen)
    ops = sp.OpsBackend(sp.sim_backend(schedule, seed=3))
    wd = w.dense()
    n, k = w.shape
    x = torch.randn((m, k), generator=gen, dtype=torch.float64)
    dy = torch.randn((m, n), generator=gen, dtype=torch.float64)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    y = ops.linear(x.to(dtype), w)
    torch.testing.assert_close(y.double(), x.to(dtype).double() @ wd.T, **tol)
    dx = ops.linear_grad_input(dy.to(dtype), w)
    torch.testing.assert_close(dx.double(), dy.to(dtype).double() @ wd, **tol)
    v = ops.sdd(dy.to(dtype), x.to(dtype), w)
    full = dy.to(dtype).double().T @ x.to(dtype).double()
    ref = torch.zeros(v.shape, dtype=torch.float64)
    bh, bw = block
    rows = torch.repeat_interleave(torch.arange(nr), w.row_offsets.diff())
    for p, (r, c) in enumerate(zip(rows.tolist(), w.col_indices.tolist())):
        ref[p] = full[r * bh:(r + 1) * bh, c * bw:(c + 1) * bw]
    torch.testing.assert_close(v.double(), ref, **tol)


def test_bad_input() -> None:
    gen = torch.Generator().manual_seed(0)
    w = make_layout(torch.ones((1, 1), dtype=torch.bool), (16, 16), torch.float32, gen)
    ops = sp.OpsBackend(sp.sim_backend())
    with pytest.raises(ValueError, match="columns"):
        ops.linear(torch.zeros((2, 8)), w)
    with pytest.raises(TypeError, match="dtype"):
        ops.linear(torch.zeros((2, 16), dtype=torch.int32), w)
    with pytest.raises(TypeError, match="dtype"):  # half x with float32 values: a mismatch, not a conversion
        ops.linear(torch.zeros((2, 16), dtype=torch.float16), w)
    with pytest.raises(ValueError, match="2-D"):
        ops.linear(torch.zeros(16), w)


def test_public_bsr_linear_runs_the_cuda_kernels_inside_simulated_cuda():
    """sparsekit.ops.bsr_linear forward and backward through cuda/spmm.cu on the shim equal the Rust CPU path."""
    from sparsekit import BlockSparseMatrix
    from sparsekit.ops import bsr_linear
    from sparsekit.testing import simulated_cuda

    gen = torch.Generator().manual_seed(5)
    mask = torch.rand(3, 2, generator=gen) < 0.6
    mask[1] = False  # an empty block-row
    w = BlockSparseMatrix.from_dense(torch.randn(48, 32, generator=gen), (16, 16), mask=mask)
    x = torch.randn(20, 32, generator=gen)
    results = []
    for sim in (False, True):
        xi = x.clone().requires_grad_(True)
        vi = w.values.detach().clone().requires_grad_(True)
        wi = BlockSparseMatrix.from_dense(w.to_dense(), (16, 16), mask=mask)
        wi.values = vi
        if sim:
            with simulated_cuda(schedule="reverse"):
                y = bsr_linear(xi, wi)
                y.square().sum().backward()
        else:
            y = bsr_linear(xi, wi)
            y.square().sum().backward()
        results.append((y.detach(), xi.grad, vi.grad))
    for cpu, shim in zip(*results):
        torch.testing.assert_close(shim, cpu, rtol=1e-5, atol=1e-5)
