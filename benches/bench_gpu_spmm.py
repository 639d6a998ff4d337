"""GPU benchmark of the block-sparse GEMM kernels (cuda/spmm.cu for float32, cuda/spmm_tc.cu on tensor cores
for bfloat16) vs dense torch.matmul (cuBLAS) and vs torch's BSR (``to_sparse_bsr``) at 50-99% block sparsity,
blocks 32/64/128, M=N=K=4096 and an FFN shape (M=8192 tokens, 4096 -> 14336). Prints TFLOP/s on the nonzero
blocks, the fraction of dense TFLOP/s, the speedup over dense and over torch BSR, and the break-even
sparsity (the lowest measured sparsity at which DSD beats dense). Skipped visibly without a GPU.

    pytest -q -m gpu benches/bench_gpu_spmm.py -s
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the spmm GPU benchmark needs one", allow_module_level=True)

from sparsekit import _cuda_spmm as sp  # noqa: E402
from test_cuda_spmm import make_layout  # type: ignore  # noqa: E402

SPARSITIES = (0.5, 0.6, 0.75, 0.9, 0.95, 0.99)
SHAPES = {"square": (4096, 4096, 4096), "ffn": (8192, 14336, 4096)}  # (M, N, K): y[M, N] = x[M, K] @ W^T


def _time(fn, reps: int = 10) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def _cuda_layout(mask: torch.Tensor, block: int, dtype: torch.dtype, gen: torch.Generator):  # type: ignore[no-untyped-def]
    w = make_layout(mask, (block, block), dtype, gen)
    for name in ("row_offsets", "col_indices", "t_offsets", "t_perm", "t_row_indices", "values"):
        setattr(w, name, getattr(w, name).cuda())
    return w


def _torch_bsr(w, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    n, k = w.shape
    try:
        return torch.sparse_bsr_tensor(w.row_offsets, w.col_indices, w.values, (n, k), dtype=dtype)
    except RuntimeError:
        return None


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_dsd_sdd_vs_dense_and_torch_bsr(dtype: torch.dtype, block: int, shape: str) -> None:
    m, n, k = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((m, k), device="cuda", dtype=dtype)
    dy = torch.randn((m, n), device="cuda", dtype=dtype)
    dense_w = torch.randn((n, k), device="cuda", dtype=dtype)
    t_dense = _time(lambda: x @ dense_w.T)
    dense_tflops = 2 * m * n * k / t_dense / 1e12
    ops = sp.OpsBackend()
    print(f"\n{dtype} block {block} {shape} (M, N, K) = {(m, n, k)}: dense {dense_tflops:.1f} TFLOP/s")
    break_even = None
    for sparsity in SPARSITIES:
        mask = torch.rand((n // block, k // block), generator=gen) >= sparsity
        w = _cuda_layout(mask, block, dtype, gen)
        flops = 2 * m * int(mask.sum()) * block * block
        t = _time(lambda: ops.linear(x, w))
        t_sdd = _time(lambda: ops.sdd(dy, x, w))
        bsr = _torch_bsr(w, dtype)
        vs_bsr = ""
        if bsr is not None:
            try:
                t_bsr = _time(lambda: (bsr @ x.T).T)
                vs_bsr = f", vs torch BSR {t_bsr / t:.2f}x"
            except (RuntimeError, NotImplementedError) as e:
                vs_bsr = f", torch BSR: {type(e).__name__}"
        if break_even is None and t < t_dense:
            break_even = sparsity
        print(f"  sparsity {sparsity:.2f}: DSD {flops / t / 1e12:.1f} TFLOP/s on nonzeros "
              f"({flops / t / 1e12 / dense_tflops:.2f} of dense), vs dense {t_dense / t:.2f}x{vs_bsr}; "
              f"SDD {flops / t_sdd / 1e12:.1f} TFLOP/s")
    print(f"  break-even sparsity (DSD faster than dense): {break_even if break_even is not None else '> 0.99'}")
