"""GPU benchmark of the block-sparse GEMM kernels (cuda/spmm.cu) vs dense torch.matmul (cuBLAS): TFLOP/s on
the nonzero blocks, fraction of dense TFLOP/s, and break-even sparsity. Skipped visibly without a GPU.

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


def _time(fn, reps: int = 10) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3


@pytest.mark.parametrize("block", [32, 64, 128])
def test_dsd_vs_dense(block: int) -> None:
    m = n = k = 4096
    dtype = torch.float32
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((m, k), device="cuda", dtype=dtype)
    dense_w = torch.randn((n, k), device="cuda", dtype=dtype)
    t_dense = _time(lambda: x @ dense_w.T)
    dense_tflops = 2 * m * n * k / t_dense / 1e12
    ops = sp.OpsBackend()
    print(f"\nblock {block}: dense {dense_tflops:.1f} TFLOP/s")
    for sparsity in (0.5, 0.75, 0.9, 0.95, 0.99):
        mask = torch.rand((n // block, k // block), generator=gen) >= sparsity
        w = make_layout(mask, (block, block), dtype, gen)
        for name in ("row_offsets", "col_indices", "t_offsets", "t_perm", "t_row_indices", "values"):
            setattr(w, name, getattr(w, name).cuda())
        t = _time(lambda: ops.linear(x, w))
        flops = 2 * m * int(mask.sum()) * block * block
        print(f"  sparsity {sparsity:.2f}: {flops / t / 1e12:.1f} TFLOP/s on nonzeros "
              f"({flops / t / 1e12 / dense_tflops:.2f} of dense), speedup vs dense {t_dense / t:.2f}")
