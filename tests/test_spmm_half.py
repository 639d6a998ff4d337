"""Block-sparse ops on float16 / bfloat16 CPU tensors: the Rust kernels read them as raw bits, accumulate
in float32 and round once.

Two independent checks: against a float64 torch product of the same half inputs within a stated error
bound, and bit for bit against the float32 kernels run on the exactly widened inputs (what the half path
guarantees: the same f32 arithmetic in the same order, one rounding at the end)."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsekit
from sparsekit import _core, ops
from sparsekit.blocksparse import BlockSparseMatrix
from reference import same_tensor
from test_spmm_ops import _gathered, _matrix, problems

HALVES = [torch.float16, torch.bfloat16]


def bound(absprod: torch.Tensor, depth: int, dtype: torch.dtype) -> torch.Tensor:
    """Largest |result - exact| for a float32 accumulation of ``depth`` products rounded once to ``dtype``:
    the accumulation error E <= depth * 2^-24 * sum |a_i b_i| (``absprod``, exact in float64), then one
    rounding, at most half an ulp of the accumulated value (u * (|exact| + E)), or half the smallest
    subnormal step near zero."""
    fi = torch.finfo(dtype)
    u = fi.eps / 2
    acc = depth * 2.0**-24 * absprod
    return u * acc + acc + fi.smallest_normal * fi.eps / 2


def assert_within(got: torch.Tensor, exact: torch.Tensor, absprod: torch.Tensor, depth: int, dtype):
    assert got.dtype == dtype and got.shape == exact.shape
    err = (got.double() - exact).abs()
    tol = bound(absprod, depth, dtype) + torch.finfo(dtype).eps / 2 * exact.abs()
    assert bool((err <= tol).all()), f"max excess {(err - tol).max().item()}"


def _half_case(p, dtype):
    n, k, block, mask, m, seed = p
    w = _matrix(n, k, block, mask, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g).to(dtype)
    dy = torch.randn(m, n, generator=g).to(dtype)
    return w, x, dy


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from(HALVES))
def test_property_half_ops_match_float64_within_bound(p, dtype):
    w, x, dy = _half_case(p, dtype)
    n, k = w.shape
    m = x.shape[0]
    wd = w.to_dense().double()
    xd, dyd = x.double(), dy.double()
    assert_within(ops.bsr_linear(x, w), xd @ wd.T, xd.abs() @ wd.abs().T, k, dtype)
    assert_within(ops.bsr_matmul(w, x.T), wd @ xd.T, wd.abs() @ xd.abs().T, k, dtype)
    assert_within(ops.sdd(dy, x, w), _gathered(dyd.T @ xd, w), _gathered(dyd.abs().T @ xd.abs(), w), m, dtype)
    gi = torch.ops.sparsekit.bsr_linear_grad_input(dy, w.values, *_lay(w))
    assert_within(gi, dyd @ wd, dyd.abs() @ wd.abs(), n, dtype)


def _lay(w):
    return ([w.row_offsets, w.col_indices, w.t_offsets, w.t_perm, w.t_row_indices],
            [w.shape[0], w.shape[1], w.block[0], w.block[1]])


def _as_f32(w):
    return BlockSparseMatrix(w.shape, w.block, w.row_offsets, w.col_indices, w.values.float())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from(HALVES))
def test_property_half_is_the_float32_kernel_on_widened_inputs(p, dtype):
    # The guarantee: bits equal to the float32 kernels on the exactly widened inputs, rounded once.
    w, x, dy = _half_case(p, dtype)
    w32, x32, dy32 = _as_f32(w), x.float(), dy.float()
    assert same_tensor(ops.bsr_linear(x, w), ops.bsr_linear(x32, w32).to(dtype))
    assert same_tensor(ops.bsr_matmul(w, x.T), ops.bsr_matmul(w32, x32.T).to(dtype))
    assert same_tensor(ops.sdd(dy, x, w), ops.sdd(dy32, x32, w32).to(dtype))
    lay, dims = _lay(w)
    gi = torch.ops.sparsekit.bsr_linear_grad_input(dy, w.values, lay, dims)
    assert same_tensor(gi, torch.ops.sparsekit.bsr_linear_grad_input(dy32, w32.values, lay, dims).to(dtype))


@pytest.mark.parametrize("dtype", HALVES)
def test_rust_half_path_runs_on_the_raw_bits(dtype, monkeypatch):
    # The kernels get int16 bit views and the dtype tag, never a float32 copy, and write the half result.
    calls = []
    kernel = _core.bsr_kernel

    def spy(op, shape, block, layout, a, b, m, out, tag="float32"):
        calls.append((op, a.dtype, b.dtype, out.dtype, tag))
        return kernel(op, shape, block, layout, a, b, m, out, tag)

    monkeypatch.setattr(_core, "bsr_kernel", spy)
    monkeypatch.setattr(ops, "_f32", lambda t: pytest.fail("converted to float32 in the ops layer"))
    mask = torch.rand(4, 3, generator=torch.Generator().manual_seed(7)) < 0.6
    mask[1] = False
    w = _matrix(128, 96, (32, 32), mask, dtype=dtype, seed=3)
    x = torch.randn(2, 10, 96, generator=torch.Generator().manual_seed(4)).to(dtype).requires_grad_()
    v = w.values.detach().clone().requires_grad_()
    bias = torch.randn(128, dtype=dtype, requires_grad=True)
    y = ops.bsr_linear(x, w, bias, values=v)
    g = torch.randn(2, 10, 128, generator=torch.Generator().manual_seed(5)).to(dtype)
    y.backward(g)
    tag = {torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    i16 = np.dtype(np.int16)
    assert calls == [(op, i16, i16, i16, tag) for op in ("linear", "linear_grad_input", "sdd")]
    # Autograd through bsr_linear against float64 on the same half inputs.
    wd, x2, g2 = w.to_dense().double(), x.detach().double().reshape(-1, 96), g.double().reshape(-1, 128)
    assert_within(x.grad.reshape(-1, 96), g2 @ wd, g2.abs() @ wd.abs(), 128, dtype)
    assert_within(v.grad, _gathered(g2.T @ x2, w), _gathered(g2.abs().T @ x2.abs(), w), 20, dtype)
    assert bias.grad.dtype == dtype and x.grad.dtype == dtype and v.grad.dtype == dtype
    yk = torch.ops.sparsekit.bsr_linear(x.detach().reshape(-1, 96), w.values, *_lay(w))
    assert_within(yk, x2 @ wd.T, x2.abs() @ wd.abs().T, 96, dtype)
    assert same_tensor(y.detach(), yk.reshape(2, 10, 128) + bias.detach())


@pytest.mark.parametrize("dtype", HALVES)
def test_half_results_do_not_depend_on_thread_count(dtype):
    mask = torch.rand(8, 8, generator=torch.Generator().manual_seed(1)) < 0.4
    w = _matrix(256, 256, (32, 32), mask, dtype=dtype)
    x, dy = torch.randn(300, 256).to(dtype), torch.randn(300, 256).to(dtype)
    runs = []
    before = sparsekit.get_num_threads()
    try:
        for threads in (1, 2, 3):
            sparsekit.set_num_threads(threads)
            be = ops.BACKENDS["cpu"]
            runs.append((be.linear(x, w), be.linear_grad_input(dy, w), be.sdd(dy, x, w)))
    finally:
        sparsekit.set_num_threads(before)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert same_tensor(a, b)


@pytest.mark.parametrize("dtype", HALVES)
def test_half_empty_and_zero_block_matrices(dtype):
    w = _matrix(32, 32, (16, 16), torch.zeros(2, 2, dtype=torch.bool), dtype=dtype)
    assert same_tensor(ops.bsr_linear(torch.randn(3, 32).to(dtype), w), torch.zeros(3, 32, dtype=dtype))
    assert ops.sdd(torch.randn(3, 32).to(dtype), torch.randn(3, 32).to(dtype), w).shape == (0, 16, 16)
    w = _matrix(32, 32, (16, 16), torch.ones(2, 2, dtype=torch.bool), dtype=dtype)
    assert ops.bsr_linear(torch.randn(0, 32).to(dtype), w).shape == (0, 32)
    z = ops.sdd(torch.randn(0, 32).to(dtype), torch.randn(0, 32).to(dtype), w)
    assert same_tensor(z, torch.zeros(4, 16, 16, dtype=dtype))


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("name", ["bsr_linear", "bsr_linear_grad_input", "sdd", "bsr_matmul"])
def test_opcheck_half(name, dtype):
    from test_spmm_ops import _op_args

    grad = name != "bsr_linear_grad_input"
    torch.library.opcheck(getattr(torch.ops.sparsekit, name).default, _op_args(dtype, grad)[name])


def test_mixed_half_dtypes_are_refused():
    w = _matrix(48, 48, (16, 16), torch.ones(3, 3, dtype=torch.bool), dtype=torch.float16)
    lay, dims = _lay(w)
    xb = torch.randn(5, 48).to(torch.bfloat16)
    # Public functions: a TypeError naming the argument (before any kernel).
    with pytest.raises(TypeError, match="x: dtype torch.bfloat16 does not match W.values's torch.float16"):
        ops.bsr_linear(xb, w)
    with pytest.raises(TypeError, match="b: dtype"):
        ops.sdd(torch.randn(5, 48).half(), xb, w)
    # The custom ops called directly: the backend refuses mixed dtypes with a ValueError.
    with pytest.raises(ValueError, match="W.values: dtype torch.float16 does not match x's torch.bfloat16"):
        torch.ops.sparsekit.bsr_linear(xb, w.values, lay, dims)
    with pytest.raises(ValueError, match="W.values: dtype torch.float16 does not match x's torch.float32"):
        torch.ops.sparsekit.bsr_matmul(w.values, lay, dims, torch.randn(48, 2))
    with pytest.raises(ValueError, match="W.values: dtype torch.float16 does not match dy's torch.bfloat16"):
        torch.ops.sparsekit.bsr_linear_grad_input(xb, w.values, lay, dims)
    with pytest.raises(ValueError, match="b: dtype torch.bfloat16 does not match a's torch.float16"):
        torch.ops.sparsekit.sdd(torch.randn(5, 48).half(), xb, lay, dims)


def test_binding_refuses_arrays_of_the_wrong_dtype():
    w = _matrix(32, 32, (16, 16), torch.ones(2, 2, dtype=torch.bool), dtype=torch.float16)
    layout = [t.numpy() for t in _lay(w)[0]]
    x = torch.randn(4, 32).half().view(torch.int16).reshape(-1).numpy()
    v = w.values.view(torch.int16).reshape(-1).numpy()
    out = np.empty(4 * 32, dtype=np.int16)
    _core.bsr_kernel("linear", (32, 32), (16, 16), layout, x, v, 4, out, "float16")  # the right call works
    with pytest.raises(ValueError, match="b: dtype float32 does not match the kernel dtype float16"):
        _core.bsr_kernel("linear", (32, 32), (16, 16), layout, x, v.astype(np.float32), 4, out, "float16")
    with pytest.raises(ValueError, match="a: dtype int16 does not match the kernel dtype float32"):
        _core.bsr_kernel("linear", (32, 32), (16, 16), layout, x, v, 4, out)
    with pytest.raises(ValueError, match="out: dtype float16 does not match"):
        _core.bsr_kernel("linear", (32, 32), (16, 16), layout, x, v, 4, out.view(np.float16), "bfloat16")
    with pytest.raises(ValueError, match='dtype: unsupported "float64"'):
        _core.bsr_kernel("linear", (32, 32), (16, 16), layout, x, v, 4, out, "float64")
    with pytest.raises(ValueError, match="x"):
        _core.bsr_kernel("linear", (32, 32), (16, 16), layout, x[:-1], v, 4, out, "float16")
