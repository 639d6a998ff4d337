"""Benchmarks of DynamicSparsity against the torch way.

Run:  .venv/bin/python benches/bench_sparsity.py [--layers 50] [--dim 1414]
(or with pytest: .venv/bin/python -m pytest benches/bench_sparsity.py --benchmark-enable -p no:cacheprovider)

Model: ``layers`` Linear layers of ``dim x dim`` float32 (50 x 1414^2 = 100M parameters), CPU, density 0.1,
global distribution. Groups, ours and baseline in one run on the same data, median of ``rounds``:
  magnitude  one mask update (prune to the global top 10% of |w| among active weights) vs torch:
             cat(|w|) + kthvalue + per-layer compare (the rule of torch.ao.pruning's WeightNormSparsifier,
             made global), then masking the weights.
  rigl       one RigL update (drop 30% of the active by |w|, grow as many by |grad| among the rest,
             global) vs the same rule in torch: cat + topk for the drop, cat + topk for the grow; on fresh
             randn weights (restored after the magnitude group).
  rigl_pruned the same right after the magnitude group, on the weights it pruned (90% zero) under a new
             random mask: 90% of the active weights are exactly 0, so the drop threshold is a tie at 0.
             This is what earlier versions of this bench reported as "rigl" (it ran after magnitude).
  overhead   .step() between updates vs one plain SGD step (optimizer.step) of the same model; the
             optimizer pre-step hook (gradient masking) is reported separately.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytest
import torch
from torch import nn

from sparsekit.sparsity import Constant, DynamicSparsity

DENSITY = 0.1


def make(layers: int, dim: int):
    torch.manual_seed(0)
    ws = [nn.Parameter(torch.randn(dim, dim)) for _ in range(layers)]
    for w in ws:
        w.grad = torch.randn(dim, dim)
    return ws


def torch_magnitude(ws, masks, k):
    scores = torch.cat([torch.where(m, w.detach().abs(), -1.0).reshape(-1) for w, m in zip(ws, masks)])
    thr = torch.kthvalue(scores, scores.numel() - k + 1).values
    out = [w.detach().abs() >= thr for w in ws]
    with torch.no_grad():
        for w, m in zip(ws, out):
            w.mul_(m)
    return out


def torch_rigl(ws, masks, frac):
    sizes = [w.numel() for w in ws]
    active = torch.cat([m.reshape(-1) for m in masks])
    n = int(active.sum())
    keep = n - int(frac * n + 0.5)
    drop_scores = torch.cat([w.detach().abs().reshape(-1) for w in ws]).masked_fill_(~active, -1.0)
    kept = torch.zeros_like(active)
    kept[torch.topk(drop_scores, keep, sorted=False).indices] = True
    grow_scores = torch.cat([w.grad.abs().reshape(-1) for w in ws]).masked_fill_(kept, -1.0)
    grown = torch.zeros_like(active)
    grown[torch.topk(grow_scores, n - keep, sorted=False).indices] = True
    new = (kept | grown).split(sizes)
    out = [m.reshape(w.shape) for m, w in zip(new, ws)]
    with torch.no_grad():
        for w, m, old in zip(ws, out, masks):
            w.mul_(m)
            w.masked_fill_(m & ~old, 0)
    return out


def median_time(fn, rounds):
    fn()
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(layers=50, dim=1414, rounds=3):
    ws = make(layers, dim)
    named = {f"l{i}": w for i, w in enumerate(ws)}
    opt = torch.optim.SGD(ws, lr=0.0)
    fresh = [w.detach().clone() for w in ws]
    res = {}
    for method in ("magnitude", "rigl_pruned", "rigl"):
        if method == "rigl":  # fresh weights: the magnitude group pruned them in place
            with torch.no_grad():
                for w, w0 in zip(ws, fresh):
                    w.copy_(w0)
        sp = DynamicSparsity(named, opt, density=DENSITY, method=method.split("_")[0], distribution="global",
                             update_every=1, schedule=Constant(alpha=0.3, decay="constant"))
        ours = median_time(lambda: sp._update(1), rounds)
        masks = [sp.masks[f"l{i}"] for i in range(layers)]
        k = sum(int(m.sum()) for m in masks)
        if method == "magnitude":
            base = median_time(lambda: torch_magnitude(ws, masks, k), rounds)
        else:
            base = median_time(lambda: torch_rigl(ws, masks, 0.3), rounds)
        res[method] = (ours, base)
        print(f"{method:11s} ours {ours*1e3:9.1f} ms   torch {base*1e3:9.1f} ms   ratio {base/ours:5.1f}x", flush=True)
        sp.remove()
    sp = DynamicSparsity(named, None, density=DENSITY, method="rigl", distribution="global", update_every=10**9)
    sgd = torch.optim.SGD(ws, lr=1e-3, momentum=0.9)
    plain = median_time(sgd.step, rounds)
    step = median_time(sp.step, 101)
    hooks = median_time(sp._mask_grads, rounds)
    print(f"overhead   .step() {step*1e6:.1f} us vs SGD step {plain*1e3:.1f} ms: {100*step/plain:.4f}%;"
          f" optimizer pre-step hook (masking the gradients) {hooks*1e3:.1f} ms = {100*hooks/plain:.1f}% of the SGD step")
    return res


@pytest.mark.benchmark(group="sparsity")
def test_bench_sparsity(benchmark):
    benchmark.pedantic(lambda: main(layers=10, dim=1414, rounds=2), rounds=1, iterations=1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=50)
    ap.add_argument("--dim", type=int, default=1414)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    main(a.layers, a.dim, a.rounds)
