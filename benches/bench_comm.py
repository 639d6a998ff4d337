"""Planner benchmark: sparsekit.comm.plan_buckets vs torch.distributed._compute_bucket_assignment_by_size.

Run: PYTHONPATH=$PWD/python .venv/bin/python benches/bench_comm.py
"""

import time

import torch
import torch.distributed as dist

from sparsekit.comm import plan_buckets


def _median(f, rounds=7):
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def main() -> None:
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 50_000, (10_000,), generator=g).tolist()
    ts = [torch.empty(s) for s in sizes]
    specs = [(s * 4, "torch.float32@cpu") for s in sizes]
    lim = [2**20, 25 * 2**20]
    t_torch = _median(lambda: dist._compute_bucket_assignment_by_size(ts, lim))
    t_ours = _median(lambda: plan_buckets(ts, ddp_compatible=True))
    t_specs = _median(lambda: plan_buckets(specs, ddp_compatible=True))
    print(f"torch {t_torch*1e3:.2f} ms  ours(tensors) {t_ours*1e3:.2f} ms  ratio {t_torch/t_ours:.2f}x")
    import numpy as np

    arr = np.asarray(sizes, dtype=np.int64) * 4
    t_arr = _median(lambda: plan_buckets(arr, ddp_compatible=True))
    print(f"ours(int64 array) {t_arr*1e3:.3f} ms  ratio {t_torch/t_arr:.2f}x")
    print(f"ours(specs) {t_specs*1e3:.2f} ms  ratio {t_torch/t_specs:.2f}x")


if __name__ == "__main__":
    main()
