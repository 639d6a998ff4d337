"""Expert-parallel MoE (sparsekit.moe.expert_parallel) over gloo, against a one-process run of the same layer.

Each world size spawns one process group and runs every multi-process check inside it (processes are
expensive on this machine). The reference is a plain ``MoE`` (no group) with identical weights in the same
process: on the concatenated batch of all ranks (dropless: routing is per token), or on each rank's batch
separately (capacity dropping: each rank routes, and so drops, its own tokens; gradients summed).
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import tempfile
import traceback

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsekit import moe
from sparsekit.moe.expert_parallel import expert_major_index, send_split_sizes

D, F, E, K = 6, 5, 8, 2


# ------------------------------------------------------------------------------- unit tests, no processes
def test_send_split_sizes_sums_each_ranks_block():
    counts = torch.tensor([3, 0, 2, 5, 0, 0, 1, 4])
    assert send_split_sizes(counts, 1) == [15]
    assert send_split_sizes(counts, 2) == [10, 5]
    assert send_split_sizes(counts, 4) == [3, 7, 0, 5]
    assert send_split_sizes(counts, 8) == counts.tolist()
    assert send_split_sizes([0] * 4, 2) == [0, 0]


def test_send_split_sizes_bad_input():
    with pytest.raises(ValueError, match="divisible"):
        send_split_sizes(torch.arange(6), 4)
    with pytest.raises(ValueError, match="world size"):
        send_split_sizes(torch.arange(4), 0)


def _expert_major_reference(rc: torch.Tensor) -> list[int]:
    """Row indices of the rank-major layout in expert-major order, by a direct double loop."""
    W, El = rc.shape
    start, starts = 0, {}
    for s in range(W):
        for e in range(El):
            starts[s, e] = start
            start += int(rc[s, e])
    return [starts[s, e] + i for e in range(El) for s in range(W) for i in range(int(rc[s, e]))]


@pytest.mark.parametrize("rc", [[[2, 0, 1], [0, 3, 2]], [[0, 0], [0, 0]], [[4]], [[1, 2], [0, 0], [3, 1], [0, 5]]])
def test_expert_major_index_against_loop(rc):
    rc = torch.tensor(rc)
    perm, inv = expert_major_index(rc)
    assert perm.tolist() == _expert_major_reference(rc)
    n = int(rc.sum())
    assert torch.equal(perm[inv], torch.arange(n)) and torch.equal(inv[perm], torch.arange(n))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5).flatmap(lambda w: st.integers(1, 4).flatmap(
    lambda el: st.lists(st.integers(0, 6), min_size=w * el, max_size=w * el).map(lambda v: (w, el, v)))))
def test_split_sizes_and_expert_major_index_property(case):
    w, el, v = case
    counts = torch.tensor(v)  # one rank's per-expert counts, E = w * el
    sends = send_split_sizes(counts, w)
    assert sends == [sum(v[r * el : (r + 1) * el]) for r in range(w)]
    rc = counts.view(w, el)  # the same numbers read as received counts [W, E_local]
    perm, inv = expert_major_index(rc)
    assert perm.tolist() == _expert_major_reference(rc)
    assert torch.equal(inv[perm], torch.arange(int(rc.sum())))


def test_expert_major_index_bad_input():
    with pytest.raises(ValueError, match="recv_counts"):
        expert_major_index(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="recv_counts"):
        expert_major_index(torch.tensor([[1, -1]]))


def test_expert_parallel_needs_initialised_distributed():
    import torch.distributed as dist

    if dist.is_initialized():  # pragma: no cover - never in this suite
        pytest.skip("a process group exists")
    with pytest.raises(ValueError, match="expert_parallel_group"):
        moe.MoE(D, F, E, K, expert_parallel_group=True)


def test_full_state_dict_without_group_roundtrip():
    torch.manual_seed(0)
    a, b = moe.MoE(D, F, E, K), moe.MoE(D, F, E, K)
    b.load_full_state_dict(a.full_state_dict())
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb)
    with pytest.raises(ValueError, match="w1"):
        b.load_full_state_dict({**a.state_dict(), "w1": a.w1[:2]})


# ------------------------------------------------------------------------------- multi-process checks
def _batches(sizes: list[int], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, D, generator=g, dtype=torch.float64) for n in sizes]


def _layers(rank: int, world: int, **kw):
    """A one-process reference layer and this rank's expert-parallel layer with the same weights."""
    torch.manual_seed(0)
    ref = moe.MoE(D, F, E, K, dtype=torch.float64, **kw)
    with torch.no_grad():  # a non-zero bias so that it takes part in the choice
        ref.expert_bias.copy_(torch.linspace(-0.05, 0.05, E))
    ep = moe.MoE(D, F, E, K, dtype=torch.float64, expert_parallel_group=True, **kw)
    ep.load_full_state_dict(ref.state_dict())
    return ref, ep


def _run(layer, xs: list[torch.Tensor], upstream: list[torch.Tensor]):
    """Forward each batch of ``xs`` with ``layer``, backward of sum(y * upstream); returns (ys, input grads)."""
    ys, gxs = [], []
    for x, u in zip(xs, upstream):
        x = x.clone().requires_grad_(True)
        y = layer(x)
        (y * u).sum().backward()
        ys.append(y.detach())
        gxs.append(x.grad)
    return ys, gxs


def _all_reduced_grad(p: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    g = p.grad.clone()
    dist.all_reduce(g)  # the data-parallel sync a user's DDP / GradientSync does for replicated parameters
    return g


def _compare(rank: int, world: int, sizes: list[int], *, chunked_ref: bool, seed: int, **kw) -> dict:
    """Max abs differences EP vs one-process of outputs, input grads, expert grads (this rank's slice),
    all-reduced router / shared grads; plus the EP layer's counts and the reference counts."""
    ref, ep = _layers(rank, world, **kw)
    xs, us = _batches(sizes, seed), _batches(sizes, seed + 1)
    if chunked_ref:  # one reference forward per rank's batch: capacity is per routed batch
        ys_ref, gx_ref = _run(ref, xs, us)
        ref_counts = [ref.balancer._pending.clone()]
    else:
        y, g = _run(ref, [torch.cat(xs)], [torch.cat(us)])
        ys_ref, gx_ref = list(y[0].split(sizes)), list(g[0].split(sizes))
        ref_counts = [ref.last_counts().clone()]
    y_ep, gx_ep = _run(ep, [xs[rank]], [us[rank]])
    lo, hi = ep.expert_offset, ep.expert_offset + ep.n_local_experts
    d = {
        "y": (y_ep[0] - ys_ref[rank]).abs().max().item() if sizes[rank] else 0.0,
        "gx": (gx_ep[0] - gx_ref[rank]).abs().max().item() if sizes[rank] else 0.0,
        "shape": tuple(y_ep[0].shape) == tuple(xs[rank].shape),
    }
    for name in ("w1", "w3", "w2"):
        d[name] = (getattr(ep, name).grad - getattr(ref, name).grad[lo:hi]).abs().max().item()
    for name, p in ep.named_parameters():
        if name not in ("w1", "w3", "w2"):
            d[name] = (_all_reduced_grad(p) - dict(ref.named_parameters())[name].grad).abs().max().item()
    d["local_counts"] = ep.last_counts().tolist()
    d["dropped"] = int(ep.last_plan.dropped)
    # the balancer sums counts over the group: the bias update equals the one-process one
    ref_total = sum(ref_counts)
    step = ep.balancer_step()
    d["balancer_counts"] = (step.tolist(), ref_total.tolist())
    ref.balancer_step()
    d["bias"] = (ep.expert_bias - ref.expert_bias).abs().max().item()
    return d


def _expect_error(fn) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the message is the result
        return f"{type(e).__name__}: {e}"
    return "no error"


def _checks(rank: int, world: int) -> dict:
    import torch.distributed as dist

    out: dict = {}
    # uneven token counts, one rank with none, a rank with a single token (most experts get no row from it)
    sizes = {2: [13, 1], 4: [9, 0, 14, 1]}[world]
    out["dropless"] = _compare(rank, world, sizes, chunked_ref=False, seed=10, n_shared=1)
    out["sigmoid_groups"] = _compare(rank, world, sizes, chunked_ref=False, seed=20, score="sigmoid", n_groups=4,
                                     topk_groups=2)  # fmt: skip
    out["capacity"] = _compare(rank, world, {2: [16, 11], 4: [16, 7, 12, 9]}[world], chunked_ref=True, seed=30,
                               capacity_factor=0.6)  # fmt: skip
    out["capacity_position"] = _compare(rank, world, [12] * world, chunked_ref=True, seed=40, capacity_factor=0.5,
                                        drop_policy="position")  # fmt: skip
    # balancer="aux_loss": each rank's loss is the Switch loss of its own routed tokens (as in data parallel)
    ref, ep = _layers(rank, world, balancer="aux_loss")
    x = _batches([5 + r for r in range(world)], 45)[rank]
    ep(x), ref(x)
    out["aux_loss"] = (ep.aux_loss - ref.aux_loss).abs().item()
    # the same call twice gives the same bits
    _, ep = _layers(rank, world)
    x = _batches([7] * world, 50)[rank]
    out["deterministic"] = torch.equal(ep(x), ep(x))
    # 3-d input
    out["shape3d"] = tuple(ep(x.view(7, 1, D)).shape) == (7, 1, D)
    # state dict: this rank's experts; the gathered one equals the one-process layer's
    ref, ep = _layers(rank, world)
    out["local_shapes"] = tuple(ep.state_dict()["w1"].shape) == (E // world, F, D)
    full = ep.full_state_dict()
    if rank == 0:
        want = ref.state_dict()
        out["full_state"] = full.keys() == want.keys() and all(torch.equal(full[n], t) for n, t in want.items())
    else:
        out["full_state"] = full is None
    # bad input on one rank only: every rank raises, none hangs
    _, ep = _layers(rank, world)
    bad = torch.randn(3, D + 1 if rank == world - 1 else D, dtype=torch.float64)
    out["bad_x"] = _expect_error(lambda: ep(bad))
    nan = torch.randn(3, D, dtype=torch.float64)
    if rank == 0:
        nan[1, 0] = float("nan")
    out["nan"] = _expect_error(lambda: ep(nan))
    # the layer still works after those errors (every rank left the collectives in step)
    out["after_errors"] = tuple(ep(torch.randn(2, D, dtype=torch.float64)).shape) == (2, D)
    # mismatched dtype across ranks: caught in the counts exchange
    mixed = torch.randn(3, D, dtype=torch.float32 if rank == 0 else torch.float64)
    _, ep = _layers(rank, world)
    if rank == 0:
        ep.float()
    out["dtype"] = _expect_error(lambda: ep(mixed))
    # one rank without autograd: its backward would skip an all-to-all the others run, so refuse up front
    _, ep = _layers(rank, world)
    x = torch.randn(3, D, dtype=torch.float64)
    with torch.set_grad_enabled(rank != 0):
        out["grad_mode"] = _expect_error(lambda: ep(x))
    with torch.no_grad():  # every rank in inference mode is fine
        out["no_grad"] = tuple(ep(x).shape) == (3, D)
    # mismatched layer configuration across ranks: caught before any token moves
    torch.manual_seed(0)
    other = moe.MoE(D, F + (rank == 1), E, K, expert_parallel_group=True)
    out["config"] = _expect_error(lambda: other(torch.randn(3, D)))
    # n_experts not divisible by the group size: clear error at construction (no collective involved)
    out["divisible"] = _expect_error(lambda: moe.MoE(D, F, 6, K, expert_parallel_group=True)) if world == 4 else ""
    dist.barrier()
    return out


def _worker(rank: int, world: int, path: str, q) -> None:  # type: ignore[no-untyped-def]
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
        out = _checks(rank, world)
        dist.destroy_process_group()
        q.put((rank, out))
    except Exception:  # noqa: BLE001
        q.put((rank, traceback.format_exc()))


@functools.lru_cache(maxsize=None)  # one process group per world size for both tests
def _spawn(world: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pg")
        procs = [ctx.Process(target=_worker, args=(r, world, path, q)) for r in range(world)]
        for p in procs:
            p.start()
        try:
            results = dict(q.get(timeout=300) for _ in range(world))
        finally:
            for p in procs:
                p.join(60)
                if p.is_alive():  # a hang is a failure, not a stuck suite
                    p.kill()
    for r, res in results.items():
        assert isinstance(res, dict), f"rank {r} failed:\n{res}"
    return results


TOL = 1e-12  # float64; the reference groups the same rows in the same order, only blocking may differ


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_matches_one_process(world):
    results = _spawn(world)
    for r, res in results.items():
        for case in ("dropless", "sigmoid_groups", "capacity", "capacity_position"):
            d = res[case]
            assert d["shape"], (r, case)
            for key in ("y", "gx", "w1", "w3", "w2", "gate", "bias"):
                assert d[key] <= TOL, (r, case, key, d[key])
            if case == "dropless":
                for key in ("s1", "s3", "s2"):
                    assert d[key] <= TOL, (r, case, key, d[key])
            got, want = d["balancer_counts"]
            assert got == want, (r, case)  # counts summed across the group
        assert res["deterministic"] and res["shape3d"] and res["local_shapes"] and res["full_state"], r
        assert res["after_errors"] and res["no_grad"], r
        assert res["aux_loss"] <= TOL, r
    # the single-token rank (dropless case) routes to k experts only: zero rows for the others
    small = results[1 if world == 2 else 3]["dropless"]["local_counts"]
    assert sum(small) == K and small.count(0) == E - K
    if world == 4:  # rank 1 has no token at all
        assert results[1]["dropless"]["local_counts"] == [0] * E
    assert sum(results[r]["capacity"]["dropped"] for r in results) > 0  # the capacity cases do drop
    assert sum(results[r]["capacity_position"]["dropped"] for r in results) > 0


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_errors_reach_every_rank(world):
    results = _spawn(world)
    last = world - 1
    for r, res in results.items():
        if r == last:
            assert res["bad_x"].startswith("ValueError") and "d_model" in res["bad_x"], res["bad_x"]
        else:
            assert res["bad_x"].startswith("RuntimeError") and f"rank(s) [{last}]" in res["bad_x"], res["bad_x"]
        assert "nan" in res["nan"].lower() or "rank(s) [0]" in res["nan"], res["nan"]
        assert res["dtype"].startswith("RuntimeError") and "dtype" in res["dtype"], res["dtype"]
        assert res["grad_mode"].startswith("RuntimeError") and "grad=" in res["grad_mode"], res["grad_mode"]
        assert res["config"].startswith("ValueError") and "d_ff" in res["config"], res["config"]
        if world == 4:
            assert res["divisible"].startswith("ValueError") and "divisible" in res["divisible"], res["divisible"]
