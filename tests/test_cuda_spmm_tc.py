"""Tensor-core block-sparse GEMM kernels (cuda/spmm_tc.cu, float16/bfloat16 with float32 accumulation) on the
CPU shim through the launch code, vs a float64 torch reference and vs the Rust CPU path.

Tolerance (cuda/README.md): the products of two half-precision numbers are exact in float32 and summed in
float32, then rounded once, so |got - exact| <= eps(dtype) * |exact| + 2 * K * 2^-24 * sum|a*b|.
"""

from __future__ import annotations

import pytest
import torch

from reference import within_one_ulp
from sparsekit import _cuda_spmm as sp
from test_cuda_spmm import make_layout

CASES = [  # (M, block rows, block cols, block, density)
    (5, 2, 3, (16, 16), 0.5),
    (70, 3, 2, (32, 16), 0.6),
    (17, 2, 2, (16, 32), 1.0),
    (64, 2, 2, (64, 64), 0.5),
    (9, 1, 1, (128, 128), 1.0),
    (3, 2, 2, (16, 16), 0.0),  # no blocks at all
]


class Recording:
    """A backend that records the kernels launched (to see which load path ran)."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.kernels = inner, []

    def __getattr__(self, name):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)

    def launch(self, name, *args, **kw):  # type: ignore[no-untyped-def]
        self.kernels.append(name)
        return self.inner.launch(name, *args, **kw)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values, starting 2 bytes past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 8, dtype=t.dtype)
    out = buf[1:1 + t.numel()].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


def _close(got: torch.Tensor, exact: torch.Tensor, abs_sum: torch.Tensor, k: int) -> None:
    bound = torch.finfo(got.dtype).eps * exact.abs() + 2 * k * 2.0**-24 * abs_sum + 1e-30
    err = (got.double() - exact).abs()
    assert bool((err <= bound).all()), f"max error {float((err - bound).max())} over the bound"


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("schedule", ["forward", "reverse", "random"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tc_ops_vs_float64_reference(dtype: torch.dtype, case: tuple, schedule: str, aligned: bool) -> None:
    m, nr, nc, block, density = case
    gen = torch.Generator().manual_seed(hash((case, schedule, str(dtype))) % 2**31)
    mask = torch.rand((nr, nc), generator=gen) < density
    if nr > 1 and 0 < density < 1:
        mask[0] = False  # an empty block-row
    w = make_layout(mask, block, dtype, gen)
    be = Recording(sp.sim_backend(schedule, seed=3, family="spmm_tc"))
    ops = sp.OpsBackend(tc_backend=be)  # type: ignore[arg-type]
    wd = w.dense()
    n, k = w.shape
    x = torch.randn((m, k), generator=gen).to(dtype)
    dy = torch.randn((m, n), generator=gen).to(dtype)
    if not aligned:
        x, dy = _misaligned(x), _misaligned(dy)
    xd, dyd = x.double(), dy.double()

    y = ops.linear(x, w)
    assert y.dtype == dtype and y.shape == (m, n)
    _close(y, xd @ wd.T, xd.abs() @ wd.abs().T, k)
    dx = ops.linear_grad_input(dy, w)
    assert dx.dtype == dtype and dx.shape == (m, k)
    _close(dx, dyd @ wd, dyd.abs() @ wd.abs(), n)
    v = ops.sdd(dy, x, w)
    assert v.dtype == dtype and v.shape == w.values.shape
    full, full_abs = dyd.T @ xd, dyd.abs().T @ xd.abs()
    bh, bw = block
    rows = torch.repeat_interleave(torch.arange(nr), w.row_offsets.diff())
    for p, (r, c) in enumerate(zip(rows.tolist(), w.col_indices.tolist())):
        sl = (slice(r * bh, (r + 1) * bh), slice(c * bw, (c + 1) * bw))
        _close(v[p], full[sl], full_abs[sl], m)
    path = "true" if aligned else "false"
    assert be.kernels and all(name.endswith(f", {path}>") for name in be.kernels), be.kernels


def test_tc_results_do_not_depend_on_the_schedule() -> None:
    """Fixed summation order: bit-identical outputs under every thread order."""
    gen = torch.Generator().manual_seed(11)
    w = make_layout(torch.rand((2, 3), generator=gen) < 0.7, (32, 32), torch.float16, gen)
    x = torch.randn((50, 96), generator=gen).half()
    outs = []
    for schedule, seed in (("forward", 0), ("reverse", 0), ("random", 1), ("random", 2)):
        ops = sp.OpsBackend(tc_backend=sp.sim_backend(schedule, seed=seed, family="spmm_tc"))
        outs.append((ops.linear(x, w), ops.sdd(x[:, :64].contiguous(), x, w)))
    for y, v in outs[1:]:
        assert torch.equal(y, outs[0][0]) and torch.equal(v, outs[0][1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_public_ops_take_the_tc_kernels_inside_simulated_cuda(dtype: torch.dtype, monkeypatch) -> None:
    """bsr_linear forward and backward in half precision through sparsekit.ops inside simulated_cuda():
    the tensor-core kernels run (not the Rust ones, not the float32 CUDA ones), equal to the Rust CPU path
    within one ulp of the dtype (both accumulate in float32 and round once)."""
    from sparsekit import BlockSparseMatrix, _core
    from sparsekit.ops import bsr_linear
    from sparsekit.testing import simulated_cuda

    gen = torch.Generator().manual_seed(6)
    mask = torch.rand(2, 3, generator=gen) < 0.7
    dense = torch.randn(64, 96, generator=gen).to(dtype)
    x = torch.randn(37, 96, generator=gen).to(dtype)
    launched: list[str] = []
    real = sp.SimBackend.launch

    def spy(self, name, *a, **kw):  # type: ignore[no-untyped-def]
        launched.append(name)
        return real(self, name, *a, **kw)

    results = []
    for sim in (False, True):
        xi = x.clone().requires_grad_(True)
        wi = BlockSparseMatrix.from_dense(dense, (32, 32), mask=mask)
        vi = wi.values.detach().clone().requires_grad_(True)
        if sim:
            monkeypatch.setattr(_core, "bsr_kernel", lambda *a: pytest.fail("the Rust kernel ran on the shim path"))
            monkeypatch.setattr(sp.SimBackend, "launch", spy)
            with simulated_cuda(schedule="random", seed=1):
                y = bsr_linear(xi, wi, values=vi)
                y.float().square().sum().backward()
        else:
            y = bsr_linear(xi, wi, values=vi)
            y.float().square().sum().backward()
        results.append((y.detach(), xi.grad, vi.grad))
    assert sorted({n.split("<")[0] for n in launched}) == ["spmm_tc_dsd", "spmm_tc_dsd_t", "spmm_tc_sdd"]
    for cpu, shim in zip(*results):
        assert shim.dtype == dtype and within_one_ulp(shim, cpu, 1e-2)


def test_tc_bad_input() -> None:
    gen = torch.Generator().manual_seed(0)
    w = make_layout(torch.ones((1, 1), dtype=torch.bool), (16, 16), torch.float16, gen)
    ops = sp.OpsBackend(tc_backend=sp.sim_backend(family="spmm_tc"))
    with pytest.raises(TypeError, match="dtype"):  # bfloat16 x with float16 values: a mismatch
        ops.linear(torch.zeros((2, 16), dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match="columns"):
        ops.linear(torch.zeros((2, 32), dtype=torch.float16), w)
    with pytest.raises(TypeError, match="dtype"):
        ops.sdd(torch.zeros((2, 16), dtype=torch.float16), torch.zeros((2, 16), dtype=torch.bfloat16), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_block_sparse_linear_inside_simulated_cuda(dtype: torch.dtype) -> None:
    """BlockSparseLinear forward and backward (weights, bias, input) on the shim equal the CPU path."""
    from sparsekit.nn import BlockSparseLinear
    from sparsekit.testing import simulated_cuda

    torch.manual_seed(3)
    layer = BlockSparseLinear(96, 64, (32, 32), density=0.5).to(dtype)
    x = torch.randn(21, 96).to(dtype)
    results = []
    for sim in (False, True):
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        if sim:
            with simulated_cuda(schedule="reverse"):
                y = layer(xi)
                y.float().square().sum().backward()
        else:
            y = layer(xi)
            y.float().square().sum().backward()
        results.append([y.detach(), xi.grad] + [p.grad.clone() for p in layer.parameters()])
    for cpu, shim in zip(*results):
        if dtype == torch.float32:
            torch.testing.assert_close(shim, cpu, rtol=1e-5, atol=1e-5)
        else:
            assert within_one_ulp(shim, cpu, 1e-2)
