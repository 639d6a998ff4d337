"""permute / unpermute (gradcheck, determinism, opcheck, against index_select / index_add_), the MoE layer
against a plain torch loop over experts, its balancer API, and torch.compile without graph breaks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsekit import moe


def _plan(T=12, E=4, k=2, cf=None, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return moe.route(torch.randn(T, E, generator=gen, dtype=dtype), k, capacity_factor=cf)


def test_permute_matches_index_select_and_grouping():
    plan = _plan(T=30, E=5, k=3)
    x = torch.randn(30, 7, dtype=torch.float64)
    xp = moe.permute(x, plan)
    assert torch.equal(xp, x[plan.order // 3])
    ids = plan.expert_ids.reshape(-1)[plan.order]
    off = plan.offsets.tolist()
    for e in range(5):
        assert bool((ids[off[e]:off[e + 1]] == e).all())


@pytest.mark.parametrize("cf", [None, 0.6])
def test_unpermute_matches_index_add(cf):
    plan = _plan(T=20, E=4, k=2, cf=cf)
    y = torch.randn(40, 3, dtype=torch.float64)
    out = moe.unpermute(y, plan)
    ref = torch.zeros(20, 3, dtype=torch.float64)
    w = (plan.weights * plan.kept).reshape(-1)[plan.order]
    ref.index_add_(0, plan.order // 2, y * w[:, None])
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("cf", [None, 0.7])
def test_gradcheck_dispatch_combine(cf):
    plan = _plan(T=8, E=4, k=2, cf=cf)
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(16, 3, dtype=torch.float64, requires_grad=True)
    w = plan.weights.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: moe.permute(x, plan), (x,))
    assert torch.autograd.gradcheck(lambda y, w: moe.unpermute(y, plan, w), (y, w))
    assert torch.autograd.gradgradcheck(lambda x: moe.permute(x, plan), (x,))


def test_router_gets_gradient_end_to_end():
    logits = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(10, 3, dtype=torch.float64)

    def f(logits):
        plan = moe.route(logits, 2, score="sigmoid")
        return moe.unpermute(moe.permute(x, plan) * 2.0, plan)

    assert torch.autograd.gradcheck(f, (logits,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backward_is_deterministic(dtype):
    plan = _plan(T=256, E=8, k=2, dtype=torch.float32)
    grads = []
    for _ in range(2):
        x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
        out = moe.unpermute(moe.permute(x, plan) * 1.5, plan)
        out.sum().backward()
        grads.append(x.grad)
    assert grads[0].dtype == dtype and torch.equal(grads[0], grads[1])


def test_opcheck_dispatch():
    plan = _plan(T=10, E=4, k=2, dtype=torch.float32)
    x = torch.randn(10, 5, requires_grad=True)
    y = torch.randn(20, 5, requires_grad=True)
    w = plan.weights.detach().clone().requires_grad_()
    torch.library.opcheck(torch.ops.sparsekit.moe_permute.default, (x, plan.order, plan.inverse, 2))
    torch.library.opcheck(torch.ops.sparsekit.moe_unpermute.default, (y, w, plan.order, plan.inverse, 2))
    xp = torch.randn(20, 5, requires_grad=True)
    w1, w3 = torch.randn(4, 6, 5, requires_grad=True), torch.randn(4, 6, 5, requires_grad=True)
    w2 = torch.randn(4, 5, 6, requires_grad=True)
    torch.library.opcheck(torch.ops.sparsekit.moe_experts.default, (xp, plan.offsets, w1, w3, w2))


def test_dispatch_bad_input():
    plan = _plan(T=6, E=4, k=2)
    with pytest.raises(ValueError, match="tokens"):
        moe.permute(torch.randn(7, 3), plan)
    with pytest.raises(ValueError, match="rows"):
        moe.unpermute(torch.randn(11, 3), plan)
    with pytest.raises(TypeError, match="plan"):
        moe.permute(torch.randn(6, 3), "plan")  # type: ignore[arg-type]


def reference_moe(layer: moe.MoE, x: torch.Tensor) -> torch.Tensor:
    """Straightforward torch MoE: DeepSeek-style loop over experts with boolean masks."""
    h = x.reshape(-1, layer.d_model)
    logits = h @ layer.gate.t()
    scores = torch.softmax(logits.float(), -1) if layer.route_kwargs["score"] == "softmax" else torch.sigmoid(logits.float())
    choice = scores + layer.expert_bias if layer.balancer.method == "aux_free" else scores
    ids = torch.sort(choice, dim=-1, descending=True, stable=True).indices[:, : layer.k]
    w = scores.gather(1, ids)
    if layer.route_kwargs["score"] == "sigmoid":
        w = w / w.sum(-1, keepdim=True)
    y = torch.zeros_like(h)
    for e in range(layer.n_experts):
        idx, top = torch.where(ids == e)
        if idx.numel():
            he = h[idx]
            y[idx] += ((F.silu(he @ layer.w1[e].t()) * (he @ layer.w3[e].t())) @ layer.w2[e].t()) * w[idx, top, None].to(h.dtype)
    if layer.n_shared:
        y = y + (F.silu(h @ layer.s1.t()) * (h @ layer.s3.t())) @ layer.s2.t()
    return y.reshape(x.shape)


@pytest.mark.parametrize("score,n_shared", [("softmax", 0), ("sigmoid", 1)])
def test_moe_layer_matches_loop(score, n_shared):
    torch.manual_seed(0)
    layer = moe.MoE(24, 32, 6, 2, n_shared=n_shared, score=score, balancer="aux_free")
    layer.expert_bias.copy_(torch.randn(6) * 0.01)
    x = torch.randn(2, 50, 24, requires_grad=True)
    y = layer(x)
    x2 = x.detach().clone().requires_grad_()
    y_ref = reference_moe(layer, x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(y)
    params = [layer.gate, layer.w1, layer.w2, layer.w3]
    got = torch.autograd.grad(y, [x] + params, g)
    want = torch.autograd.grad(y_ref, [x2] + params, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_weight_grads_without_input_grad_match_the_loop():
    # an input that needs no gradient skips the experts' dX matmuls; the weight gradients must not change
    torch.manual_seed(5)
    layer = moe.MoE(24, 32, 6, 2, balancer="none")
    x = torch.randn(80, 24)
    params = [layer.gate, layer.w1, layer.w3, layer.w2]
    got = torch.autograd.grad(layer(x).square().sum(), params)
    want = torch.autograd.grad(reference_moe(layer, x).square().sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_moe_gradcheck_small():
    torch.manual_seed(1)
    layer = moe.MoE(4, 5, 3, 2, dtype=torch.float64, balancer="none")
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    ws = [getattr(layer, n).detach().clone().requires_grad_() for n in ("w1", "w3", "w2")]
    assert torch.autograd.gradcheck(
        lambda x, w1, w3, w2: torch.func.functional_call(layer, {"w1": w1, "w3": w3, "w2": w2}, (x,)), (x, *ws)
    )


def test_balancer_step_and_counts():
    torch.manual_seed(2)
    layer = moe.MoE(16, 16, 8, 2, balancer="aux_free", rate=0.01)
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    h = torch.randn(64, 16)
    y = layer(h)
    counts = layer.last_counts()
    assert counts.shape == (8,) and int(counts.sum()) == 128
    ref = torch.bincount(layer.last_plan.expert_ids.reshape(-1), minlength=8)
    assert torch.equal(counts, ref)
    y.sum().backward()
    opt.step()
    layer.balancer_step()
    c = counts.float()
    torch.testing.assert_close(layer.expert_bias, 0.01 * torch.sign(c.mean() - c))
    st = layer.balance_stats()
    assert st["max_over_mean"] == pytest.approx(float(c.max() / c.mean()))
    assert st["cv"] == pytest.approx(float(c.std(unbiased=False) / c.mean()), rel=1e-6)
    p = c / c.sum()
    assert st["entropy"] == pytest.approx(float(-(p[p > 0] * p[p > 0].log()).sum()), rel=1e-6)
    assert st["unused"] == float((c == 0).sum())
    none = moe.MoE(16, 16, 8, 2, balancer="none")
    none(h)
    none.balancer_step()
    assert bool((none.expert_bias == 0).all())


def test_aux_loss_layer():
    layer = moe.MoE(8, 8, 4, 2, balancer="aux_loss")
    layer(torch.randn(10, 8))
    assert layer.aux_loss is not None and layer.aux_loss.requires_grad


def test_capacity_layer_drops():
    layer = moe.MoE(8, 8, 4, 2, capacity_factor=0.5, balancer="none")
    layer(torch.randn(40, 8))
    st = layer.last_plan
    assert int(st.dropped) > 0 and int(st.counts.max()) <= st.capacity
    layer.balancer_step()
    assert layer.balance_stats()["dropped_fraction"] == pytest.approx(int(st.dropped) / 80)


def test_torch_compile_without_graph_breaks():
    torch._dynamo.reset()
    torch.manual_seed(3)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Linear(8, 16)
            self.moe = moe.MoE(16, 16, 4, 2, balancer="aux_free")

        def forward(self, x):
            return self.moe(torch.relu(self.inp(x))).sum()

    model = Model()
    x = torch.randn(32, 8)
    want = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    torch.testing.assert_close(got, want)
    got.backward()
    assert model.moe.w1.grad is not None and model.moe.gate.grad is not None
