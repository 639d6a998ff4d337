"""Block-sparse matrices and ops vs dense torch references."""

import pytest
import torch

from sparsekit.blocksparse import BlockSparseMatrix
from sparsekit.ops import BACKENDS, bsr_linear


def _random(n, k, bh, bw, density, dtype=torch.float32, seed=0, empty_row=False):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n // bh, k // bw, generator=g) < density
    if empty_row and mask.shape[0] > 1:
        mask[1] = False
    w = torch.randn(n, k, generator=g, dtype=dtype)
    return BlockSparseMatrix.from_dense(w, (bh, bw), mask=mask)


@pytest.mark.parametrize("n,k,bh,bw,density,m", [(8, 12, 2, 3, 0.5, 5), (64, 32, 16, 8, 0.3, 37), (32, 32, 8, 8, 1.0, 3),
                                                 (16, 16, 4, 4, 0.0, 4), (64, 64, 32, 32, 0.5, 70)])
def test_kernels_match_dense(n, k, bh, bw, density, m):
    w = _random(n, k, bh, bw, density, empty_row=True)
    wd = w.to_dense()
    x = torch.randn(m, k)
    dy = torch.randn(m, n)
    be = BACKENDS["cpu"]
    torch.testing.assert_close(be.linear(x, w), x @ wd.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(be.linear_grad_input(dy, w), dy @ wd, rtol=1e-4, atol=1e-4)
    ref = BlockSparseMatrix.from_dense(dy.T @ x, (bh, bw), mask=w.to_dense().reshape(n // bh, bh, k // bw, bw)
                                       .ne(0).any(dim=(1, 3)) | False)
    got = be.sdd(dy, x, w)
    full = (dy.T @ x).reshape(n // bh, bh, k // bw, bw).transpose(1, 2)
    rows = torch.repeat_interleave(torch.arange(n // bh), torch.diff(w.row_offsets))
    torch.testing.assert_close(got, full[rows, w.col_indices], rtol=1e-4, atol=1e-4)
    del ref


def test_roundtrip_and_properties():
    w = _random(16, 24, 4, 8, 0.5)
    w2 = BlockSparseMatrix.from_dense(w.to_dense(), (4, 8))
    torch.testing.assert_close(w2.to_dense(), w.to_dense())
    assert w.shape == (16, 24) and w.block == (4, 8)
    assert 0.0 <= w.density <= 1.0 and w.nnz_blocks == w.values.shape[0]


def test_bsr_linear_autograd_float32_and_leading_dims():
    w = _random(32, 16, 8, 4, 0.5, seed=3)
    values = w.values.clone().requires_grad_(True)
    w.values = values
    x = torch.randn(2, 3, 16, requires_grad=True)
    bias = torch.randn(32, requires_grad=True)
    y = bsr_linear(x, w, bias)
    wd = w.to_dense().detach().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    yr = xr @ wd.T + bias.detach()
    torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-4)
    dense_grad = BlockSparseMatrix((32, 16), (8, 4), w.row_offsets, w.col_indices, values.grad).to_dense()
    mask = w.to_dense().ne(0)
    torch.testing.assert_close(dense_grad, wd.grad * mask, rtol=1e-4, atol=1e-4)


def test_gradcheck_float64():
    # float64 uses the torch reference path of the CPU backend (the Rust kernels are f32-only).
    w = _random(8, 12, 2, 3, 0.5, dtype=torch.float64, seed=5)
    values = w.values.clone().requires_grad_(True)
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)

    def f(x, v):
        w.values = v
        return bsr_linear(x, w)

    assert torch.autograd.gradcheck(f, (x, values))


def test_bad_inputs():
    with pytest.raises(ValueError, match="block"):
        BlockSparseMatrix.from_dense(torch.zeros(4, 4), (0, 2))
    with pytest.raises(ValueError, match="divisible"):
        BlockSparseMatrix.from_dense(torch.zeros(5, 4), (2, 2))
    with pytest.raises(ValueError, match="mask"):
        BlockSparseMatrix.from_dense(torch.zeros(4, 4), (2, 2), mask=torch.ones(3, 2, dtype=torch.bool))
    w = _random(8, 8, 2, 2, 0.5)
    with pytest.raises(ValueError, match="x"):
        bsr_linear(torch.zeros(3, 7), w)
    w.col_indices = w.col_indices.flip(0)  # corrupt layout: caught by the Rust validation
    if w.nnz_blocks > 1:
        with pytest.raises(ValueError):
            BACKENDS["cpu"].linear(torch.zeros(3, 8), w)


def test_block_sparse_linear_roundtrip():
    from sparsekit.nn import BlockSparseLinear

    lin = torch.nn.Linear(16, 8)
    mask = torch.rand(2, 4) < 0.5
    m = BlockSparseLinear.from_linear(lin, (4, 4), mask)
    x = torch.randn(3, 16)
    ref = m.to_linear()
    torch.testing.assert_close(m(x), ref(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="block"):
        BlockSparseLinear(10, 8, (4, 4))


def test_torch_bsr_roundtrip():
    w = _random(16, 24, 4, 8, 0.5, seed=9)
    t = w.to_torch()
    torch.testing.assert_close(t.to_dense(), w.to_dense())
    torch.testing.assert_close(BlockSparseMatrix.from_torch(t).to_dense(), w.to_dense())
    with pytest.raises(ValueError, match="t"):
        BlockSparseMatrix.from_torch(torch.zeros(4, 4))
