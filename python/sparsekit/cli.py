"""The ``info`` and ``demo`` commands of ``python -m sparsekit``."""

from __future__ import annotations

import importlib.util
import platform
import time
from typing import Callable, TypeVar

import torch

from . import __version__, _core, get_num_threads
from .select import global_topk_masks, nm_mask, quantile


def cuda_status() -> str:
    """One line saying whether the CUDA path can run here, and if not, why."""
    if importlib.util.find_spec("cupy") is None:
        return "unavailable (cupy not installed: pip install 'sparsekit[cuda]')"
    if not torch.cuda.is_available():
        return "unavailable (cupy installed, but torch sees no CUDA device)"
    return f"available ({torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)})"


def info() -> int:
    print(f"sparsekit {__version__}")
    print(f"build profile: {_core.build_profile()}")
    print(f"threads: {get_num_threads()} (SPARSEKIT_NUM_THREADS or sparsekit.set_num_threads)")
    print(f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}")
    print(f"cuda: {cuda_status()}")
    return 0


R = TypeVar("R")


def _best_of(fn: Callable[[], R], repeats: int = 3) -> tuple[float, R]:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def demo(numel: int = 1 << 24, tensors: int = 32, density: float = 0.1) -> int:
    """Global magnitude pruning of a model-sized set of tensors, checked against torch and timed."""
    if numel < tensors or tensors < 1 or not 0.0 <= density <= 1.0:
        print("demo: need numel >= tensors >= 1 and density in [0, 1]")
        return 2
    gen = torch.Generator().manual_seed(0)
    sizes = [numel // tensors + (i < numel % tensors) for i in range(tensors)]  # exactly numel in total
    weights = [torch.randn(size, generator=gen) for size in sizes]
    total = sum(w.numel() for w in weights)
    k = int(density * total + 0.5)
    print(f"global magnitude top-k over {tensors} tensors, {total:,} float32 elements, keeping {k:,}")

    ours_s, masks = _best_of(lambda: global_topk_masks(weights, k=k))

    def torch_way() -> list[torch.Tensor]:
        flat = torch.cat([w.abs().reshape(-1) for w in weights])
        threshold = torch.topk(flat, k, sorted=False).values.min()
        return [w.abs() >= threshold for w in weights]

    torch_s, _ = _best_of(torch_way)
    kept = sum(int(m.sum()) for m in masks)
    flat = torch.cat([w.abs().reshape(-1) for w in weights])
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    reference = torch.zeros(total, dtype=torch.bool)
    reference[order] = True
    exact = torch.equal(torch.cat([m.reshape(-1) for m in masks]), reference)
    print(f"  sparsekit.global_topk_masks: {ours_s * 1e3:8.1f} ms   kept {kept:,} (exact, matches stable sort: {exact})")
    print(f"  torch cat + topk + compare:  {torch_s * 1e3:8.1f} ms   ({_speed(torch_s, ours_s)})")

    w = weights[0][: weights[0].numel() // 4 * 4].reshape(-1, 4)
    two_four = nm_mask(w, 2, 4)
    print(f"  2:4 mask of a {tuple(w.shape)} weight: every group keeps 2 -> {bool((two_four.sum(1) == 2).all())}")

    sample = flat[: 1 << 22]
    ours_q = float(quantile(sample, 0.9))
    torch_q = float(torch.quantile(sample, 0.9))
    print(f"  quantile(0.9) of {sample.numel():,} magnitudes: {ours_q:.6f} (torch.quantile: {torch_q:.6f}, equal: {ours_q == torch_q})")
    return 0 if exact and ours_q == torch_q else 1


def _speed(baseline_s: float, ours_s: float) -> str:
    """'sparsekit 3.1x faster' or 'sparsekit 0.5x as fast': the ratio says who is slower."""
    ratio = baseline_s / ours_s if ours_s > 0 else float("inf")
    return f"sparsekit {ratio:.1f}x faster" if ratio >= 1 else f"sparsekit {1 / ratio:.1f}x slower"
