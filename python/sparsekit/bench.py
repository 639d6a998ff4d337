"""``python -m sparsekit bench``: each capability against the tool a user would otherwise pick, in one run.

Every case times sparsekit and its baseline on the same data in the same process (median of ``repeats``
runs after one warm-up), checks that both give the same answer, and reports the ratio baseline / sparsekit
(> 1: sparsekit is faster). The full benchmark suites, with more shapes and statistics, live in
``benches/`` of the repository (pytest-benchmark and ``cargo bench``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from . import __version__, get_num_threads


@dataclass
class Case:
    """One benchmark: what is measured, against what, and the medians."""

    capability: str
    name: str
    baseline: str
    ours_ms: float
    baseline_ms: float
    agree: bool

    @property
    def ratio(self) -> float:
        return self.baseline_ms / self.ours_ms if self.ours_ms > 0 else float("inf")


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (allocations, lazy compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _kept(masks: list[torch.Tensor]) -> int:
    return sum(int(m.sum()) for m in masks)


def _case(capability: str, name: str, baseline: str, ours: Callable[[], object], theirs: Callable[[], object],
          agree: Callable[[Any, Any], bool], repeats: int) -> Case:
    ok = bool(agree(ours(), theirs()))
    return Case(capability, name, baseline, _median_ms(ours, repeats), _median_ms(theirs, repeats), ok)


# ---------------------------------------------------------------------------------------------------------
# Cases, one function per capability; each takes the size scale (1.0 full, small for --quick)


def select_cases(scale: float, repeats: int) -> list[Case]:
    from .select import global_topk_masks, quantile

    gen = torch.Generator().manual_seed(0)
    n = max(1 << 12, int((1 << 24) * scale))
    tensors = [torch.randn(n // 32, generator=gen) for _ in range(32)]
    k = n // 10

    def torch_global() -> list[torch.Tensor]:
        flat = torch.cat([t.abs().reshape(-1) for t in tensors])
        idx = torch.topk(flat, k, sorted=False).indices
        mask = torch.zeros(flat.numel(), dtype=torch.bool)
        mask[idx] = True
        return list(mask.split([t.numel() for t in tensors]))

    def same_count(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return _kept(a) == _kept(b) == k

    x = torch.cat(tensors)
    return [
        _case("select", f"global top-10% of 32 tensors, {n:,} floats", "torch cat + topk",
              lambda: global_topk_masks(tensors, k=k), torch_global, same_count, repeats),
        _case("select", f"quantile 0.9 of {n:,} floats", "torch.quantile",
              lambda: quantile(x, 0.9), lambda: torch.quantile(x, 0.9), lambda a, b: bool(torch.equal(a, b)), repeats),  # type: ignore[arg-type]
    ]


def sparsity_cases(scale: float, repeats: int) -> list[Case]:
    from .sparsity import DynamicSparsity

    gen = torch.Generator().manual_seed(1)
    side = max(64, int(2048 * scale**0.5)) // 8 * 8
    layers = [torch.nn.Linear(side, side, bias=False) for _ in range(8)]
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.randn(side, side, generator=gen))
    model = torch.nn.Sequential(*layers)
    weights = [layer.weight.detach().clone() for layer in layers]
    n = sum(w.numel() for w in weights)
    k = int(0.1 * n + 0.5)

    def ours() -> list[torch.Tensor]:
        with torch.no_grad():
            for layer, w in zip(layers, weights):
                layer.weight.copy_(w)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # fresh: the controller hooks into its optimizer
        ds = DynamicSparsity(model, optimizer, density=0.1, method="magnitude", distribution="global")
        return list(ds.masks.values())

    def torch_way() -> list[torch.Tensor]:
        flat = torch.cat([w.abs().reshape(-1) for w in weights])
        threshold = torch.kthvalue(flat, n - k + 1).values
        return [w.abs() >= threshold for w in weights]

    def same_count(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return _kept(a) == k == _kept(b)

    return [_case("sparsity", f"global magnitude masks, 8 Linear, {n:,} weights, density 0.1", "torch cat + kthvalue",
                  ours, torch_way, same_count, repeats)]


def moe_cases(scale: float, repeats: int) -> list[Case]:
    from .moe import route

    gen = torch.Generator().manual_seed(2)
    tokens = max(1024, int(262144 * scale))
    logits = torch.randn(tokens, 256, generator=gen)

    def torch_pipeline() -> tuple[torch.Tensor, ...]:
        p = torch.softmax(logits, -1)
        weights, ids = torch.topk(p, 8, -1)
        order = torch.argsort(ids.reshape(-1), stable=True)
        counts = torch.bincount(ids.reshape(-1), minlength=256)
        return ids, weights, order, counts, torch.cumsum(counts, 0)

    def agree(plan: object, ref: object) -> bool:
        # the tokens of each expert, in order (torch.topk does not order equal scores by expert index, so
        # the slot numbers within a token may differ where two of its experts tie; the grouping may not)
        return bool(torch.equal(plan.order // 8, ref[2] // 8) and torch.equal(plan.counts, ref[3]))  # type: ignore[attr-defined,index]

    return [_case("moe", f"routing plan, {tokens:,} tokens, 256 experts, top-8", "torch softmax/topk/argsort/bincount",
                  lambda: route(logits, 8), torch_pipeline, agree, repeats)]


def comm_cases(scale: float, repeats: int) -> list[Case]:
    import torch.distributed as dist

    from .comm import plan_buckets

    gen = torch.Generator().manual_seed(3)
    count = max(100, int(10_000 * scale))
    sizes = torch.randint(1, 20_000, (count,), generator=gen).tolist()
    tensors = [torch.empty(n, dtype=torch.float32 if i % 5 else torch.float16) for i, n in enumerate(sizes)]
    limits = [1 << 20, 25 << 20]

    def theirs() -> list[list[int]]:
        return dist._compute_bucket_assignment_by_size(tensors, limits)[0]  # type: ignore[attr-defined]

    def ours() -> list[list[int]]:
        return [list(b) for b in plan_buckets(tensors, bucket_cap_mb=25, first_bucket_mb=1, ddp_compatible=True).buckets]

    def agree(a: object, b: object) -> bool:
        return sorted(map(tuple, a)) == sorted(map(tuple, b))  # type: ignore[call-overload,arg-type]

    return [_case("comm", f"bucket plan of {count:,} parameters", "torch _compute_bucket_assignment_by_size",
                  ours, theirs, agree, repeats), _step_case(scale, repeats)]


def _mlp(width: int, depth: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[m for _ in range(depth) for m in (torch.nn.Linear(width, width), torch.nn.ReLU())])


def _step_worker(rank: int, path: str, queue: Any, width: int, depth: int, repeats: int) -> None:
    """One of two gloo ranks: a training step (forward, backward, gradient averaging) with GradientSync and
    with DDP on the same model and data, interleaved; rank 0 reports the medians and whether the averaged
    gradients agree."""
    import torch.distributed as dist

    from .comm import GradientSync

    torch.set_num_threads(1)  # two ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        x = torch.randn(8, width, generator=torch.Generator().manual_seed(rank))
        m_sync, m_ddp = _mlp(width, depth), _mlp(width, depth)
        sync = GradientSync(m_sync, bucket_cap_mb=25)
        ddp = torch.nn.parallel.DistributedDataParallel(m_ddp, bucket_cap_mb=25)

        def step_sync() -> None:
            m_sync.zero_grad(set_to_none=False)
            m_sync(x).square().mean().backward()
            sync.finish()

        def step_ddp() -> None:
            ddp.zero_grad(set_to_none=False)
            ddp(x).square().mean().backward()

        for f in (step_sync, step_ddp, step_sync, step_ddp):  # warm-up; both rebuild their buckets once
            f()
        agree = all(torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)  # type: ignore[arg-type]
                    for a, b in zip(m_sync.parameters(), m_ddp.parameters()))
        times: dict[str, list[float]] = {"sync": [], "ddp": []}
        for _ in range(repeats):
            for name, f in (("sync", step_sync), ("ddp", step_ddp)):
                dist.barrier()
                start = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - start)
        if rank == 0:
            n = sum(p.numel() for p in m_sync.parameters())
            queue.put((n, statistics.median(times["sync"]) * 1e3, statistics.median(times["ddp"]) * 1e3, agree))
    finally:
        dist.destroy_process_group()


def _step_case(scale: float, repeats: int) -> Case:
    """GradientSync against DDP on 2 gloo processes (spawned: each its own interpreter)."""
    import multiprocessing as mp
    import tempfile

    width, depth = (1024, 24) if scale >= 1 else (128, 4)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_step_worker, args=(r, os.path.join(d, "pg"), queue, width, depth, repeats))
                 for r in range(2)]
        for p in procs:
            p.start()
        try:
            n, ours, theirs, agree = queue.get(timeout=600)
        finally:
            for p in procs:
                p.join(timeout=60)
                if p.is_alive():
                    p.kill()
    return Case("comm", f"train step, {n / 1e6:.1f}M params in {depth} Linear {width}x{width}, 2 gloo ranks, bucket 25 MB",
                "torch DDP", ours, theirs, bool(agree))


def blocksparse_cases(scale: float, repeats: int) -> list[Case]:
    from .blocksparse import BlockSparseMatrix
    from .ops import bsr_linear

    gen = torch.Generator().manual_seed(4)
    m, n = (4096, 2048) if scale >= 1 else (256, 512)
    x = torch.randn(m, n, generator=gen)
    w = BlockSparseMatrix.from_dense(torch.randn(n, n, generator=gen), (32, 32),
                                     mask=torch.rand(n // 32, n // 32, generator=gen) < 0.1)
    dense = w.to_dense()

    def agree(a: object, b: object) -> bool:
        return bool(torch.allclose(a, b, rtol=1e-3, atol=1e-3))  # type: ignore[arg-type]

    return [_case("blocksparse", f"bsr_linear, x {m}x{n}, W {n}x{n}, 32x32 blocks, density {w.density:.0%}",
                  "dense torch.matmul", lambda: bsr_linear(x, w), lambda: x @ dense.T, agree, repeats)]


CAPABILITIES: dict[str, Callable[[float, int], list[Case]]] = {
    "select": select_cases, "sparsity": sparsity_cases, "moe": moe_cases, "comm": comm_cases,
    "blocksparse": blocksparse_cases,
}


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "sparsekit_threads": get_num_threads(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "sparsekit": __version__,
    }


def run(quick: bool = False, as_json: bool = False, only: list[str] | None = None) -> int:
    """Run every case (or those of ``only``) and print the table (or JSON)."""
    scale, repeats = (1 / 64, 3) if quick else (1.0, 5)
    names = only or list(CAPABILITIES)
    unknown = [n for n in names if n not in CAPABILITIES]
    if unknown:
        print(f"bench: unknown capability {unknown[0]!r}; choose from {', '.join(CAPABILITIES)}")
        return 2
    cases = [case for n in names for case in CAPABILITIES[n](scale, repeats)]
    info = machine()
    if as_json:
        print(json.dumps({"machine": info, "repeats": repeats, "cases": [dict(asdict(c), ratio=c.ratio) for c in cases]}, indent=1))
    else:
        print(", ".join(f"{k}: {v}" for k, v in info.items()))
        print(format_table(cases))
    return 0 if all(c.agree for c in cases) else 1


def format_table(cases: list[Case]) -> str:
    """Markdown table of the cases (benches/readme_table.py writes the README's from the JSON output)."""
    rows = ["| capability | case | baseline | sparsekit ms | baseline ms | speed-up | same answer |", "|---|---|---|---:|---:|---:|---|"]
    for c in cases:
        rows.append(f"| {c.capability} | {c.name} | {c.baseline} | {c.ours_ms:.2f} | {c.baseline_ms:.2f} | {c.ratio:.2f}x | {'yes' if c.agree else 'NO'} |")
    return "\n".join(rows)
