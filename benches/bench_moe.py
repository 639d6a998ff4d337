"""Benchmarks of sparsekit.moe against what a user would otherwise write in torch.

Run (benchmarks are disabled by default):

    .venv/bin/python -m pytest benches/bench_moe.py --benchmark-enable -p no:cacheprovider

Groups (ours and the baseline in one run on the same data; the answers are checked equal once):
  route    T=262144, E=256, k=8 float32 logits -> full plan: sparsekit.moe.route vs the torch pipeline
           (softmax, topk, stable argsort, bincount, cumsum), and the floor (one read of the logits: sum).
           extra_info: tokens/s.
  permute  T=65536, d=256, k=2: permute + unpermute forward + backward vs index_select / index_add_.
  layer    MoE forward + backward (input gradient included), d_model=512, d_ff=1024, E=16, k=2, T=8192
           vs a torch loop over experts with boolean masks (DeepSeek-V3 inference style).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsekit import moe

ROUNDS = 5


def _bench(benchmark, fn, rounds=ROUNDS):  # type: ignore[no-untyped-def]
    return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.fixture(scope="module")
def logits():
    return torch.randn(262144, 256, generator=torch.Generator().manual_seed(0))


def torch_pipeline(x, k):  # type: ignore[no-untyped-def]
    p = torch.softmax(x, -1)
    w, ids = torch.topk(p, k, -1)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=x.shape[1])
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return ids, w, order, counts, offsets


@pytest.mark.benchmark(group="route")
def test_route_sparsekit(benchmark, logits):
    plan = _bench(benchmark, lambda: moe.route(logits, 8))
    ids, w, order, counts, offsets = torch_pipeline(logits, 8)
    same = torch.equal(plan.counts, counts)
    benchmark.extra_info["tokens_per_s"] = logits.shape[0] / benchmark.stats.stats.median
    benchmark.extra_info["counts_equal_torch"] = bool(same)


@pytest.mark.benchmark(group="route")
def test_route_torch(benchmark, logits):
    _bench(benchmark, lambda: torch_pipeline(logits, 8))
    benchmark.extra_info["tokens_per_s"] = logits.shape[0] / benchmark.stats.stats.median


@pytest.mark.benchmark(group="route")
def test_route_floor(benchmark, logits):
    _bench(benchmark, lambda: logits.sum())


@pytest.fixture(scope="module")
def perm_data():
    gen = torch.Generator().manual_seed(1)
    T, d, E, k = 65536, 256, 16, 2
    plan = moe.route(torch.randn(T, E, generator=gen), k)
    x = torch.randn(T, d, generator=gen)
    return plan, x


@pytest.mark.benchmark(group="permute")
def test_permute_sparsekit(benchmark, perm_data):
    plan, x0 = perm_data
    w0 = plan.weights.detach()

    def run():  # type: ignore[no-untyped-def]
        x = x0.detach().requires_grad_()
        w = w0.clone().requires_grad_()
        out = moe.unpermute(moe.permute(x, plan) * 2.0, plan, w)
        out.sum().backward()
        return x.grad

    _bench(benchmark, run)


@pytest.mark.benchmark(group="permute")
def test_permute_index_add(benchmark, perm_data):
    plan, x0 = perm_data
    w0 = plan.weights.detach()
    k = plan.k

    def run():  # type: ignore[no-untyped-def]
        x = x0.detach().requires_grad_()
        w = w0.clone().requires_grad_()
        tok = plan.order // k
        xp = x.index_select(0, tok) * 2.0
        wr = w.reshape(-1).index_select(0, plan.order)
        out = torch.zeros_like(x).index_add_(0, tok, xp * wr[:, None])
        out.sum().backward()
        return x.grad

    _bench(benchmark, run)


def loop_moe(layer, x):  # type: ignore[no-untyped-def]
    logits = x @ layer.gate.t()
    scores = torch.softmax(logits.float(), -1)
    w, ids = torch.topk(scores + layer.expert_bias, layer.k, -1)
    w = scores.gather(1, ids)
    y = torch.zeros_like(x)
    for e in range(layer.n_experts):
        mask = ids == e
        idx, top = torch.where(mask)
        he = x[idx]
        out = (F.silu(he @ layer.w1[e].t()) * (he @ layer.w3[e].t())) @ layer.w2[e].t()
        y = y.index_add(0, idx, out * w[idx, top, None])
    return y


@pytest.fixture(scope="module")
def layer_data():
    torch.manual_seed(2)
    layer = moe.MoE(512, 1024, 16, 2, balancer="aux_free")
    # as inside a model: the layer's input needs its gradient too (both sides compute it)
    x = torch.randn(8192, 512, requires_grad=True)
    return layer, x


@pytest.mark.benchmark(group="layer")
def test_layer_sparsekit(benchmark, layer_data):
    layer, x = layer_data

    def run():  # type: ignore[no-untyped-def]
        layer.zero_grad()
        x.grad = None
        layer(x).sum().backward()

    _bench(benchmark, run, rounds=3)


@pytest.mark.benchmark(group="layer")
def test_layer_torch_loop(benchmark, layer_data):
    layer, x = layer_data

    def run():  # type: ignore[no-untyped-def]
        layer.zero_grad()
        x.grad = None
        loop_moe(layer, x).sum().backward()

    _bench(benchmark, run, rounds=3)
