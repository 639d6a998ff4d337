"""Block-sparse GEMM ops (DSD forward, dX, SDD) with pluggable backends; the Rust CPU backend is "cpu"."""

from __future__ import annotations

from typing import Any, Dict

import numpy as np
import torch

from sparsekit.blocksparse import BlockSparseMatrix

BACKENDS: Dict[str, Any] = {}


def register_backend(device_type: str, backend: Any) -> None:
    """Register ``backend`` (with ``linear``, ``linear_grad_input``, ``sdd``) for tensors on ``device_type``."""
    BACKENDS[device_type] = backend


def _backend(x: torch.Tensor) -> Any:
    """The backend for ``x``: the CUDA kernels for CUDA tensors and, inside
    ``sparsekit.testing.simulated_cuda()``, for CPU tensors (run on the CPU shim); else by device type."""
    from . import _cuda

    if _cuda.runs_on_device(x) and x.dtype in (torch.float32, torch.float64):
        if "cuda" not in BACKENDS:
            from ._cuda_spmm import OpsBackend

            register_backend("cuda", OpsBackend())
        return BACKENDS["cuda"]
    if x.device.type not in BACKENDS:
        raise ValueError(f"x: no block-sparse backend for device {x.device.type!r}")
    return BACKENDS[x.device.type]


def _np(t: torch.Tensor) -> Any:
    return t.detach().contiguous().reshape(-1).numpy()


class _CpuBackend:
    """Rust f32 kernels; other dtypes use a plain torch reference (dense gather), e.g. float64 for gradcheck."""

    def _layout(self, w: BlockSparseMatrix) -> list:
        return [_np(w.row_offsets), _np(w.col_indices), _np(w.t_offsets), _np(w.t_perm), _np(w.t_row_indices)]

    def linear(self, x: torch.Tensor, w: BlockSparseMatrix) -> torch.Tensor:
        """``x @ W^T``."""
        if x.dtype != torch.float32:
            return x @ w.to_dense().to(x.dtype).T
        from sparsekit import _core
        out = np.empty(x.shape[0] * w.shape[0], dtype=np.float32)
        _core.bsr_kernel("linear", w.shape, w.block, self._layout(w), _np(x), _np(w.values.float()), x.shape[0], out)
        return torch.from_numpy(out).reshape(x.shape[0], w.shape[0])

    def linear_grad_input(self, dy: torch.Tensor, w: BlockSparseMatrix) -> torch.Tensor:
        """``dy @ W``."""
        if dy.dtype != torch.float32:
            return dy @ w.to_dense().to(dy.dtype)
        from sparsekit import _core
        out = np.empty(dy.shape[0] * w.shape[1], dtype=np.float32)
        _core.bsr_kernel("linear_grad_input", w.shape, w.block, self._layout(w), _np(dy), _np(w.values.float()),
                         dy.shape[0], out)
        return torch.from_numpy(out).reshape(dy.shape[0], w.shape[1])

    def sdd(self, a: torch.Tensor, b: torch.Tensor, w: BlockSparseMatrix) -> torch.Tensor:
        """Blocks ``a[:, r]^T @ b[:, c]`` of the layout of ``w``, shape ``[nnz, bh, bw]``."""
        bh, bw = w.block
        if a.dtype != torch.float32:
            full = a.T @ b
            n, k = w.shape
            blocks = full.reshape(n // bh, bh, k // bw, bw).transpose(1, 2)
            rows = torch.repeat_interleave(torch.arange(n // bh), torch.diff(w.row_offsets))
            return blocks[rows, w.col_indices]
        from sparsekit import _core
        out = np.empty(w.nnz_blocks * bh * bw, dtype=np.float32)
        _core.bsr_kernel("sdd", w.shape, w.block, self._layout(w), _np(a), _np(b), a.shape[0], out)
        return torch.from_numpy(out).reshape(w.nnz_blocks, bh, bw)


register_backend("cpu", _CpuBackend())


class _BsrLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, values: torch.Tensor, w: BlockSparseMatrix) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, values)
        ctx.w = w
        return _backend(x).linear(x, w)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> Any:  # type: ignore[override]
        x, values = ctx.saved_tensors
        w = ctx.w
        be = _backend(x)
        dx = be.linear_grad_input(dy.contiguous(), w) if ctx.needs_input_grad[0] else None
        dv = be.sdd(dy.contiguous(), x, w).to(values.dtype) if ctx.needs_input_grad[1] else None
        return dx, dv, None


def bsr_linear(x: torch.Tensor, w: BlockSparseMatrix, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for ``x`` of any leading shape ``[..., K]``; differentiable in ``x``, ``w.values``, ``bias``."""
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"x: last dimension {x.shape[-1]} does not match W's in_features {w.shape[1]}")
    _backend(x)  # a clear error before autograd if no backend serves x
    lead = x.shape[:-1]
    y = _BsrLinear.apply(x.reshape(-1, w.shape[1]).contiguous(), w.values, w).reshape(*lead, w.shape[0])
    return y + bias if bias is not None else y
