"""x [4096, 2048] @ W^T, W 2048x2048 with 32x32 blocks (f32): sparsekit vs dense torch.matmul vs torch BSR.

Run: ``PYTHONPATH=$PWD/python python benches/bench_spmm.py [--threads N] [--rounds R]`` (prints a table; not
collected by pytest). Every round runs each variant once, interleaved, on the same data; the table gives
median times and the median of the per-round ratios (baseline time / ours). ``--threads 1`` sets both
torch and sparsekit to one thread: the check of the micro-kernel against torch's single-core GEMM.

Rows: forward at 10 % and 50 % block density (public ``sparsekit.ops.bsr_linear``: custom op, checks and
all) against ``torch.matmul(x, W_dense.T)`` and torch's BSR ``torch.matmul(W_bsr, x.T)``; forward +
backward of ``bsr_linear`` at 10 % (dX through the transpose metadata, dW by SDD at W's blocks) against
dense forward + backward; forward in bfloat16 at 10 % against torch's bfloat16 ``matmul``; GFLOP/s on the
stored blocks next to dense GFLOP/s (efficiency).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch

import sparsekit
from sparsekit.blocksparse import BlockSparseMatrix
from sparsekit.ops import bsr_linear


def _time(f: Callable[[], object]) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0, help="torch and sparsekit threads (0: defaults)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        sparsekit.set_num_threads(args.threads)
    torch.manual_seed(0)
    m, n, k, b = 4096, 2048, 2048, 32
    x = torch.randn(m, k)
    g = torch.randn(m, n)
    print(f"threads: torch {torch.get_num_threads()}, sparsekit {sparsekit.get_num_threads()}; "
          f"{args.rounds} rounds, medians")
    print("| case | sparsekit ms | dense ms | torch BSR ms | dense / sparsekit | BSR / sparsekit | "
          "GFLOP/s nonzero (sparsekit) | GFLOP/s dense | efficiency |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for density in (0.1, 0.5):
        mask = torch.rand(n // b, k // b) < density
        w = BlockSparseMatrix.from_dense(torch.randn(n, k), (b, b), mask=mask)
        wd = w.to_dense()
        bsr = wd.to_sparse_bsr((b, b))
        torch.testing.assert_close(bsr_linear(x, w), x @ wd.T, rtol=1e-3, atol=1e-3)
        variants: Dict[str, Callable[[], object]] = {
            "sk": lambda: bsr_linear(x, w),
            "dense": lambda: torch.matmul(x, wd.T),
            "bsr": lambda: torch.matmul(bsr, x.T),
        }
        if density == 0.1:
            xg = x.clone().requires_grad_(True)
            vg = w.values.clone().requires_grad_(True)
            wg = wd.clone().requires_grad_(True)
            variants["sk_fb"] = lambda: bsr_linear(xg, w, values=vg).backward(g)
            variants["dense_fb"] = lambda: torch.matmul(xg, wg.T).backward(g)
            # bfloat16 in and out (sparsekit: float32 kernels, accumulation in float32) vs torch's bf16 GEMM
            xh, wdh = x.bfloat16(), wd.bfloat16()
            wh = BlockSparseMatrix(w.shape, w.block, w.row_offsets, w.col_indices, w.values.bfloat16())
            variants["sk_bf16"] = lambda: bsr_linear(xh, wh)
            variants["dense_bf16"] = lambda: torch.matmul(xh, wdh.T)
        times: Dict[str, List[float]] = {name: [] for name in variants}
        for f in variants.values():
            f()  # warm-up
        for _ in range(args.rounds):
            for name, f in variants.items():
                times[name].append(_time(f))

        def ratio(base: str, ours: str) -> float:
            return statistics.median(tb / to for tb, to in zip(times[base], times[ours]))

        med = {name: statistics.median(t) for name, t in times.items()}
        flops_nz = 2 * m * w.nnz_blocks * b * b
        gf_sk, gf_dense = flops_nz / med["sk"] / 1e9, 2 * m * n * k / med["dense"] / 1e9
        eff = statistics.median((flops_nz / ts) / (2 * m * n * k / td) for ts, td in zip(times["sk"], times["dense"]))
        print(f"| forward, density {w.density:.0%} | {med['sk'] * 1e3:.1f} | {med['dense'] * 1e3:.1f} | "
              f"{med['bsr'] * 1e3:.1f} | **{ratio('dense', 'sk'):.2f}x** | **{ratio('bsr', 'sk'):.2f}x** | "
              f"{gf_sk:.1f} | {gf_dense:.1f} | {eff:.0%} |")
        if "sk_fb" in times:
            print(f"| fwd+bwd, density {w.density:.0%} | {med['sk_fb'] * 1e3:.1f} | {med['dense_fb'] * 1e3:.1f} | - | "
                  f"**{ratio('dense_fb', 'sk_fb'):.2f}x** | - | - | - | - |")
            print(f"| forward bf16, density {w.density:.0%} | {med['sk_bf16'] * 1e3:.1f} | {med['dense_bf16'] * 1e3:.1f} | - | "
                  f"**{ratio('dense_bf16', 'sk_bf16'):.2f}x** | - | - | - | - |")


if __name__ == "__main__":
    main()
