"""The fused Rust mask update (CPU) against the torch path it replaces: same masks, weights and
optimizer state, bit for bit, for every built-in method and distribution, ties included."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparsekit.sparsity import Constant, DynamicSparsity, Progressive


def model(seed, dtype=torch.float32, levels=None):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 5)).to(dtype)
    if levels:  # few distinct values: heavy ties in |w| and |grad|
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randint(-levels, levels + 1, p.shape).to(dtype) / levels)
    return m


def run(fused, method, distribution, seed=0, dtype=torch.float32, levels=None, opt_name="adamw", steps=12):
    net = model(seed, dtype, levels)
    opt = {
        "adamw": lambda: torch.optim.AdamW(net.parameters(), lr=1e-2, amsgrad=True),
        "sgd": lambda: torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
    }[opt_name]()
    sched = Progressive(steps, 0.1, 0.5) if method == "magnitude" else Constant(alpha=0.4, t_end=steps)
    sp = DynamicSparsity(net, opt, density=0.2, method=method, schedule=sched, distribution=distribution, update_every=2, seed=seed)
    if not fused:
        sp._fused_ok = lambda: False  # the torch path
    g = torch.Generator().manual_seed(seed + 1)
    used = []
    for _ in range(steps):
        x = torch.randn(16, 24, generator=g).to(dtype)
        y = torch.randint(0, 5, (16,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x).float(), y)
        loss.backward()
        if levels:  # tied gradients too
            for p in net.parameters():
                p.grad = (p.grad * 4).round() / 4
        used.append(sp._fused_ok())
        sp.step()
        opt.step()
    state = [{k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} for p in net.parameters()]
    return sp, [p.detach().clone() for p in net.parameters()], state, used


def same(a, b):
    sa, wa, st_a, used_a = a
    sb, wb, st_b, _ = b
    assert all(used_a) and sa.updates == sb.updates > 0
    for name in sa.masks:
        assert torch.equal(sa.masks[name], sb.masks[name]), name
    assert sa.last_changed == sb.last_changed
    for x, y in zip(wa, wb):
        assert torch.equal(x, y)
    for x, y in zip(st_a, st_b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("method", ["magnitude", "set", "rigl", "gradient_topk"])
@pytest.mark.parametrize("distribution", ["uniform", "global", "erk"])
def test_fused_equals_torch_path(method, distribution):
    same(run(True, method, distribution), run(False, method, distribution))


@pytest.mark.parametrize("method", ["magnitude", "rigl", "set"])
def test_fused_equals_torch_path_with_ties_sgd(method):
    same(run(True, method, "global", levels=2, opt_name="sgd"), run(False, method, "global", levels=2, opt_name="sgd"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_equals_torch_path_half(dtype):
    same(run(True, "rigl", "uniform", dtype=dtype, opt_name="sgd"), run(False, "rigl", "uniform", dtype=dtype, opt_name="sgd"))


@settings(max_examples=25, deadline=None)
@given(
    method=st.sampled_from(["magnitude", "set", "rigl", "gradient_topk"]),
    distribution=st.sampled_from(["uniform", "global", "erk"]),
    seed=st.integers(0, 2**16),
    levels=st.sampled_from([None, 1, 3]),
)
def test_fused_equals_torch_path_property(method, distribution, seed, levels):
    a = run(True, method, distribution, seed=seed, levels=levels, opt_name="sgd", steps=6)
    b = run(False, method, distribution, seed=seed, levels=levels, opt_name="sgd", steps=6)
    same(a, b)


def test_fused_nan_weight_names_the_layer():
    net = model(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    sp = DynamicSparsity(net, opt, density=0.5, method="magnitude", update_every=1, schedule=Progressive(4, 0.0, 0.5))
    with torch.no_grad():
        net[2].weight[sp.masks["2.weight"]] = float("nan")  # an active weight
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(ValueError, match="'2.weight' contains NaN"):
        sp.step()


def test_masked_gradient_hook_zeroes_instead_of_multiplying():
    net = model(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sp = DynamicSparsity(net, opt, density=0.3, method="set", update_every=100)
    for p in net.parameters():
        p.grad = torch.full_like(p, float("inf"))  # an inf at a masked position must not turn into NaN
    sp._mask_grads()
    for layer in sp.layers:
        g, m = layer.param.grad, sp.masks[layer.name]
        assert bool((g[~m] == 0).all()) and bool(torch.isinf(g[m]).all())
