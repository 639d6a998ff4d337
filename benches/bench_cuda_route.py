"""GPU benchmarks of the MoE routing kernels (``sparsekit._cuda_route``) against the torch pipeline a user
would write on CUDA tensors, side by side in one run on the same data. Needs a CUDA device and cupy
(marked ``gpu``, which the project's addopts deselect, so select it):

    .venv/bin/python -m pytest benches/bench_cuda_route.py --benchmark-enable -m gpu -p no:cacheprovider

Every timed call ends with ``torch.cuda.synchronize()``. Outside the timing each baseline's answer is
checked against ours once: top-k by the chosen values (torch.topk does not promise which of equal scores
it returns), tables exactly.

Groups (T = 262144 tokens, E = 256 experts, k = 8, fixed-seed standard-normal logits):
  route_topk         sparsekit route_topk vs torch.topk(choice, k); floor: one read of choice (sum).
  route_tables       dropless: vs torch.argsort(stable) + bincount + cumsum + inverse scatter;
                     floor: one read of expert_ids.
  route_tables_cap   capacity ceil(T*k/E * 1.0), drop by position: vs the torch version (stable argsort,
                     rank inside the expert, a second stable argsort of kept-or-dropped buckets).

``SPARSEKIT_BENCH_SIM=1`` runs the same file on the CPU shim at T = 2048 (a check of this file, not a
timing: ``-m gpu`` still needed).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from sparsekit import _cuda_route as cr

SIM = os.environ.get("SPARSEKIT_BENCH_SIM") == "1"


def _have_gpu() -> bool:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (SIM or _have_gpu()), reason="needs a CUDA device and cupy")]

T, E, K = (2048 if SIM else 262144), 256, 8
CAPACITY = math.ceil(T * K / E * 1.0)
SIZE = f"T={T}, E={E}, k={K}"
BACKEND = cr.sim_backend() if SIM else None
DEVICE = "cpu" if SIM else "cuda"


def sync() -> None:
    if not SIM:
        torch.cuda.synchronize()


def timed(fn):
    def call():
        out = fn()
        sync()
        return out

    return call


def run(benchmark, fn, *, op: str, role: str, impl: str, rounds: int = 11):
    benchmark.extra_info.update(op=op, size=SIZE, role=role, impl=impl)
    return benchmark.pedantic(timed(fn), rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.fixture(scope="module")
def choice() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(T, E, generator=gen).to(DEVICE)


@pytest.fixture(scope="module")
def ids(choice) -> torch.Tensor:
    return cr.route_topk(choice, K, backend=BACKEND)[0]


# ------------------------------------------------------------------------------------------ top-k
@pytest.mark.benchmark(group="route_topk")
def test_topk_sparsekit(benchmark, choice):
    out, nan_count = run(benchmark, lambda: cr.route_topk(choice, K, backend=BACKEND), op="route_topk", role="ours",
                         impl="sparsekit route_topk")  # fmt: skip
    assert out.shape == (T, K) and int(nan_count) == 0


@pytest.mark.benchmark(group="route_topk")
def test_topk_torch(benchmark, choice, ids):
    out = run(benchmark, lambda: torch.topk(choice, K, dim=1), op="route_topk", role="baseline", impl="torch.topk")
    assert torch.equal(out.values, torch.gather(choice, 1, ids))


@pytest.mark.benchmark(group="route_topk")
def test_topk_floor(benchmark, choice):
    run(benchmark, lambda: choice.sum(), op="route_topk", role="floor", impl="floor: choice.sum()")


# ------------------------------------------------------------------------------------- dropless tables
def torch_tables(ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return order, inverse, counts, offsets


@pytest.mark.benchmark(group="route_tables")
def test_tables_sparsekit(benchmark, ids):
    run(benchmark, lambda: cr.route_tables(ids, E, backend=BACKEND), op="route_tables", role="ours",
        impl="sparsekit route_tables")  # fmt: skip


@pytest.mark.benchmark(group="route_tables")
def test_tables_torch(benchmark, ids):
    out = run(benchmark, lambda: torch_tables(ids), op="route_tables", role="baseline",
              impl="torch: argsort(stable) + bincount + cumsum + scatter")  # fmt: skip
    ours = cr.route_tables(ids, E, backend=BACKEND)
    assert all(torch.equal(a, b) for a, b in zip(ours[:4], out))


@pytest.mark.benchmark(group="route_tables")
def test_tables_floor(benchmark, ids):
    run(benchmark, lambda: ids.sum(), op="route_tables", role="floor", impl="floor: expert_ids.sum()")


# ------------------------------------------------------------------------------ tables with capacity
def torch_tables_position(ids: torch.Tensor, capacity: int) -> tuple[torch.Tensor, ...]:
    flat = ids.reshape(-1)
    by_expert = torch.argsort(flat, stable=True)
    counts_all = torch.bincount(flat, minlength=E)
    starts = torch.cumsum(counts_all, 0) - counts_all
    rank = torch.empty_like(flat)
    rank[by_expert] = torch.arange(flat.numel(), device=flat.device) - starts[flat[by_expert]]
    kept = rank < capacity
    order = torch.argsort(torch.where(kept, flat, E), stable=True)
    counts = torch.clamp(counts_all, max=capacity)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return order, counts, offsets, kept.view(ids.shape)


@pytest.mark.benchmark(group="route_tables_cap")
def test_tables_cap_sparsekit(benchmark, ids):
    run(benchmark, lambda: cr.route_tables(ids, E, CAPACITY, "position", backend=BACKEND), op="route_tables_cap",
        role="ours", impl="sparsekit route_tables (position)")  # fmt: skip


@pytest.mark.benchmark(group="route_tables_cap")
def test_tables_cap_torch(benchmark, ids):
    out = run(benchmark, lambda: torch_tables_position(ids, CAPACITY), op="route_tables_cap", role="baseline",
              impl="torch: 2 stable argsorts + bincount + rank")  # fmt: skip
    ours = cr.route_tables(ids, E, CAPACITY, "position", backend=BACKEND)
    assert all(torch.equal(a, b) for a, b in zip((ours.order, ours.counts, ours.offsets, ours.kept), out))
