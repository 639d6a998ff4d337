"""Block-sparse ops: torch.library registration (opcheck, torch.compile), gradcheck in float64, hypothesis
properties against dense float64 references, bad input."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsekit
from sparsekit import ops
from sparsekit.blocksparse import BlockSparseMatrix
from sparsekit.nn import BlockSparseLinear
from reference import within_one_ulp


def _matrix(n, k, block, mask, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return BlockSparseMatrix.from_dense(torch.randn(n, k, generator=g).to(dtype), block, mask=mask)


def _gathered(full, w):
    """The blocks of the dense ``full`` [N, K] at ``w``'s layout, in its order (independent of the kernels)."""
    n, k = w.shape
    bh, bw = w.block
    out = []
    rows = torch.repeat_interleave(torch.arange(n // bh), torch.diff(w.row_offsets)).tolist()
    for r, c in zip(rows, w.col_indices.tolist()):
        out.append(full[r * bh:(r + 1) * bh, c * bw:(c + 1) * bw])
    return torch.stack(out) if out else full.new_zeros(0, bh, bw)


BLOCKS = st.sampled_from([16, 32, 64, 128])


@st.composite
def problems(draw):
    bh, bw = draw(BLOCKS), draw(BLOCKS)
    nbr = draw(st.integers(1, max(1, 256 // bh)))
    nbc = draw(st.integers(1, max(1, 256 // bw)))
    kind = draw(st.sampled_from(["random", "empty_rows", "zero", "full"]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if kind == "full":
        mask = torch.ones(nbr, nbc, dtype=torch.bool)
    elif kind == "zero":
        mask = torch.zeros(nbr, nbc, dtype=torch.bool)
    else:
        mask = torch.rand(nbr, nbc, generator=g) < draw(st.floats(0.05, 0.95))
        if kind == "empty_rows":
            mask[torch.rand(nbr, generator=g) < 0.5] = False
    m = draw(st.integers(0, 40))
    return nbr * bh, nbc * bw, (bh, bw), mask, m, seed


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_property_ops_match_dense_float64(p):
    n, k, block, mask, m, seed = p
    w = _matrix(n, k, block, mask, seed=seed)
    wd = w.to_dense().double()
    g = torch.Generator().manual_seed(seed + 1)
    x, dy = torch.randn(m, k, generator=g), torch.randn(m, n, generator=g)
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ops.bsr_linear(x, w).double(), x.double() @ wd.T, **tol)
    torch.testing.assert_close(ops.bsr_matmul(w, x.T).double(), wd @ x.double().T, **tol)
    torch.testing.assert_close(ops.sdd(dy, x, w).double(), _gathered(dy.double().T @ x.double(), w), **tol)
    torch.testing.assert_close(ops.BACKENDS["cpu"].linear_grad_input(dy, w).double(), dy.double() @ wd, **tol)


def test_results_do_not_depend_on_thread_count():
    mask = torch.rand(8, 8, generator=torch.Generator().manual_seed(1)) < 0.4
    w = _matrix(256, 256, (32, 32), mask)
    x, dy = torch.randn(300, 256), torch.randn(300, 256)
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
            assert torch.equal(a, b)


def _gc_case(dtype=torch.float64):
    mask = torch.tensor([[True, False, True], [False, False, False], [True, True, False]])
    return _matrix(48, 48, (16, 16), mask, dtype=dtype, seed=2)


def test_gradcheck_float64_all_three():
    # Small blocks keep gradcheck's element-by-element perturbation quick (any block size works on CPU).
    mask = torch.tensor([[True, False, True], [False, False, False], [True, True, False]])
    w = _matrix(12, 9, (4, 3), mask, dtype=torch.float64, seed=2)
    values = w.values.clone().requires_grad_(True)
    x = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: ops.bsr_linear(x, w, b, values=v), (x, values, bias))
    xm = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)

    def matmul(v, xm):
        w2 = BlockSparseMatrix(w.shape, w.block, w.row_offsets, w.col_indices, v)
        return ops.bsr_matmul(w2, xm)

    assert torch.autograd.gradcheck(matmul, (values, xm))
    a = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.sdd(a, b, w), (a, b))


def test_float32_gradients_match_dense():
    w = _gc_case(torch.float32)
    values = w.values.clone().requires_grad_(True)
    x = torch.randn(2, 7, 48, requires_grad=True)
    y = ops.bsr_linear(x, w, values=values)
    g = torch.randn_like(y)
    y.backward(g)
    wd = w.to_dense().double()
    gd = g.double().reshape(-1, 48)
    torch.testing.assert_close(x.grad.double().reshape(-1, 48), gd @ wd, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(values.grad.double(), _gathered(gd.T @ x.detach().double().reshape(-1, 48), w),
                               rtol=1e-4, atol=1e-4)


def _op_args(dtype, grad):
    w = _gc_case(dtype)
    lay = [w.row_offsets, w.col_indices, w.t_offsets, w.t_perm, w.t_row_indices]
    dims = [48, 48, 16, 16]
    r = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=grad)  # noqa: E731
    v = w.values.clone().requires_grad_(grad)
    return {
        "bsr_linear": (r(5, 48), v, lay, dims),
        "bsr_linear_grad_input": (r(5, 48), v.detach(), lay, dims),
        "sdd": (r(5, 48), r(5, 48), lay, dims),
        "bsr_matmul": (v, lay, dims, r(48, 3)),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["bsr_linear", "bsr_linear_grad_input", "sdd", "bsr_matmul"])
def test_opcheck(name, dtype):
    grad = name != "bsr_linear_grad_input"  # its autograd is not registered (used only inside backward)
    args = _op_args(dtype, grad)[name]
    torch.library.opcheck(getattr(torch.ops.sparsekit, name).default, args)


def test_torch_compile_fullgraph_block_sparse_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(BlockSparseLinear(64, 96, (32, 16), density=0.5), torch.nn.ReLU(),
                                BlockSparseLinear(96, 32, (16, 32), density=0.5, bias=False))
    x = torch.randn(2, 5, 64)
    ref = model(x)
    ref.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g)


def test_non_contiguous_inputs_are_handled():
    w = _gc_case(torch.float32)
    x = torch.randn(48, 6).T  # non-contiguous [6, 48]
    torch.testing.assert_close(ops.bsr_linear(x, w), x @ w.to_dense().T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ops.bsr_matmul(w, x.T.contiguous().T.T), w.to_dense() @ x.T, rtol=1e-4, atol=1e-4)
    a = torch.randn(48, 6).T
    torch.testing.assert_close(ops.sdd(a, x, w), _gathered(a.T @ x, w), rtol=1e-4, atol=1e-4)


def test_empty_matrices():
    w = _matrix(32, 32, (16, 16), torch.zeros(2, 2, dtype=torch.bool))
    assert torch.equal(ops.bsr_linear(torch.randn(3, 32), w), torch.zeros(3, 32))
    assert ops.sdd(torch.randn(3, 32), torch.randn(3, 32), w).shape == (0, 16, 16)
    w = _matrix(32, 32, (16, 16), torch.ones(2, 2, dtype=torch.bool))
    assert ops.bsr_linear(torch.randn(0, 32), w).shape == (0, 32)
    assert torch.equal(ops.sdd(torch.randn(0, 32), torch.randn(0, 32), w), torch.zeros(4, 16, 16))


def test_bad_input_errors():
    w = _gc_case(torch.float32)
    with pytest.raises(TypeError, match="x: dtype"):
        ops.bsr_linear(torch.randn(2, 48, dtype=torch.float64), w)
    with pytest.raises(ValueError, match="x: device"):
        ops.bsr_linear(torch.randn(2, 48, device="meta"), w)
    with pytest.raises(TypeError, match="W: expected"):
        ops.bsr_linear(torch.randn(2, 48), torch.randn(48, 48))
    with pytest.raises(ValueError, match="x: last dimension"):
        ops.bsr_linear(torch.randn(2, 40), w)
    with pytest.raises(ValueError, match="bias"):
        ops.bsr_linear(torch.randn(2, 48), w, torch.randn(5))
    with pytest.raises(TypeError, match="x: expected a floating"):
        ops.bsr_matmul(w, torch.ones(48, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="x: expected shape"):
        ops.bsr_matmul(w, torch.randn(40, 2))
    with pytest.raises(ValueError, match="b: expected shape"):
        ops.sdd(torch.randn(3, 48), torch.randn(4, 48), w)
    with pytest.raises(TypeError, match="b: dtype"):
        ops.sdd(torch.randn(3, 48), torch.randn(3, 48, dtype=torch.float64), w)
    with pytest.raises(TypeError, match="layout"):
        ops.sdd(torch.randn(3, 48), torch.randn(3, 48), None)
    with pytest.raises(ValueError, match="layout: device cpu does not match a's meta"):
        ops.sdd(torch.randn(3, 48, device="meta"), torch.randn(3, 48, device="meta"), w)


def test_bad_layouts_are_refused():
    ro = torch.tensor([0, 2, 2])
    with pytest.raises(ValueError, match="col_indices: must lie"):
        BlockSparseMatrix((32, 32), (16, 16), ro, torch.tensor([0, 2]), torch.zeros(2, 16, 16))
    with pytest.raises(ValueError, match="col_indices: must lie"):
        BlockSparseMatrix((32, 32), (16, 16), ro, torch.tensor([-1, 1]), torch.zeros(2, 16, 16))
    with pytest.raises(ValueError, match="strictly increasing"):
        BlockSparseMatrix((32, 32), (16, 16), ro, torch.tensor([1, 0]), torch.zeros(2, 16, 16))
    with pytest.raises(ValueError, match="row_offsets"):
        BlockSparseMatrix((32, 32), (16, 16), torch.tensor([0, 3, 2]), torch.tensor([0, 1]), torch.zeros(2, 16, 16))
    # A new block-row may restart the columns.
    BlockSparseMatrix((32, 32), (16, 16), torch.tensor([0, 1, 2]), torch.tensor([1, 0]), torch.zeros(2, 16, 16))
    # Corrupted after construction: the Rust validation refuses it before reading memory.
    w = _gc_case(torch.float32)
    w.col_indices = w.col_indices.clone()
    w.col_indices[0] = 99
    with pytest.raises(ValueError, match="col_indices"):
        ops.bsr_linear(torch.randn(2, 48), w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(dtype, monkeypatch):
    from sparsekit import _core

    calls = []
    kernel = _core.bsr_kernel
    monkeypatch.setattr(_core, "bsr_kernel", lambda op, *a: (calls.append(op), kernel(op, *a))[1])
    # reference: the same half inputs, the product in float64, rounded once to the half dtype
    mask = torch.rand(4, 3, generator=torch.Generator().manual_seed(7)) < 0.6
    w = _matrix(128, 96, (32, 32), mask, dtype=dtype, seed=3)
    x = torch.randn(20, 96, generator=torch.Generator().manual_seed(4)).to(dtype).requires_grad_()
    v = w.values.detach().clone().requires_grad_()
    y = ops.bsr_linear(x, w, values=v)
    wd = w.to_dense().double()
    assert y.dtype == dtype
    want = (x.detach().double() @ wd.T).to(dtype)
    # float32 accumulation differs from float64 by far less than one half-precision ulp: mostly equal bits
    assert within_one_ulp(y, want, 1e-3)
    g = torch.randn(20, 128, generator=torch.Generator().manual_seed(5)).to(dtype)
    y.backward(g)
    gx_want = (g.double() @ wd).to(dtype)
    gv_want = _gathered(g.double().T @ x.detach().double(), w).to(dtype)
    assert x.grad.dtype == dtype and v.grad.dtype == dtype
    assert within_one_ulp(x.grad, gx_want, 1e-3) and within_one_ulp(v.grad, gv_want, 1e-3)
    assert calls == ["linear", "linear_grad_input", "sdd"]  # the Rust kernels ran, not a dense fallback
