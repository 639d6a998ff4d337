"""Balance losses against direct transcriptions of the published formulas, the LoadBalancer counters
(Rust) against numpy, and the aux-free update with counts all-reduced across 2 gloo processes."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from sparsekit import moe


def _data(T=40, E=8, k=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=gen)
    probs = torch.softmax(logits, -1)
    ids = moe.route(logits, k).expert_ids
    return logits, probs, ids


def test_switch_loss_formula():
    _, probs, ids = _data()
    T, k = ids.shape
    E = 8
    f = [sum(int(e == i) for e in ids.reshape(-1).tolist()) / (k * T) for i in range(E)]
    P = [float(probs[:, i].mean()) for i in range(E)]
    want = E * sum(fi * pi for fi, pi in zip(f, P))
    assert float(moe.switch_loss(probs, ids, E)) == pytest.approx(want, rel=1e-5)


def test_gshard_loss_formula():
    _, probs, ids = _data()
    T, E = probs.shape
    top1 = ids[:, 0].tolist()
    c = [top1.count(e) / T for e in range(E)]
    m = [float(probs[:, e].mean()) for e in range(E)]
    want = float(np.mean([ci * mi for ci, mi in zip(c, m)])) * E * E
    assert float(moe.gshard_loss(probs, ids, E)) == pytest.approx(want, rel=1e-5)


def test_z_loss_formula():
    logits, _, _ = _data()
    want = np.mean([math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()])
    assert float(moe.z_loss(logits)) == pytest.approx(want, rel=1e-5)


def test_sequence_aux_loss_formula():
    gen = torch.Generator().manual_seed(4)
    B, S, E, k = 3, 10, 6, 2
    scores = torch.sigmoid(torch.randn(B, S, E, generator=gen))
    ids = torch.stack([moe.route(torch.logit(scores[b]), k, score="sigmoid").expert_ids for b in range(B)])
    total = 0.0
    for b in range(B):
        sel = ids[b].tolist()
        f = [E / (k * S) * sum(i in row for row in sel) for i in range(E)]
        sn = (scores[b] / scores[b].sum(-1, keepdim=True)).tolist()
        P = [sum(sn[t][i] for t in range(S)) / S for i in range(E)]
        total += 0.3 * sum(fi * pi for fi, pi in zip(f, P))
    assert float(moe.sequence_aux_loss(scores, ids, E, alpha=0.3)) == pytest.approx(total / B, rel=1e-5)


def test_device_balance_loss_formula():
    _, probs, ids = _data(E=8)
    T, k = ids.shape
    E, D = 8, 4
    flat = ids.reshape(-1).tolist()
    f = [E / (k * T) * flat.count(i) for i in range(E)]
    P = [float(probs[:, i].mean()) for i in range(E)]
    per = E // D
    want = sum((sum(f[d * per:(d + 1) * per]) / per) * sum(P[d * per:(d + 1) * per]) for d in range(D))
    assert float(moe.device_balance_loss(probs, ids, E, D)) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="n_devices"):
        moe.device_balance_loss(probs, ids, E, 3)


def test_entropy_loss_formula():
    _, probs, _ = _data()
    want = np.mean([-sum(p * math.log(p) for p in row) for row in probs.tolist()])
    assert float(moe.entropy_loss(probs)) == pytest.approx(want, rel=1e-5)


def test_losses_on_global_statistics_do_not_depend_on_the_split():
    # the Switch loss of the whole batch equals the one from summed micro-batch statistics
    _, probs, ids = _data(T=60)
    whole = moe.switch_loss(probs, ids, 8)
    counts = sum(torch.bincount(ids[a:a + 20].reshape(-1), minlength=8).float() for a in (0, 20, 40))
    psum = sum(probs[a:a + 20].sum(0) for a in (0, 20, 40))
    split = 8 * ((counts / (2 * 60)) * (psum / 60)).sum()
    torch.testing.assert_close(whole, split)


def test_load_balancer_counters_and_ema():
    lb = moe.LoadBalancer(4, method="aux_free", rate=0.5, ema=0.75)
    bias = torch.zeros(4)
    history = []
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(2):  # two micro-batches per step
            plan = moe.route(torch.randn(16, 4, generator=gen), 2, bias=bias, capacity_factor=0.8)
            lb.observe(plan)
        counts = lb.step(bias)
        history.append(counts.double())
    ema = history[0].clone()
    for c in history[1:]:
        ema = 0.75 * ema + 0.25 * c
    np.testing.assert_allclose(lb.ema_counts(), ema.numpy())
    np.testing.assert_allclose(lb.step_counts(), history[-1].numpy())
    want = torch.zeros(4)
    for c in history:
        want += 0.5 * torch.sign(c.mean() - c).float()
    torch.testing.assert_close(bias, want)
    st = lb.stats()
    assert 0.0 <= st["dropped_fraction"] <= 1.0 and st["steps"] == 3


def test_load_balancer_bad_input():
    with pytest.raises(ValueError, match="method"):
        moe.LoadBalancer(4, method="magic")
    with pytest.raises(ValueError, match="ema"):
        moe.LoadBalancer(4, ema=1.0)
    with pytest.raises(ValueError, match="n_experts"):
        moe.LoadBalancer(0)
    with pytest.raises(ValueError, match="rate"):
        moe.LoadBalancer(4, rate=-1.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out) -> None:  # type: ignore[no-untyped-def]
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        lb = moe.LoadBalancer(8, rate=0.1, process_group=True)
        bias = torch.zeros(8)
        gen = torch.Generator().manual_seed(100 + rank)
        lb.observe(moe.route(torch.randn(32, 8, generator=gen), 2))
        counts = lb.step(bias)
        out.put((rank, counts.tolist(), bias.tolist()))
    finally:
        dist.destroy_process_group()


def test_aux_free_counts_all_reduced_across_ranks():
    world = 2
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in range(world)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    total = torch.zeros(8, dtype=torch.int64)
    for r in range(world):
        gen = torch.Generator().manual_seed(100 + r)
        total += moe.route(torch.randn(32, 8, generator=gen), 2).counts
    c = total.float()
    want = (0.1 * torch.sign(c.mean() - c)).tolist()
    for _, counts, bias in results:
        assert counts == total.tolist()
        assert bias == pytest.approx(want)
