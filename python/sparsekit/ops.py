"""Block-sparse GEMM ops (DSD forward, dX, SDD) as ``torch.library`` custom ops, with pluggable backends.

Public, differentiable: :func:`bsr_linear` (``x @ W^T + b``), :func:`bsr_matmul` (``W @ x``) and :func:`sdd`
(the blocks of ``a^T @ b`` at a layout). Each is a ``torch.ops.sparsekit.*`` custom op with a fake (meta)
implementation and a registered autograd formula, so ``torch.compile(fullgraph=True)`` traces through
them without graph breaks. The kernels behind them come from a backend per device: "cpu" is the Rust
core (float32, and float16/bfloat16 read as raw bits with float32 accumulation; float64 takes a dense torch
reference path), CUDA tensors and CPU tensors inside
``sparsekit.testing.simulated_cuda()`` take the CUDA kernels.
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from sparsekit import _buffers
from sparsekit._arrays import DTYPE_TAGS, HALF, contiguous_bits
from sparsekit.blocksparse import BlockSparseMatrix, block_rows

BACKENDS: Dict[str, Any] = {}


def register_backend(device_type: str, backend: Any) -> None:
    """Register ``backend`` (with ``linear``, ``linear_grad_input``, ``sdd``) for tensors on ``device_type``."""
    BACKENDS[device_type] = backend


def _backend(x: torch.Tensor) -> Any:
    """The backend for ``x``: the CUDA kernels for CUDA tensors and, inside
    ``sparsekit.testing.simulated_cuda()``, for CPU tensors (run on the CPU shim); else by device type."""
    from . import _cuda

    if _cuda.runs_on_device(x) and x.dtype in (torch.float32, torch.float64, *HALF):
        if "cuda" not in BACKENDS:
            from ._cuda_spmm import OpsBackend

            register_backend("cuda", OpsBackend())
        return BACKENDS["cuda"]
    if x.device.type not in BACKENDS:
        raise ValueError(f"x: no block-sparse backend for device {x.device.type!r}")
    return BACKENDS[x.device.type]


_np = contiguous_bits  # the flat numpy view the Rust kernels borrow


def _f32(t: Tensor) -> Tensor:
    """float16/bfloat16 -> float32 for the kernels (every backend accumulates in float32; the ops round the
    result back once); other dtypes unchanged."""
    return t.float() if t.dtype in HALF else t


def _kernel_input(backend: Any, t: Tensor) -> Tensor:
    """``t`` as ``backend`` takes it: a backend that lists float16/bfloat16 in ``native_half`` reads them
    itself (float32 accumulation); for the others they become float32 here (see ``_f32``)."""
    return t if t.dtype in getattr(backend, "native_half", ()) else _f32(t)


_KERNEL_TAGS = {d: DTYPE_TAGS[d] for d in (torch.float32, *HALF)}  # no float64 kernel: gradcheck uses the reference


class _CpuBackend:
    """Rust kernels for float32, float16 and bfloat16 (``native_half``: the half tensors reach the kernels
    as they are, read as raw bits, accumulated in float32 and rounded once into a result of their own
    dtype); other dtypes (float64, for gradcheck) use a plain torch reference (dense gather)."""

    native_half = HALF

    def _layout(self, w: Any) -> list:
        return [_np(w.row_offsets), _np(w.col_indices), _np(w.t_offsets), _np(w.t_perm), _np(w.t_row_indices)]

    @staticmethod
    def _tag(t: Tensor, arg: str, other: Tensor, other_arg: str) -> Optional[str]:
        """The kernel dtype tag of ``t`` (``None``: the reference path); ``other`` must share its dtype."""
        if other.dtype != t.dtype:
            raise ValueError(f"{other_arg}: dtype {other.dtype} does not match {arg}'s {t.dtype}")
        return _KERNEL_TAGS.get(t.dtype)

    @staticmethod
    def _out(numel: int, dtype: torch.dtype) -> Tensor:
        return _buffers.empty(numel, dtype)

    def linear(self, x: torch.Tensor, w: Any) -> torch.Tensor:
        """``x @ W^T``."""
        tag = self._tag(x, "x", w.values, "W.values")
        if tag is None:
            return x @ _dense(w).to(x.dtype).T
        from sparsekit import _core
        out = self._out(x.shape[0] * w.shape[0], x.dtype)
        _core.bsr_kernel("linear", w.shape, w.block, self._layout(w), _np(x), _np(w.values), x.shape[0],
                         _np(out), tag)
        return out.reshape(x.shape[0], w.shape[0])

    def linear_grad_input(self, dy: torch.Tensor, w: Any) -> torch.Tensor:
        """``dy @ W``."""
        tag = self._tag(dy, "dy", w.values, "W.values")
        if tag is None:
            return dy @ _dense(w).to(dy.dtype)
        from sparsekit import _core
        out = self._out(dy.shape[0] * w.shape[1], dy.dtype)
        _core.bsr_kernel("linear_grad_input", w.shape, w.block, self._layout(w), _np(dy), _np(w.values),
                         dy.shape[0], _np(out), tag)
        return out.reshape(dy.shape[0], w.shape[1])

    def sdd(self, a: torch.Tensor, b: torch.Tensor, w: Any) -> torch.Tensor:
        """Blocks ``a[:, r]^T @ b[:, c]`` of the layout of ``w``, shape ``[nnz, bh, bw]``."""
        bh, bw = w.block
        tag = self._tag(a, "a", b, "b")
        if tag is None:
            full = a.T @ b
            n, k = w.shape
            blocks = full.reshape(n // bh, bh, k // bw, bw).transpose(1, 2)
            rows = block_rows(w.row_offsets, w.nnz_blocks)
            return blocks[rows, w.col_indices]
        from sparsekit import _core
        out = self._out(w.nnz_blocks * bh * bw, a.dtype)
        _core.bsr_kernel("sdd", w.shape, w.block, self._layout(w), _np(a), _np(b), a.shape[0], _np(out),
                         tag)
        return out.reshape(w.nnz_blocks, bh, bw)


register_backend("cpu", _CpuBackend())


class _W(NamedTuple):
    """A block-sparse matrix as the custom ops see it: tensors and ints only (what a backend reads)."""

    values: Tensor
    row_offsets: Tensor
    col_indices: Tensor
    t_offsets: Tensor
    t_perm: Tensor
    t_row_indices: Tensor
    shape: Tuple[int, int]
    block: Tuple[int, int]

    @property
    def nnz_blocks(self) -> int:
        return int(self.col_indices.numel())


def _dense(w: Any) -> Tensor:
    """The dense matrix of a :class:`_W` (reference path)."""
    n, k = w.shape
    bh, bw = w.block
    out = w.values.new_zeros(n // bh, k // bw, bh, bw)
    rows = block_rows(w.row_offsets, w.nnz_blocks)
    out[rows, w.col_indices] = w.values
    return out.transpose(1, 2).reshape(n, k)


def _mk(values: Tensor, layout: Sequence[Tensor], dims: Sequence[int]) -> _W:
    n, k, bh, bw = (int(d) for d in dims)
    ro, ci, to, tp, tr = layout
    return _W(values.contiguous(), ro, ci, to, tp, tr, (n, k), (bh, bw))


# ---- torch.library custom ops: tensors + the layout's five index tensors + dims [n, k, bh, bw] ----

@torch.library.custom_op("sparsekit::bsr_linear", mutates_args=())
def _op_bsr_linear(x: Tensor, values: Tensor, layout: List[Tensor], dims: List[int]) -> Tensor:
    """``x [M, K] @ W^T`` -> ``[M, N]``."""
    be = _backend(x)
    return be.linear(_kernel_input(be, x).contiguous(), _mk(_kernel_input(be, values), layout, dims)).to(x.dtype)


@torch.library.custom_op("sparsekit::bsr_linear_grad_input", mutates_args=())
def _op_grad_input(dy: Tensor, values: Tensor, layout: List[Tensor], dims: List[int]) -> Tensor:
    """``dy [M, N] @ W`` -> ``[M, K]`` (through the transpose metadata)."""
    be = _backend(dy)
    g = be.linear_grad_input(_kernel_input(be, dy).contiguous(), _mk(_kernel_input(be, values), layout, dims))
    return g.to(dy.dtype)


@torch.library.custom_op("sparsekit::sdd", mutates_args=())
def _op_sdd(a: Tensor, b: Tensor, layout: List[Tensor], dims: List[int]) -> Tensor:
    """Blocks of ``a[M, N]^T @ b[M, K]`` at the layout -> ``[nnz, bh, bw]``."""
    # Values are not read by sdd; the CUDA backend takes nnz from their shape.
    be = _backend(a)
    a_in, b_in = _kernel_input(be, a), _kernel_input(be, b)
    w = _mk(a_in.new_empty(layout[1].shape[0], dims[2], dims[3]), layout, dims)
    return be.sdd(a_in.contiguous(), b_in.contiguous(), w).to(a.dtype)


@torch.library.custom_op("sparsekit::bsr_matmul", mutates_args=())
def _op_bsr_matmul(values: Tensor, layout: List[Tensor], dims: List[int], x: Tensor) -> Tensor:
    """``W @ x [K, M]`` -> ``[N, M]``, as ``(x^T @ W^T)^T`` on the DSD kernel."""
    be = _backend(x)
    y = be.linear(_kernel_input(be, x).T.contiguous(), _mk(_kernel_input(be, values), layout, dims))
    return y.T.contiguous().to(x.dtype)


@_op_bsr_linear.register_fake
def _(x: Tensor, values: Tensor, layout: List[Tensor], dims: List[int]) -> Tensor:
    return x.new_empty(x.shape[0], dims[0])


@_op_grad_input.register_fake
def _(dy: Tensor, values: Tensor, layout: List[Tensor], dims: List[int]) -> Tensor:
    return dy.new_empty(dy.shape[0], dims[1])


@_op_sdd.register_fake
def _(a: Tensor, b: Tensor, layout: List[Tensor], dims: List[int]) -> Tensor:
    return a.new_empty(layout[1].shape[0], dims[2], dims[3])


@_op_bsr_matmul.register_fake
def _(values: Tensor, layout: List[Tensor], dims: List[int], x: Tensor) -> Tensor:
    return x.new_empty(dims[0], x.shape[1])


def _ctx_linear(ctx: Any, inputs: Tuple[Any, ...], output: Tensor) -> None:
    x, values, layout, dims = inputs
    ctx.save_for_backward(x, values, *layout)
    ctx.dims = dims


def _bwd_linear(ctx: Any, dy: Tensor) -> Tuple[Any, ...]:
    x, values, *layout = ctx.saved_tensors
    dims = ctx.dims
    dx = torch.ops.sparsekit.bsr_linear_grad_input(dy, values, layout, dims) if ctx.needs_input_grad[0] else None
    dv = torch.ops.sparsekit.sdd(dy, x, layout, dims).to(values.dtype) if ctx.needs_input_grad[1] else None
    return dx, dv, [None] * 5, None


def _ctx_sdd(ctx: Any, inputs: Tuple[Any, ...], output: Tensor) -> None:
    a, b, layout, dims = inputs
    ctx.save_for_backward(a, b, *layout)
    ctx.dims = dims


def _bwd_sdd(ctx: Any, g: Tensor) -> Tuple[Any, ...]:
    # out = P(a^T b) with P the sampling at the layout: da = b @ G^T, db = a @ G, G the sparse gradient.
    a, b, *layout = ctx.saved_tensors
    dims = ctx.dims
    g = g.contiguous()
    da = torch.ops.sparsekit.bsr_linear(b, g, layout, dims) if ctx.needs_input_grad[0] else None
    db = torch.ops.sparsekit.bsr_linear_grad_input(a, g, layout, dims) if ctx.needs_input_grad[1] else None
    return da, db, [None] * 5, None


def _ctx_matmul(ctx: Any, inputs: Tuple[Any, ...], output: Tensor) -> None:
    values, layout, dims, x = inputs
    ctx.save_for_backward(x, values, *layout)
    ctx.dims = dims


def _bwd_matmul(ctx: Any, g: Tensor) -> Tuple[Any, ...]:
    # out = W x: dW = P(g x^T) = sdd(g^T, x^T), dx = W^T g = (g^T W)^T.
    x, values, *layout = ctx.saved_tensors
    dims = ctx.dims
    gt = g.T.contiguous()
    dv = torch.ops.sparsekit.sdd(gt, x.T.contiguous(), layout, dims).to(values.dtype) if ctx.needs_input_grad[0] else None
    dx = torch.ops.sparsekit.bsr_linear_grad_input(gt, values, layout, dims).T if ctx.needs_input_grad[3] else None
    return dv, [None] * 5, None, dx


torch.library.register_autograd("sparsekit::bsr_linear", _bwd_linear, setup_context=_ctx_linear)
torch.library.register_autograd("sparsekit::sdd", _bwd_sdd, setup_context=_ctx_sdd)
torch.library.register_autograd("sparsekit::bsr_matmul", _bwd_matmul, setup_context=_ctx_matmul)


# ---- public functions: argument checks, then the custom ops ----

def _parts(w: Any, arg: str = "W") -> Tuple[List[Tensor], List[int]]:
    if not isinstance(w, BlockSparseMatrix):
        raise TypeError(f"{arg}: expected a sparsekit.BlockSparseMatrix, got {type(w).__name__}")
    return ([w.row_offsets, w.col_indices, w.t_offsets, w.t_perm, w.t_row_indices],
            [w.shape[0], w.shape[1], w.block[0], w.block[1]])


def _check(t: Any, arg: str, ref: Tensor, ref_arg: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{arg}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{arg}: expected a floating-point tensor, got {t.dtype}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{arg}: dtype {t.dtype} does not match {ref_arg}'s {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{arg}: device {t.device} does not match {ref_arg}'s {ref.device}")


def _ready(x: Tensor) -> None:
    # A clear error before autograd if no backend serves x (skipped while compiling: the ops check again).
    if not torch.compiler.is_compiling():
        _backend(x)


def _values_for(w: BlockSparseMatrix, values: Optional[Tensor]) -> Tensor:
    v = w.values if values is None else values
    bh, bw = w.block
    if tuple(v.shape) != (w.nnz_blocks, bh, bw):
        raise ValueError(f"W.values: expected shape ({w.nnz_blocks}, {bh}, {bw}), got {tuple(v.shape)}")
    return v


def bsr_linear(x: Tensor, w: BlockSparseMatrix, bias: Optional[Tensor] = None, *,
               values: Optional[Tensor] = None) -> Tensor:
    """``x @ W^T (+ bias)`` for ``x`` of any leading shape ``[..., K]``; differentiable in ``x``, ``W.values``
    (or ``values``, which replace them: a module passes its parameter) and ``bias``. Non-contiguous ``x``
    is copied once."""
    layout, dims = _parts(w)
    v = _values_for(w, values)
    _check(x, "x", v, "W.values")
    if x.dim() == 0 or x.shape[-1] != dims[1]:
        raise ValueError(f"x: last dimension {tuple(x.shape)[-1:]} does not match W's in_features {dims[1]}")
    if bias is not None:
        _check(bias, "bias", v, "W.values")
        if tuple(bias.shape) != (dims[0],):
            raise ValueError(f"bias: expected shape ({dims[0]},), got {tuple(bias.shape)}")
    _ready(x)
    lead = x.shape[:-1]
    y = torch.ops.sparsekit.bsr_linear(x.reshape(-1, dims[1]), v, layout, dims).reshape(*lead, dims[0])
    return y + bias if bias is not None else y


def bsr_matmul(w: BlockSparseMatrix, x: Tensor) -> Tensor:
    """``W @ x`` for ``x`` of shape ``[K]`` or ``[K, M]``; differentiable in ``W.values`` and ``x``."""
    layout, dims = _parts(w)
    _check(x, "x", w.values, "W.values")
    if x.dim() not in (1, 2) or x.shape[0] != dims[1]:
        raise ValueError(f"x: expected shape [{dims[1]}] or [{dims[1]}, M], got {tuple(x.shape)}")
    _ready(x)
    x2 = x.reshape(dims[1], -1)
    y = torch.ops.sparsekit.bsr_matmul(_values_for(w, None), layout, dims, x2)
    return y.reshape(dims[0]) if x.dim() == 1 else y


def sdd(a: Tensor, b: Tensor, layout: BlockSparseMatrix) -> Tensor:
    """The blocks of ``a^T @ b`` (``a [M, N]``, ``b [M, K]``) at ``layout``'s positions, as ``[nnz, bh, bw]``
    in its block order (``layout.values`` are not read): the sampled dense x dense product, e.g. the
    weight gradient of :func:`bsr_linear`. Differentiable in ``a`` and ``b``."""
    lay, dims = _parts(layout, "layout")
    _check(a, "a", a, "a")  # a tensor of a floating dtype
    _check(b, "b", a, "a")
    if lay[0].device != a.device:
        raise ValueError(f"layout: device {lay[0].device} does not match a's {a.device}")
    if a.dim() != 2 or tuple(a.shape[1:]) != (dims[0],):
        raise ValueError(f"a: expected shape [M, {dims[0]}], got {tuple(a.shape)}")
    if b.dim() != 2 or tuple(b.shape) != (a.shape[0], dims[1]):
        raise ValueError(f"b: expected shape [{a.shape[0]}, {dims[1]}], got {tuple(b.shape)}")
    _ready(a)
    return torch.ops.sparsekit.sdd(a, b, lay, dims)
