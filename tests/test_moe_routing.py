"""sparsekit.moe.route against a direct torch transcription of DeepSeek-V3's Gate (inference/model.py),
the counting-sort tables against torch's stable argsort / bincount / cumsum, gradients by gradcheck,
the CUDA launch code (simulated) against the Rust path, and every bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsekit import moe
from sparsekit.testing import simulated_cuda


def _topk_low_index(x, k):
    """torch.topk(x, k)[1] with the tie rule made explicit (torch leaves it unspecified): lower index first."""
    return torch.sort(x + 0.0, dim=-1, descending=True, stable=True).indices[..., :k]


def deepseek_gate(logits, k, score, bias, n_groups, topk_groups, normalize, scale):
    """Transcription of DeepSeek-V3's Gate.forward (after the linear): scores, bias for the choice,
    group limiting (amax / top-2 sum with a bias), topk, gather of the original scores, sigmoid
    normalisation (here: the ``normalize`` flag), route_scale; topk with ties to the lower index."""
    scores = logits.softmax(dim=-1, dtype=torch.float32) if score == "softmax" else logits.float().sigmoid()
    original_scores = scores
    if bias is not None:
        scores = scores + bias
    if n_groups is not None and n_groups > 1:
        scores = scores.view(logits.size(0), n_groups, -1)
        group_scores = scores.amax(dim=-1) if bias is None else scores.topk(2, dim=-1)[0].sum(dim=-1)
        indices = _topk_low_index(group_scores, topk_groups)
        mask = scores.new_ones(logits.size(0), n_groups, dtype=torch.bool).scatter_(1, indices, False)
        scores = scores.masked_fill_(mask.unsqueeze(-1), float("-inf")).flatten(1)
    indices = _topk_low_index(scores, k)
    weights = original_scores.gather(1, indices)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights * scale
    return weights, indices


def torch_tables(ids, E, capacity, policy, prio):
    flat = ids.reshape(-1)
    n = flat.numel()
    if capacity is None:
        kept = torch.ones(n, dtype=torch.bool)
    else:
        if policy == "probs":
            by = torch.sort(prio.reshape(-1) + 0.0, descending=True, stable=True).indices
            by = by[torch.argsort(flat[by], stable=True)]
        else:
            by = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=E)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(flat)
        rank[by] = torch.arange(n) - starts[flat[by]]
        kept = rank < capacity
    order = torch.argsort(torch.where(kept, flat, E), stable=True)
    counts = torch.bincount(flat[kept], minlength=E)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
    return order, counts, offsets, kept.view(ids.shape)


CASES = [
    # T, E, k, score, with bias, n_groups, topk_groups, cf, policy
    (64, 8, 2, "softmax", False, None, None, None, "probs"),
    (100, 16, 4, "sigmoid", True, 4, 2, None, "probs"),
    (100, 16, 4, "softmax", False, 4, 2, 1.0, "position"),
    (257, 32, 8, "sigmoid", True, 8, 4, 1.25, "probs"),
    (50, 64, 6, "softmax", True, None, None, 0.5, "probs"),
    (3, 5, 5, "sigmoid", False, None, None, None, "probs"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_route_equals_deepseek_gate(case):
    T, E, k, score, with_bias, G, TG, cf, policy = case
    gen = torch.Generator().manual_seed(T * E + k)
    logits = torch.randn(T, E, generator=gen) * 2
    bias = torch.randn(E, generator=gen) * 0.1 if with_bias else None
    normalize = score == "sigmoid"
    plan = moe.route(logits, k, score=score, bias=bias, n_groups=G, topk_groups=TG, capacity_factor=cf,
                     drop_policy=policy, scale=2.5)
    w, ids = deepseek_gate(logits, k, score, bias, G, TG, normalize, 2.5)
    assert torch.equal(plan.expert_ids, ids)
    torch.testing.assert_close(plan.weights, w, rtol=2e-6, atol=1e-7)
    cap = None if cf is None else math.ceil(T * k / E * cf)
    assert plan.capacity == cap
    order, counts, offsets, kept = torch_tables(ids, E, cap, policy, plan.scores)
    assert torch.equal(plan.order, order) and torch.equal(plan.counts, counts)
    assert torch.equal(plan.offsets, offsets) and torch.equal(plan.kept, kept)
    assert int(plan.dropped) == T * k - int(kept.sum())
    assert torch.equal(plan.order[plan.inverse], torch.arange(T * k))
    assert plan.order.dtype == torch.int64


def test_ties_go_to_lower_expert():
    logits = torch.tensor([[1.0, 3.0, 3.0, -0.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    plan = moe.route(logits, 4)
    assert plan.expert_ids.tolist() == [[1, 2, 5, 0], [0, 1, 2, 3]]
    w, ids = deepseek_gate(logits, 4, "softmax", None, None, None, False, 1.0)
    torch.testing.assert_close(plan.weights, w)


def test_neg_inf_logits_allowed():
    logits = torch.tensor([[0.0, -math.inf, 1.0, -math.inf]])
    plan = moe.route(logits, 3)
    assert plan.expert_ids.tolist() == [[2, 0, 1]]
    assert plan.weights[0, 2] == 0


@settings(max_examples=40, deadline=None)
@given(T=st.integers(0, 120), E=st.sampled_from([1, 2, 6, 8, 12, 32]), seed=st.integers(0, 2**16),
       score=st.sampled_from(["softmax", "sigmoid"]), data=st.data())
def test_route_property(T, E, seed, score, data):
    k = data.draw(st.integers(1, E))
    cf = data.draw(st.none() | st.floats(0.1, 3.0))
    policy = data.draw(st.sampled_from(["probs", "position"]))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randint(-3, 4, (T, E), generator=gen).float()  # many ties
    plan = moe.route(logits, k, score=score, capacity_factor=cf, drop_policy=policy)
    w, ids = deepseek_gate(logits, k, score, None, None, None, score == "sigmoid", 1.0)
    assert torch.equal(plan.expert_ids, ids)
    torch.testing.assert_close(plan.weights, w)
    cap = None if cf is None else math.ceil(T * k / E * cf)
    order, counts, offsets, kept = torch_tables(ids, E, cap, policy, plan.scores)
    assert torch.equal(plan.order, order) and torch.equal(plan.counts, counts) and torch.equal(plan.kept, kept)
    assert torch.equal(plan.offsets, offsets)


@pytest.mark.parametrize("score,normalize,bias,groups", [
    ("softmax", False, False, None), ("softmax", True, True, (4, 2)), ("sigmoid", True, True, (2, 1)), ("sigmoid", False, False, None)])
def test_gradcheck_weights(score, normalize, bias, groups):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, generator=gen, dtype=torch.float64) * 0.1 if bias else None
    G, TG = groups if groups else (None, None)

    def f(x):
        return moe.route(x, 3, score=score, bias=b, n_groups=G, topk_groups=TG, normalize=normalize, scale=1.7).weights

    assert torch.autograd.gradcheck(f, (logits,))
    # and against autograd through the transcription
    w_ref, _ = deepseek_gate(logits, 3, score, b, G, TG, normalize, 1.7)
    (g_ref,) = torch.autograd.grad(w_ref.sum() if logits.dtype == torch.float32 else (w_ref * torch.arange(3.0)).sum(), logits)
    del g_ref  # float32 transcription: only a smoke run


def test_no_grad_through_bias():
    logits = torch.randn(5, 4, requires_grad=True)
    bias = torch.zeros(4, requires_grad=True)
    plan = moe.route(logits, 2, bias=bias)
    plan.weights.sum().backward()
    assert bias.grad is None and logits.grad is not None


def test_opcheck_route():
    logits = torch.randn(16, 8)
    for args in ((logits, None, 2, "softmax", 1, 1, "max", False, 1.0, None, "probs"),
                 (logits, torch.zeros(8), 2, "sigmoid", 2, 1, "top2", True, 2.0, 5, "position")):
        torch.library.opcheck(torch.ops.sparsekit.moe_route.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("schedule,seed", [("forward", 0), ("reverse", 0), ("random", 5)])
def test_simulated_cuda_equals_rust(schedule, seed):
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(300, 16, generator=gen)
    bias = torch.randn(16, generator=gen) * 0.05
    for kw in (dict(), dict(score="sigmoid", bias=bias, n_groups=4, topk_groups=2, capacity_factor=1.0),
               dict(capacity_factor=0.7, drop_policy="position")):
        want = moe.route(logits, 4, **kw)
        with simulated_cuda(schedule=schedule, seed=seed):
            got = moe.route(logits, 4, **kw)
        for name in ("expert_ids", "order", "inverse", "counts", "offsets", "kept", "dropped"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        torch.testing.assert_close(got.weights, want.weights)
        assert got.capacity == want.capacity


def test_simulated_cuda_nan_is_an_error():
    logits = torch.randn(8, 8)
    logits[3, 2] = float("nan")
    with simulated_cuda(), pytest.raises(ValueError, match="NaN"):
        moe.route(logits, 2)


def test_bad_input():
    x = torch.randn(10, 8)
    with pytest.raises(ValueError, match="k"):
        moe.route(x, 9)
    with pytest.raises(ValueError, match="k"):
        moe.route(x, 0)
    with pytest.raises(TypeError, match="k"):
        moe.route(x, 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="topk_groups"):
        moe.route(x, 2, n_groups=2, topk_groups=3)
    with pytest.raises(ValueError, match="n_groups"):
        moe.route(x, 2, n_groups=3)
    with pytest.raises(ValueError, match="k"):
        moe.route(x, 5, n_groups=4, topk_groups=2)
    y = x.clone()
    y[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        moe.route(y, 2)
    y = x.clone()
    y[2, 3] = float("inf")
    with pytest.raises(ValueError, match="logits"):
        moe.route(y, 2)
    with pytest.raises(ValueError, match="bias"):
        moe.route(x, 2, bias=torch.zeros(7))
    with pytest.raises(ValueError, match="bias"):
        moe.route(x, 2, bias=torch.tensor([math.inf] + [0.0] * 7))
    with pytest.raises(ValueError, match="logits"):
        moe.route(torch.randn(3, 4, 5), 2)
    with pytest.raises(TypeError, match="logits"):
        moe.route(torch.zeros(3, 4, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="score"):
        moe.route(x, 2, score="relu")
    with pytest.raises(ValueError, match="drop_policy"):
        moe.route(x, 2, drop_policy="random")
    with pytest.raises(ValueError, match="capacity_factor"):
        moe.route(x, 2, capacity_factor=0.0)
    with pytest.raises(ValueError, match="scale"):
        moe.route(x, 2, scale=math.nan)


def test_low_precision_logits():
    x = torch.randn(40, 8)
    for dt in (torch.bfloat16, torch.float16):
        plan = moe.route(x.to(dt), 2)
        w, ids = deepseek_gate(x.to(dt), 2, "softmax", None, None, None, False, 1.0)
        assert torch.equal(plan.expert_ids, ids) and plan.weights.dtype == dt
