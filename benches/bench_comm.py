"""sparsekit.comm benchmarks, side by side with their baselines in one run (ratio = baseline / ours).

- planner: plan_buckets vs torch.distributed._compute_bucket_assignment_by_size, 10,000 fp32 params
  (from tensors, from (nbytes, key) pairs, from an int64 byte array), lists of buckets included,
  interleaved rounds, medians of 31;
- step: one training step of a ~50M-parameter MLP (16.8 MB weights, each its own bucket) on 2 gloo
  processes, and step_small (25M parameters in 1 MiB weights, fused into buckets): GradientSync vs DDP (same
  bucket size) vs a per-parameter all-reduce loop, interleaved rounds, medians;
- topk: TopKCompression(0.01) bytes per step vs dense and loss after the same steps (2 gloo processes).

Run: PYTHONPATH=$PWD/python .venv/bin/python benches/bench_comm.py [planner|step|step_small|topk ...]
"""

import multiprocessing as mp
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

from sparsekit.bench import _mlp  # the model `python -m sparsekit bench` times too
from sparsekit.comm import GradientSync, TopKCompression, plan_buckets


def planner() -> None:
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 50_000, (10_000,), generator=g).tolist()
    ts = [torch.empty(s) for s in sizes]
    specs = [(s * 4, "torch.float32@cpu") for s in sizes]
    arr = np.asarray(sizes, dtype=np.int64) * 4
    lim = [2**20, 25 * 2**20]
    cases = [
        lambda: dist._compute_bucket_assignment_by_size(ts, lim),
        lambda: plan_buckets(ts, ddp_compatible=True).buckets,
        lambda: plan_buckets(specs, ddp_compatible=True).buckets,
        lambda: plan_buckets(arr, ddp_compatible=True).buckets,
    ]
    # interleaved rounds (a shared machine's load drifts), medians of 31
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(31):
        for f, ts_ in zip(cases, times):
            t0 = time.perf_counter()
            f()
            ts_.append(time.perf_counter() - t0)
    t_torch, t_ours, t_specs, t_arr = (sorted(v)[len(v) // 2] for v in times)
    assert plan_buckets(arr, ddp_compatible=True).buckets == dist._compute_bucket_assignment_by_size(ts, lim)[0]
    print(f"planner 10k params: torch {t_torch * 1e3:.2f} ms | from tensors {t_ours * 1e3:.2f} ms "
          f"({t_torch / t_ours:.2f}x) | from pairs {t_specs * 1e3:.2f} ms ({t_torch / t_specs:.2f}x) | "
          f"from int64 array {t_arr * 1e3:.3f} ms ({t_torch / t_arr:.1f}x)")


def _step_worker(rank, world, path, q, rounds, width=2048, depth=12):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    x = torch.randn(8, width, generator=torch.Generator().manual_seed(rank))
    m_sync, m_ddp, m_loop = _mlp(width, depth), _mlp(width, depth), _mlp(width, depth)
    n_params = sum(p.numel() for p in m_sync.parameters())
    sync = GradientSync(m_sync, bucket_cap_mb=25)
    ddp = torch.nn.parallel.DistributedDataParallel(m_ddp, bucket_cap_mb=25)

    def step_sync():
        m_sync.zero_grad(set_to_none=False)
        m_sync(x).square().mean().backward()
        sync.finish()

    def step_ddp():
        ddp.zero_grad(set_to_none=False)
        ddp(x).square().mean().backward()

    def step_loop():
        m_loop.zero_grad(set_to_none=False)
        m_loop(x).square().mean().backward()
        for p in m_loop.parameters():
            dist.all_reduce(p.grad)
            p.grad.div_(world)

    cases = {"GradientSync": step_sync, "DDP": step_ddp, "per-param loop": step_loop}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for f in cases.values():  # warm-up (GradientSync and DDP rebuild their buckets here)
        f()
        f()
    for _ in range(rounds):
        for k, f in cases.items():
            dist.barrier()
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    dist.destroy_process_group()
    if rank == 0:
        q.put((n_params, {k: sorted(v)[len(v) // 2] for k, v in times.items()}))


def _spawn(target, world, *args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "pg")
        procs = [ctx.Process(target=target, args=(r, world, path, q, *args)) for r in range(world)]
        for p in procs:
            p.start()
        out = q.get(timeout=1800)
        for p in procs:
            p.join(timeout=60)
    return out


def step(rounds: int = 7, width: int = 2048, depth: int = 12) -> None:
    n, med = _spawn(_step_worker, 2, rounds, width, depth)
    s = med["GradientSync"]
    print(f"train step, {n / 1e6:.1f}M params ({depth} layers of {width}x{width}), 2 gloo ranks, bucket 25 MB "
          f"(median of {rounds}): GradientSync {s * 1e3:.0f} ms | DDP {med['DDP'] * 1e3:.0f} ms "
          f"({med['DDP'] / s:.2f}x) | per-param loop {med['per-param loop'] * 1e3:.0f} ms ({med['per-param loop'] / s:.2f}x)")


def step_small(rounds: int = 7) -> None:
    """The step with 1 MiB weights, which are fused into 25 MB buckets (the large ones travel alone)."""
    step(rounds, width=512, depth=96)


def _topk_worker(rank, world, path, q, steps):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    res = {}
    for name, comp in [("dense", None), ("topk", TopKCompression(0.01, warmup_steps=50))]:
        torch.manual_seed(0)
        teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
        torch.manual_seed(1)
        m = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.Tanh(), torch.nn.Linear(256, 1))
        sync = GradientSync(m, compression=comp)
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        for s in range(steps):
            if comp is not None and s == steps - 1:  # steady state: the last step's bytes
                b0, d0 = comp.bytes_sent, comp.bytes_dense
            xb = torch.randn(64, 32, generator=torch.Generator().manual_seed(1000 * s + rank))
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(xb), teacher(xb).detach()).backward()
            sync.finish()
            opt.step()
        xt = torch.randn(2048, 32, generator=torch.Generator().manual_seed(99))
        with torch.no_grad():
            res[name] = torch.nn.functional.mse_loss(m(xt), teacher(xt)).item()
        if comp is not None:
            res["bytes_ratio"] = (comp.bytes_sent - b0) / (comp.bytes_dense - d0)
        with torch.no_grad():
            res.setdefault("initial", torch.nn.functional.mse_loss(torch.zeros(2048, 1), teacher(xt)).item())
    dist.destroy_process_group()
    if rank == 0:
        q.put(res)


def topk(steps: int = 600) -> None:
    r = _spawn(_topk_worker, 2, steps)
    print(f"TopKCompression(0.01, warm-up 50), MLP 32-256-1, 2 gloo ranks, {steps} steps: bytes/step "
          f"{r['bytes_ratio'] * 100:.2f}% of dense (values + int32 indices, after warm-up); test loss dense "
          f"{r['dense']:.4f} vs top-k {r['topk']:.4f} (predicting zeros: {r['initial']:.4f})")


def main() -> None:
    cases = sys.argv[1:] or ["planner", "step", "step_small", "topk"]
    for c in cases:
        {"planner": planner, "step": step, "step_small": step_small, "topk": topk}[c]()


if __name__ == "__main__":
    main()
