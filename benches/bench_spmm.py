"""x [4096, 2048] @ W^T, W 2048x2048 with 32x32 blocks (f32), sparsekit vs dense torch.matmul vs torch BSR.

Run: ``PYTHONPATH=$PWD/python python benches/bench_spmm.py`` (prints times and ratios; not collected by pytest).
"""

import time

import torch

from sparsekit.blocksparse import BlockSparseMatrix
from sparsekit.ops import BACKENDS


def _best(f, reps=3):
    f()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    m, n, k, b = 4096, 2048, 2048, 32
    x = torch.randn(m, k)
    for density in (0.1, 0.5):
        mask = torch.rand(n // b, k // b) < density
        w = BlockSparseMatrix.from_dense(torch.randn(n, k), (b, b), mask=mask)
        wd = w.to_dense()
        bsr = wd.to_sparse_bsr((b, b))
        be = BACKENDS["cpu"]
        t_sk = _best(lambda: be.linear(x, w))
        t_dense = _best(lambda: torch.matmul(x, wd.T))
        t_bsr = _best(lambda: torch.matmul(bsr, x.T))
        print(f"density {density:.0%}: sparsekit {t_sk * 1e3:.1f} ms, dense {t_dense * 1e3:.1f} ms, "
              f"torch BSR {t_bsr * 1e3:.1f} ms; dense/sparsekit {t_dense / t_sk:.2f}x, BSR/sparsekit {t_bsr / t_sk:.2f}x")


if __name__ == "__main__":
    main()
