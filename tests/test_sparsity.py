"""DynamicSparsity: exact densities and zeros, optimizer state, schedules, ERK, structures, resume, AMP, bad input."""

import io
import math

import pytest
import torch
from torch import nn

from sparsekit.sparsity import Constant, Cubic, DynamicSparsity, Progressive, erk_counts, pack_mask, unpack_mask


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).to(dtype)


def train(model, opt, sp, steps, seed=1, dtype=torch.float32, check=None):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=g).to(dtype)
        y = torch.randint(0, 8, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).float(), y).backward()
        sp.step()
        if check:
            check("after sparsity.step")
        opt.step()
        if check:
            check("after optimizer.step")


def exact(sp, expected_counts):
    for layer, k in zip(sp.layers, expected_counts):
        m = sp.masks[layer.name]
        assert int(m.sum()) == k, layer.name
        assert bool((layer.param.detach()[~m] == 0).all()), layer.name


@pytest.mark.parametrize("method", ["magnitude", "set", "rigl", "gradient_topk"])
@pytest.mark.parametrize("distribution", ["uniform", "global", "erk"])
@pytest.mark.parametrize("opt_name", ["sgd", "adam", "adamw_amsgrad"])
def test_exact_zeros_density_and_state(method, distribution, opt_name):
    model = mlp()
    params = model.parameters()
    opt = {
        "sgd": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4),
        "adam": lambda: torch.optim.Adam(params, lr=1e-2),
        "adamw_amsgrad": lambda: torch.optim.AdamW(params, lr=1e-2, amsgrad=True),
    }[opt_name]()
    sched = Progressive(40, 0.1, 0.5) if method == "magnitude" else Constant(alpha=0.3, t_end=30)
    sp = DynamicSparsity(model, opt, density=0.2, method=method, schedule=sched, distribution=distribution, update_every=5)
    sizes = [layer.param.numel() for layer in sp.layers]

    def check(where):
        d = sp.schedule.density(sp.step_count if where != "init" else 0, 0.2)
        if method == "magnitude":
            d = sp.schedule.density(sp.updates and (sp.step_count // 5) * 5, 0.2)
        total = int(sum(m.sum() for m in sp.masks.values()))
        for layer in sp.layers:
            assert bool((layer.param.detach()[~sp.masks[layer.name]] == 0).all()), where
        if distribution == "uniform":
            for layer, n in zip(sp.layers, sizes):
                assert int(sp.masks[layer.name].sum()) == math.floor(d * n + 0.5), where
        else:
            assert total == math.floor(d * sum(sizes) + 0.5), where

    check("init")
    before = {k: v.clone() for k, v in sp.masks.items()}
    train(model, opt, sp, 40, check=check)
    assert any(bool((before[k] != sp.masks[k]).any()) for k in before), "masks never moved"
    # every param-shaped state tensor is zero outside the mask (dropped zeroed, regrown reset) right after the last update
    st = sp.stats()
    assert st["updates"] >= 1 and 0 <= st["flop_fraction"] <= 1


def test_state_reset_for_regrown_and_dropped():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True)
    sp = DynamicSparsity(model, opt, density=0.3, method="rigl", update_every=3)
    for _ in range(2):
        train(model, opt, sp, 1)
    # step 3 is an update: check state right after sparsity.step()
    old = {k: v.clone() for k, v in sp.masks.items()}
    x, y = torch.randn(8, 16), torch.randint(0, 8, (8,))
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    assert sp.step()
    for layer in sp.layers:
        new, st = sp.masks[layer.name], opt.state[layer.param]
        changed = new ^ old[layer.name]
        assert changed.any()
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert bool((st[key][changed] == 0).all()), key  # regrown reset, dropped zeroed
            assert bool((st[key][~new] == 0).all()), key
        assert bool((layer.param.detach()[new & ~old[layer.name]] == 0).all())  # regrown start at zero
    opt.step()
    for layer in sp.layers:
        assert bool((layer.param.detach()[~sp.masks[layer.name]] == 0).all())


def test_sgd_momentum_state_and_no_revival():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = DynamicSparsity(model, opt, density=0.25, method="set", update_every=4)
    train(model, opt, sp, 4)
    for layer in sp.layers:
        buf = opt.state[layer.param]["momentum_buffer"]
        assert bool((buf[~sp.masks[layer.name]] == 0).all())
    # many more steps: a masked weight never comes back through a stale moment
    train(model, opt, sp, 7, seed=3)
    for layer in sp.layers:
        assert bool((layer.param.detach()[~sp.masks[layer.name]] == 0).all())


def test_rigl_grows_by_gradient_and_set_at_random():
    w = nn.Parameter(torch.zeros(4, 8))
    with torch.no_grad():
        w[0] = torch.arange(1, 9, dtype=torch.float32)  # only row 0 active initially (via inference)
    opt = torch.optim.SGD([w], lr=0.0)
    sp = DynamicSparsity({"w": w}, opt, density=0.25, method="rigl", infer_masks=True, update_every=1,
                         schedule=Constant(alpha=0.5, decay="constant"))
    w.grad = torch.zeros(4, 8)
    w.grad[3] = torch.arange(1, 9, dtype=torch.float32)
    sp.step()
    m = sp.masks["w"]
    assert m[0].tolist() == [False] * 4 + [True] * 4  # kept the 4 largest |w|
    assert m[3].tolist() == [False] * 4 + [True] * 4  # grew the 4 largest |grad|
    assert float(w.detach()[3].abs().sum()) == 0.0


def test_gradient_topk_rule():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 10))
    opt = torch.optim.SGD([w], lr=0.5)
    sp = DynamicSparsity({"w": w}, opt, density=0.3, method="gradient_topk", update_every=1)
    w0 = w.detach().clone()
    m0 = sp.masks["w"].clone()
    w0 = w0 * m0
    g = torch.randn(6, 10)
    w.grad = g.clone()
    sp.step()
    opt.step()
    k = 18
    ref_m = torch.zeros(60, dtype=torch.bool)
    ref_m[torch.sort(g.abs().reshape(-1), descending=True, stable=True).indices[:k]] = True
    ref_m = ref_m.reshape(6, 10)
    assert torch.equal(sp.masks["w"], ref_m)
    start = torch.where(m0, w0, 0.0)  # regrown start at zero
    assert torch.equal(w.detach(), ref_m * (start - 0.5 * g))


def test_custom_score_fn():
    w = nn.Parameter(torch.randn(4, 4))
    calls = []

    def score(name, weight, grad):
        calls.append(name)
        return -torch.arange(16, dtype=torch.float32).reshape(4, 4)  # prefers low indices

    sp = DynamicSparsity({"w": w}, None, density=0.25, method=score, update_every=1, schedule=Constant(alpha=1.0, decay="constant"))
    w.grad = torch.zeros(4, 4)
    sp.step()
    assert calls == ["w"] and sp.masks["w"].reshape(-1)[:4].all() and int(sp.masks["w"].sum()) == 4


def test_schedules():
    p = Progressive(100, warmup=0.1, ramp=0.3)
    assert [p.density(t, 0.1) for t in (0, 9, 10, 25, 40, 99)] == [1.0, 1.0, 1.0, pytest.approx(1 - 0.9 * 15 / 30), 0.1, 0.1]
    c = Cubic(10, 110, initial_density=1.0)
    assert c.density(10, 0.2) == 1.0 and c.density(110, 0.2) == 0.2
    assert c.density(60, 0.2) == pytest.approx(1 - (0.8 + (0 - 0.8) * 0.5**3))
    k = Constant(alpha=0.3, t_end=100)
    assert k.fraction(0) == pytest.approx(0.3) and k.fraction(50) == pytest.approx(0.15) and k.fraction(100) == 0.0
    assert "Progressive(total_steps=100" in repr(p) and "Cubic(" in repr(c) and "Constant(" in repr(k)


def test_erk_exact_and_redistribution():
    shapes = [(3, 3, 3, 16), (32, 16, 3, 3), (64, 32, 3, 3), (10, 64)]
    for d in (0.05, 0.1, 0.5, 0.9):
        counts = erk_counts(shapes, d)
        total = sum(math.prod(s) for s in shapes)
        assert sum(counts) == math.floor(d * total + 0.5)
        assert all(0 <= c <= math.prod(s) for c, s in zip(counts, shapes))
    counts = erk_counts([(2, 2), (100, 100)], 0.5)
    assert counts[0] == 4  # the small layer would exceed density 1: made dense


def test_nm_structure():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = DynamicSparsity(model, opt, density=0.5, method="gradient_topk", structure=(2, 4), update_every=2)
    train(model, opt, sp, 4)
    for layer in sp.layers:
        groups = sp.masks[layer.name].reshape(layer.shape[0], -1, 4).sum(-1)
        assert bool((groups == 2).all())
        assert bool((layer.param.detach()[~sp.masks[layer.name]] == 0).all())


@pytest.mark.parametrize("method", ["magnitude", "gradient_topk"])
def test_nm_global_equals_uniform(method):
    """N:M fixes every layer at n/m, which meets the global count exactly: global gives uniform's masks."""
    runs = []
    for distribution in ("uniform", "global"):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sp = DynamicSparsity(model, opt, density=0.5, method=method, structure=(2, 4), distribution=distribution, update_every=2)
        train(model, opt, sp, 4)
        total = sum(layer.param.numel() for layer in sp.layers)
        assert int(sum(m.sum() for m in sp.masks.values())) == math.floor(0.5 * total + 0.5)
        runs.append(sp.masks)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@pytest.mark.parametrize("distribution", ["uniform", "global", "erk"])
def test_block_structure(distribution):
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sp = DynamicSparsity(model, opt, density=0.25, method="rigl", structure=("block", (4, 4)), distribution=distribution, update_every=2)
    train(model, opt, sp, 6)
    bm = sp.block_masks
    total = 0
    for layer in sp.layers:
        b = bm[layer.name]
        assert b.shape == (layer.shape[0] // 4, layer.shape[1] // 4)
        assert torch.equal(b.repeat_interleave(4, 0).repeat_interleave(4, 1), sp.masks[layer.name])
        total += int(b.sum())
    units = sum(layer.units for layer in sp.layers)
    if distribution != "uniform":
        assert total == math.floor(0.25 * units + 0.5)


def test_resume_exact():
    def run(split):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sp = DynamicSparsity(model, opt, density=0.2, method="set", update_every=3, seed=5)
        train(model, opt, sp, split, seed=1)
        if split == 12:
            return sp.masks
        buf = io.BytesIO()
        torch.save({"m": model.state_dict(), "o": opt.state_dict(), "s": sp.state_dict()}, buf)
        buf.seek(0)
        ck = torch.load(buf, weights_only=False)
        model2 = mlp(seed=9)
        opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
        sp2 = DynamicSparsity(model2, opt2, density=0.2, method="set", update_every=3, seed=123)
        model2.load_state_dict(ck["m"])  # construct first (it masks the fresh weights), then load
        opt2.load_state_dict(ck["o"])
        sp2.load_state_dict(ck["s"])
        g = torch.Generator().manual_seed(1)
        for _ in range(split):  # replay data position
            torch.randn(8, 16, generator=g), torch.randint(0, 8, (8,), generator=g)
        for _ in range(12 - split):
            x, y = torch.randn(8, 16, generator=g), torch.randint(0, 8, (8,), generator=g)
            opt2.zero_grad()
            nn.functional.cross_entropy(model2(x), y).backward()
            sp2.step()
            opt2.step()
        return sp2.masks

    full = run(12)
    resumed = run(7)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_state_dict_packed_and_bad_model():
    sp = DynamicSparsity(mlp(), None, density=0.3, method="set")
    sd = sp.state_dict()
    assert all(v.dtype == torch.uint8 for v in sd["masks"].values())
    m = torch.rand(5, 7) > 0.5
    assert torch.equal(unpack_mask(pack_mask(m), (5, 7)), m)
    other = DynamicSparsity(nn.Sequential(nn.Linear(16, 4)), None, density=0.3)
    with pytest.raises(ValueError, match="different model"):
        other.load_state_dict(sd)
    sd2 = dict(sd, shapes=dict(sd["shapes"], **{"0.weight": (1, 2)}))
    with pytest.raises(ValueError, match="0.weight"):
        sp.load_state_dict(sd2)


def test_deterministic_across_threads():
    import sparsekit

    out = []
    for threads in (1, 2):
        sparsekit.set_num_threads(threads)
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sp = DynamicSparsity(model, opt, density=0.1, method="rigl", distribution="global", update_every=2, seed=3)
        train(model, opt, sp, 6)
        out.append({k: v.clone() for k, v in sp.masks.items()})
    sparsekit.set_num_threads(0)
    assert all(torch.equal(out[0][k], out[1][k]) for k in out[0])


def test_infer_from_sparse_checkpoint_and_continue():
    model = mlp()
    with torch.no_grad():
        for mod in model:
            if isinstance(mod, nn.Linear):
                mod.weight.mul_((torch.rand_like(mod.weight) < 0.5).float())
    zeros = {n: (p == 0).clone() for n, p in model.named_parameters() if n.endswith("weight")}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = DynamicSparsity(model, opt, density=0.1, method="magnitude", infer_masks=True, update_every=1)
    assert all(torch.equal(sp.masks[n], ~zeros[n]) for n in zeros)
    train(model, opt, sp, 1)
    for layer in sp.layers:
        assert int(sp.masks[layer.name].sum()) == math.floor(0.1 * layer.param.numel() + 0.5)
        assert not bool((sp.masks[layer.name] & zeros[layer.name]).any())  # prune only


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_params(dtype):
    model = mlp(dtype=dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = DynamicSparsity(model, opt, density=0.2, method="rigl", update_every=2)
    train(model, opt, sp, 4, dtype=dtype)
    exact(sp, [math.floor(0.2 * layer.param.numel() + 0.5) for layer in sp.layers])


def test_gradscaler_skipped_step_does_not_update():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = DynamicSparsity(model, opt, density=0.2, method="rigl", update_every=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(8, 16), torch.randint(0, 8, (8,))
    before = {k: v.clone() for k, v in sp.masks.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x).float(), y)
    scaler.scale(loss).backward()
    model[0].weight.grad[0, 0] = float("inf")
    scaler.unscale_(opt)
    assert not sp.step()
    scaler.step(opt)  # skipped by the scaler
    scaler.update()
    assert all(torch.equal(before[k], sp.masks[k]) for k in before) and sp.skipped_updates == 1
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x).float(), y)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    assert sp.step()
    scaler.step(opt)
    scaler.update()
    for layer in sp.layers:
        assert bool((layer.param.detach()[~sp.masks[layer.name]] == 0).all())


def test_bad_input():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for d in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="density"):
            DynamicSparsity(model, opt, density=d)
    with pytest.raises(ValueError, match="method"):
        DynamicSparsity(model, opt, density=0.5, method="bogus")
    with pytest.raises(TypeError, match="schedule"):
        DynamicSparsity(model, opt, density=0.5, schedule="cosine")
    with pytest.raises(ValueError, match="distribution"):
        DynamicSparsity(model, opt, density=0.5, distribution="normal")
    with pytest.raises(ValueError, match="2.weight.*m=3|m=3"):
        DynamicSparsity(model, opt, density=1 / 3, method="magnitude", structure=(1, 3))
    with pytest.raises(ValueError, match="block.*0.weight"):
        DynamicSparsity(model, opt, density=0.5, structure=("block", (5, 5)))
    with pytest.raises(ValueError, match="distribution must be 'uniform'"):
        DynamicSparsity(model, opt, density=0.5, method="magnitude", structure=(2, 4), distribution="erk")
    with pytest.raises(ValueError, match="not supported with N:M"):
        DynamicSparsity(model, opt, density=0.5, method="rigl", structure=(2, 4))
    other = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="does not own parameter '0.weight'"):
        DynamicSparsity(model, other, density=0.5)
    sp = DynamicSparsity(model, opt, density=0.5, method="rigl", update_every=1)
    with pytest.raises(ValueError, match="no gradient"):
        sp.step()
    with pytest.raises(ValueError, match="positive int"):
        Progressive(0)
    with pytest.raises(ValueError, match="warmup"):
        Progressive(10, warmup=0.8, ramp=0.5)
