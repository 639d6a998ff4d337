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
    m = BlockSparseLinear.from_linear(lin, (4, 4), mask=mask)
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


def test_from_linear_density_keeps_the_highest_norm_blocks():
    from sparsekit.nn import BlockSparseLinear

    torch.manual_seed(3)
    lin = torch.nn.Linear(32, 16)
    m = BlockSparseLinear.from_linear(lin, (4, 8), density=0.25)
    # reference: L2 norms of the 4x8 blocks by plain torch, top 25% (8 of 4*4=16 -> 4), ties never occur here
    norms = lin.weight.detach().reshape(4, 4, 4, 8).transpose(1, 2).pow(2).sum((2, 3)).flatten()
    ref = torch.zeros(16, dtype=torch.bool)
    ref[norms.topk(4).indices] = True
    assert torch.equal(m.block_mask(), ref.reshape(4, 4))
    dense_kept = lin.weight.detach() * ref.reshape(4, 4).repeat_interleave(4, 0).repeat_interleave(8, 1)
    x = torch.randn(5, 32)
    torch.testing.assert_close(m(x), x @ dense_kept.T + lin.bias.detach(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        BlockSparseLinear.from_linear(lin, (4, 8))
    with pytest.raises(ValueError, match="exactly one"):
        BlockSparseLinear.from_linear(lin, (4, 8), 0.5, mask=ref.reshape(4, 4))


def test_update_layout_moves_blocks_and_optimizer_state_in_place():
    from sparsekit.nn import BlockSparseLinear

    torch.manual_seed(4)
    old = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    m = BlockSparseLinear(16, 12, (4, 4), mask=old)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x = torch.randn(6, 16)
    m(x).square().sum().backward()
    opt.step()
    values_param = m.values
    w_before = m.weight.to_dense().clone()
    st = {k: v.clone() for k, v in opt.state[m.values].items() if torch.is_tensor(v) and v.shape == m.values.shape}
    # drop (0,2) and (2,1); grow (1,3) and (2,2): 5 blocks before and after
    new = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 1], [1, 0, 1, 0]], dtype=torch.bool)
    assert m.update_layout(new, opt) == (3, 2)
    assert m.values is values_param and torch.equal(m.block_mask(), new)
    keep = (old & new).repeat_interleave(4, 0).repeat_interleave(4, 1)
    torch.testing.assert_close(m.weight.to_dense(), w_before * keep, rtol=0, atol=0)
    # optimizer state: the same move, read block by block from the old order (row-major)
    old_pos = {tuple(rc): i for i, rc in enumerate(old.nonzero().tolist())}
    for i, rc in enumerate(new.nonzero().tolist()):
        for name, before in st.items():
            want = before[old_pos[tuple(rc)]] if tuple(rc) in old_pos else torch.zeros(4, 4)
            torch.testing.assert_close(opt.state[m.values][name][i], want, rtol=0, atol=0)
    # the module trains on: forward equals the dense reference, and the optimizer steps
    torch.testing.assert_close(m(x), x @ m.weight.to_dense().T + m.bias, rtol=1e-5, atol=1e-5)
    opt.zero_grad()
    m(x).square().sum().backward()
    opt.step()
    short = new.clone()
    short[0, 0] = False
    with pytest.raises(ValueError, match="holds 4 blocks, the layout 5"):
        m.update_layout(short)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        m.update_layout(new.float())
