"""x [4096, 2048] @ W^T, W 2048x2048 with 32x32 blocks (f32): sparsekit vs dense torch.matmul vs torch BSR.

Run: ``PYTHONPATH=$PWD/python python benches/bench_spmm.py [--threads N] [--rounds R]`` (prints a table; not
collected by pytest). Every round runs each variant once, interleaved, on the same data; the table gives
median times and the median of the per-round ratios (baseline time / ours). ``--threads 1`` sets both
torch and sparsekit to one thread: the check of the micro-kernel against torch's single-core GEMM.

Rows: forward at 10 % and 50 % block density (public ``sparsekit.ops.bsr_linear``: custom op, checks and
all) against ``torch.matmul(x, W_dense.T)`` and torch's BSR ``torch.matmul(W_bsr, x.T)``; forward +
backward of ``bsr_linear`` at 10 % (dX through the transpose metadata, dW by SDD at W's blocks) against
dense forward + backward; GFLOP/s on the stored blocks next to dense GFLOP/s (efficiency). Outputs come
from sparsekit's buffer cache (a training loop's steady state); one more row gives the forward with a fresh
output each call (faulted in page by page, as before the cache).

Half precision (``--half``, on by default; ``--cases`` picks rows): forward in float16 and bfloat16 at 10 %,
sparsekit's Rust half path (raw bits, float32 accumulation, one rounding) against torch's dense half
``matmul``, torch's BSR (CPU BSR has no half kernel, so: to float32, BSR matmul, back) and the previous
sparsekit path (convert x and W to float32, float32 kernel, round back), side by side.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import warnings

import torch

import sparsekit
from sparsekit import _buffers
from sparsekit.blocksparse import BlockSparseMatrix
from sparsekit.ops import bsr_linear


def _time(f: Callable[[], object]) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def _fresh_output(f: Callable[[], object]) -> object:
    """``f()`` with its output freshly allocated by torch (faulted in page by page), not from sparsekit's
    buffer cache: what every call paid before the cache."""
    with _buffers.bypassed():
        return f()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0, help="torch and sparsekit threads (0: defaults)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cases", default="f32,fb,half",
                    help="comma-separated rows: f32 (forward 10 %%/50 %%), fb (fwd+bwd 10 %%), half (f16/bf16 10 %%)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
    cases = set(args.cases.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)
        sparsekit.set_num_threads(args.threads)
    torch.manual_seed(0)
    m, n, k, b = 4096, 2048, 2048, 32
    x = torch.randn(m, k)
    g = torch.randn(m, n)
    print(f"threads: torch {torch.get_num_threads()}, sparsekit {sparsekit.get_num_threads()}; "
          f"{args.rounds} rounds, medians")
    if cases & {"f32", "fb"}:
        print("| case | sparsekit ms | dense ms | torch BSR ms | dense / sparsekit | BSR / sparsekit | "
              "GFLOP/s nonzero (sparsekit) | GFLOP/s dense | efficiency |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for density in (0.1, 0.5):
        if "f32" not in cases and not (density == 0.1 and "fb" in cases):
            continue
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
        if density == 0.1 and "f32" in cases:
            variants["sk_fresh"] = lambda: _fresh_output(lambda: bsr_linear(x, w))
        if density == 0.1 and "fb" in cases:
            xg = x.clone().requires_grad_(True)
            vg = w.values.clone().requires_grad_(True)
            wg = wd.clone().requires_grad_(True)
            variants["sk_fb"] = lambda: bsr_linear(xg, w, values=vg).backward(g)
            variants["dense_fb"] = lambda: torch.matmul(xg, wg.T).backward(g)
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
        if "sk_fresh" in times:
            eff0 = statistics.median((flops_nz / ts) / (2 * m * n * k / td)
                                     for ts, td in zip(times["sk_fresh"], times["dense"]))
            print(f"| forward, density {w.density:.0%}, fresh output (no buffer cache) | {med['sk_fresh'] * 1e3:.1f} | "
                  f"{med['dense'] * 1e3:.1f} | - | **{ratio('dense', 'sk_fresh'):.2f}x** | - | "
                  f"{flops_nz / med['sk_fresh'] / 1e9:.1f} | {gf_dense:.1f} | {eff0:.0%} (cache / fresh: "
                  f"{ratio('sk_fresh', 'sk'):.2f}x) |")
        if "sk_fb" in times:
            print(f"| fwd+bwd, density {w.density:.0%} | {med['sk_fb'] * 1e3:.1f} | {med['dense_fb'] * 1e3:.1f} | - | "
                  f"**{ratio('dense_fb', 'sk_fb'):.2f}x** | - | - | - | - |")

    if "half" in cases:
        half_rows(x, m, n, k, b, args.rounds)


def half_rows(x: torch.Tensor, m: int, n: int, k: int, b: int, rounds: int) -> None:
    """float16 / bfloat16 forward at 10 %: the Rust half path vs dense half GEMM, torch BSR, convert-then-f32."""
    mask = torch.rand(n // b, k // b) < 0.1
    w32 = BlockSparseMatrix.from_dense(torch.randn(n, k), (b, b), mask=mask)
    flops_nz = 2 * m * w32.nnz_blocks * b * b
    print()
    print("| case | sparsekit half ms | dense half ms | torch BSR (via f32) ms | convert + f32 kernel ms | "
          "dense / sparsekit | BSR / sparsekit | convert / sparsekit | GFLOP/s nonzero | efficiency vs dense half |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dtype in (torch.float16, torch.bfloat16):
        xh = x.to(dtype)
        wh = BlockSparseMatrix(w32.shape, w32.block, w32.row_offsets, w32.col_indices, w32.values.to(dtype))
        wdh = wh.to_dense()
        bsr = wdh.float().to_sparse_bsr((b, b))
        torch.testing.assert_close(bsr_linear(xh, wh).float(), (xh.float() @ wdh.float().T), rtol=2e-2, atol=2e-1)
        variants: Dict[str, Callable[[], object]] = {
            "sk": lambda: bsr_linear(xh, wh),
            "dense": lambda: torch.matmul(xh, wdh.T),
            "bsr": lambda: torch.matmul(bsr, xh.float().T).T.to(dtype),
            # what sparsekit did before the half kernels: float32 copies of x and W, float32 kernel, round back
            "convert": lambda: bsr_linear(xh.float(), BlockSparseMatrix(
                wh.shape, wh.block, wh.row_offsets, wh.col_indices, wh.values.float())).to(dtype),
        }
        times: Dict[str, List[float]] = {name: [] for name in variants}
        for f in variants.values():
            f()
        for _ in range(rounds):
            for name, f in variants.items():
                times[name].append(_time(f))

        def ratio(base: str) -> float:
            return statistics.median(tb / to for tb, to in zip(times[base], times["sk"]))

        med = {name: statistics.median(t) for name, t in times.items()}
        eff = statistics.median((flops_nz / ts) / (2 * m * n * k / td) for ts, td in zip(times["sk"], times["dense"]))
        name = str(dtype).replace("torch.", "")
        print(f"| forward {name}, density {wh.density:.0%} | {med['sk'] * 1e3:.1f} | {med['dense'] * 1e3:.1f} | "
              f"{med['bsr'] * 1e3:.1f} | {med['convert'] * 1e3:.1f} | **{ratio('dense'):.2f}x** | "
              f"**{ratio('bsr'):.2f}x** | **{ratio('convert'):.2f}x** | {flops_nz / med['sk'] / 1e9:.1f} | {eff:.0%} |")


if __name__ == "__main__":
    main()
