"""Block-sparse GEMM on CUDA tensors: launch code for ``cuda/spmm.cu`` written once against a backend of
``sparsekit._cuda`` (``CupyBackend`` on a GPU, ``SimBackend`` on the CPU shim), as ``_cuda_select``.

W is ``[N, K]`` block-sparse with blocks ``(bh, bw)`` (multiples of 16); the layout ``w`` exposes int64
``row_offsets``, ``col_indices``, ``t_offsets``, ``t_perm``, ``t_row_indices``, ``values [nnz, bh, bw]``,
``shape`` and ``block``. float32 / float64 run ``spmm.cu`` (SIMT); float16 / bfloat16 run ``spmm_tc.cu``
(tensor cores through wmma, fp32 accumulation, one rounding to the dtype), its 16-byte vector loads taken
only when every base pointer is 16-byte aligned (row pitches always are: multiples of 16 elements).
No host synchronisation: every output size is known from the shapes.
"""

from __future__ import annotations

from typing import Any

import torch

from ._cuda import Backend, SimBackend, backend_for

TILE = 16
THREADS = TILE * TILE
DTYPES = {torch.float32: "float", torch.float64: "double"}
NAME_EXPRESSIONS: tuple[str, ...] = tuple(
    f"{k}<{c}>" for c in DTYPES.values() for k in ("spmm_dsd", "spmm_dsd_t", "spmm_sdd")
)
# tensor-core kernels (spmm_tc.cu): CTAs of 4 warps, 64 output rows (DSD) or 4 partial sums (SDD)
TC_DTYPES = {torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
TC_THREADS, TC_ROWS = 128, 64
TC_NAME_EXPRESSIONS: tuple[str, ...] = tuple(
    f"{k}<{c}, {v}>" for c in TC_DTYPES.values() for k in ("spmm_tc_dsd", "spmm_tc_dsd_t", "spmm_tc_sdd")
    for v in ("true", "false")
)
FAMILIES = {"spmm": NAME_EXPRESSIONS, "spmm_tc": TC_NAME_EXPRESSIONS}


def sim_backend(schedule: str = "forward", seed: int = 0, threads: int | None = None, race_check: bool = False,
                family: str = "spmm") -> SimBackend:
    """The kernels of ``family`` ("spmm": fp32/fp64, "spmm_tc": fp16/bf16 tensor cores) on the CPU shim
    under ``schedule`` ("forward", "reverse", "random" with ``seed``)."""
    return SimBackend(family, FAMILIES[family], schedule, seed, threads, race_check)


def _aligned(*ts: torch.Tensor) -> str:
    """"true" when every tensor's data starts on a 16-byte boundary (the tc kernels' vector loads)."""
    return "true" if all(t.data_ptr() % 16 == 0 for t in ts) else "false"


def _check(name: str, t: Any, dtype: torch.dtype | None, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _layout(w: Any, ref: torch.Tensor) -> tuple[int, int, int, int, int]:
    n, k = (int(s) for s in w.shape)
    bh, bw = (int(b) for b in w.block)
    if bh % TILE or bw % TILE or bh <= 0 or bw <= 0:
        raise ValueError(f"w.block must be multiples of {TILE}, got {(bh, bw)}")
    if n % bh or k % bw:
        raise ValueError(f"w.shape {(n, k)} must be a multiple of w.block {(bh, bw)}")
    if ref.dtype not in DTYPES and ref.dtype not in TC_DTYPES:
        raise TypeError(f"dtype {ref.dtype} is not supported (float32, float64, float16, bfloat16)")
    _check("w.values", w.values, ref.dtype, 3)
    for name in ("row_offsets", "col_indices", "t_offsets", "t_perm", "t_row_indices"):
        t = getattr(w, name)
        _check(f"w.{name}", t, torch.int64, 1)
        if t.device != ref.device:
            raise ValueError(f"w.{name} is on {t.device}, the input on {ref.device}")
    if w.values.device != ref.device:
        raise ValueError(f"w.values is on {w.values.device}, the input on {ref.device}")
    if tuple(w.values.shape[1:]) != (bh, bw):
        raise ValueError(f"w.values must be [nnz, {bh}, {bw}], got {tuple(w.values.shape)}")
    return n, k, bh, bw, int(w.values.shape[0])


class OpsBackend:
    """sparsekit.ops backend: ``linear``, ``linear_grad_input`` and ``sdd`` on CUDA tensors (or on CPU
    tensors inside ``sparsekit.testing.simulated_cuda()``); ``backend`` (fp32/fp64 kernels) and
    ``tc_backend`` (fp16/bf16) override the choice (tests). float16/bfloat16 reach the kernels as they are."""

    native_half = tuple(TC_DTYPES)

    def __init__(self, backend: Backend | None = None, tc_backend: Backend | None = None) -> None:
        self.backend, self.tc_backend = backend, tc_backend

    def _be(self, t: torch.Tensor) -> Backend:
        if t.dtype in TC_DTYPES:
            return backend_for("spmm_tc", TC_NAME_EXPRESSIONS, t, self.tc_backend)
        return backend_for("spmm", NAME_EXPRESSIONS, t, self.backend)

    def linear(self, x: torch.Tensor, w: Any) -> torch.Tensor:
        """y = x @ W^T for x [M, K]: y [M, N]."""
        _check("x", x, None, 2)
        n, k, bh, bw, _ = _layout(w, x)
        if x.shape[1] != k:
            raise ValueError(f"x must have {k} columns (w.shape[1]), got {x.shape[1]}")
        be = self._be(x)
        m = x.shape[0]
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        if m and n:
            p = be.plain
            args = (p(x), p(w.values), p(w.row_offsets), p(w.col_indices), p(y), m, n, k, bh, bw)
            if x.dtype in TC_DTYPES:
                kernel = f"spmm_tc_dsd<{TC_DTYPES[x.dtype]}, {_aligned(x, w.values)}>"
                be.launch(kernel, ((m + TC_ROWS - 1) // TC_ROWS, n // TILE), TC_THREADS, args)
            else:
                be.launch(f"spmm_dsd<{DTYPES[x.dtype]}>", ((m + TILE - 1) // TILE, n // TILE), THREADS, args)
        return y

    def linear_grad_input(self, dy: torch.Tensor, w: Any) -> torch.Tensor:
        """dx = dy @ W for dy [M, N]: dx [M, K], through the transpose metadata."""
        _check("dy", dy, None, 2)
        n, k, bh, bw, _ = _layout(w, dy)
        if dy.shape[1] != n:
            raise ValueError(f"dy must have {n} columns (w.shape[0]), got {dy.shape[1]}")
        be = self._be(dy)
        m = dy.shape[0]
        dx = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
        if m and k:
            p = be.plain
            args = (p(dy), p(w.values), p(w.t_offsets), p(w.t_perm), p(w.t_row_indices), p(dx), m, n, k, bh, bw)
            if dy.dtype in TC_DTYPES:
                kernel = f"spmm_tc_dsd_t<{TC_DTYPES[dy.dtype]}, {_aligned(dy, w.values)}>"
                be.launch(kernel, ((m + TC_ROWS - 1) // TC_ROWS, k // TILE), TC_THREADS, args)
            else:
                be.launch(f"spmm_dsd_t<{DTYPES[dy.dtype]}>", ((m + TILE - 1) // TILE, k // TILE), THREADS, args)
        return dx

    def sdd(self, a: torch.Tensor, b: torch.Tensor, w: Any) -> torch.Tensor:
        """values [nnz, bh, bw] with block (r, c) = a[:, r-block]^T @ b[:, c-block]."""
        _check("a", a, None, 2)
        _check("b", b, a.dtype, 2)
        n, k, bh, bw, nnz = _layout(w, a)
        if b.device != a.device:
            raise ValueError(f"b is on {b.device}, a on {a.device}")
        if a.shape[1] != n or b.shape[1] != k or a.shape[0] != b.shape[0]:
            raise ValueError(f"a must be [M, {n}] and b [M, {k}], got {tuple(a.shape)} and {tuple(b.shape)}")
        be = self._be(a)
        m = a.shape[0]
        out = torch.empty((nnz, bh, bw), dtype=a.dtype, device=a.device)
        if nnz:
            p = be.plain
            args = (p(a), p(b), p(w.row_offsets), p(w.col_indices), p(out), m, n, k, n // bh, bh, bw)
            grid = (nnz, (bh // TILE) * (bw // TILE))
            if a.dtype in TC_DTYPES:
                be.launch(f"spmm_tc_sdd<{TC_DTYPES[a.dtype]}, {_aligned(a, b)}>", grid, TC_THREADS, args)
            else:
                be.launch(f"spmm_sdd<{DTYPES[a.dtype]}>", grid, THREADS, args)
        return out
