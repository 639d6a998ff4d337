"""The MoE routing kernels of ``cuda/route.cu`` executed on the CPU shim through the very launch code users
run (``sparsekit._cuda_route``), under forward, reverse and random thread orders, compared exactly with an
independent eager reference written here (plain Python loops and sorts, NumPy float32 for the top-2 group
sums, torch's stable argsort / bincount as a peer for the dropless tables).

Sizes: route_pass tiles are 32 x rounds positions per warp (at least 256), so T*k up to ~24k makes many
tiles and buckets that straddle them; route_topk runs one block per row, and a capped grid makes each
block take many rows (the end-of-row barrier matters there)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsekit import _cuda_route as cr

try:  # the Rust path (issue 6's CPU side), for a cross-check once it is merged
    from sparsekit.moe import route_tables as rust_tables
    from sparsekit.moe import route_topk as rust_topk
except ImportError:
    try:
        from sparsekit.moe._routing import route_tables as rust_tables  # type: ignore[no-redef]
        from sparsekit.moe._routing import route_topk as rust_topk  # type: ignore[no-redef]
    except ImportError:
        rust_tables = rust_topk = None  # type: ignore[assignment]

SCHEDULES = [("forward", 0), ("reverse", 0), ("random", 1)]
KINDS = ["normal", "softmax", "ties", "extremes"]


@pytest.fixture(scope="module", params=SCHEDULES, ids=[s for s, _ in SCHEDULES])
def backend(request):
    schedule, seed = request.param
    return cr.sim_backend(schedule=schedule, seed=seed)


@pytest.fixture(scope="module")
def forward():
    return cr.sim_backend()


# ------------------------------------------------------------------------------------------- data
def make_scores(kind: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """float32 scores of one kind; never NaN."""
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if kind == "normal":
        x = torch.randn(n, generator=gen)
    elif kind == "softmax":
        x = torch.softmax(torch.randn(shape, generator=gen), dim=-1).reshape(-1) if n else torch.zeros(0)
    elif kind == "ties":  # few distinct values, -0.0 and -inf among them
        x = torch.randint(-2, 3, (n,), generator=gen).float() * 0.5
        x[torch.rand(n, generator=gen) < 0.15] = -0.0
        x[torch.rand(n, generator=gen) < 0.15] = -math.inf
    elif kind == "extremes":  # +-inf, +-0, +-1, +-max: top-2 sums overflow or give inf + -inf = NaN
        m = float(torch.finfo(torch.float32).max)
        pool = torch.tensor([math.inf, -math.inf, 0.0, -0.0, 1.0, -1.0, m, -m])
        x = pool[torch.randint(0, len(pool), (n,), generator=gen)]
    else:
        raise AssertionError(kind)
    return x.reshape(shape).contiguous()


# ------------------------------------------------------------------------------- eager reference
def ref_topk(choice: torch.Tensor, k: int, n_groups: int | None, topk_groups: int | None, mode: str) -> torch.Tensor:
    """Per row: experts by descending score, ties to the lower index (Python sorts: -0.0 == +0.0); with
    groups, only those of the topk_groups best groups (max, or float32 sum of the top two, +inf where
    that is +inf + -inf; ties to the lower group)."""
    rows, E = choice.shape
    G = n_groups or 1
    TG = topk_groups if topk_groups is not None else G
    size = E // G
    out = []
    for r in choice.tolist():
        allowed = range(E)
        if G > 1:
            gscores = []
            for g in range(G):
                member = r[g * size : (g + 1) * size]
                if mode == "max":
                    gscores.append(max(member))
                else:
                    a, b = sorted(member, reverse=True)[:2]
                    with np.errstate(all="ignore"):
                        total = float(np.float32(a) + np.float32(b))
                    gscores.append(a if math.isnan(total) else total)  # +inf + -inf: the group's max, +inf
            best = sorted(range(G), key=lambda g: (-gscores[g], g))
            keep = set(best[:TG])
            allowed = [e for e in range(E) if e // size in keep]
        out.append(sorted(allowed, key=lambda e: (-r[e], e))[:k])
    return torch.tensor(out, dtype=torch.int64).reshape(rows, k)


def ref_tables(ids: torch.Tensor, E: int, capacity: int | None, policy: str, priority: torch.Tensor | None):
    flat = ids.reshape(-1).tolist()
    n = len(flat)
    prio = priority.reshape(-1).tolist() if priority is not None else None
    per: list[list[int]] = [[] for _ in range(E)]
    for s, e in enumerate(flat):
        if 0 <= e < E:
            per[e].append(s)
    kept = [False] * n
    for slots in per:
        if capacity is None:
            chosen = slots
        elif policy == "position":
            chosen = slots[:capacity]
        else:
            assert prio is not None
            chosen = sorted(slots, key=lambda s: (-prio[s], s))[:capacity]
        for s in chosen:
            kept[s] = True
    order = [s for slots in per for s in slots if kept[s]] + [s for s in range(n) if not kept[s]]
    counts = [sum(kept[s] for s in slots) for slots in per]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    invalid = sum(not 0 <= e < E for e in flat)
    return order, counts, offsets, kept, invalid


def check_rust_topk(ids: torch.Tensor, x: torch.Tensor, k: int, G: int | None, TG: int | None, mode: str) -> None:
    if rust_topk is not None:
        want = rust_topk(x, k, G or 1, TG if TG is not None else (G or 1), mode)
        assert torch.equal(ids, want), "differs from the Rust path"


def check_tables(got: cr.RouteTables, ids: torch.Tensor, E: int, capacity, policy, priority) -> None:
    order, counts, offsets, kept, invalid = ref_tables(ids, E, capacity, policy, priority)
    n = ids.numel()
    for name, t, dtype, shape in (("order", got.order, torch.int64, (n,)), ("inverse", got.inverse, torch.int64, (n,)),
                                  ("counts", got.counts, torch.int64, (E,)), ("offsets", got.offsets, torch.int64, (E + 1,)),
                                  ("kept", got.kept, torch.bool, tuple(ids.shape)), ("invalid", got.invalid, torch.int32, (1,)),
                                  ("nan_count", got.nan_count, torch.int32, (1,))):  # fmt: skip
        assert t.dtype == dtype and tuple(t.shape) == shape, (name, t.dtype, t.shape)
    assert got.order.tolist() == order
    assert got.counts.tolist() == counts
    assert got.offsets.tolist() == offsets
    assert got.kept.reshape(-1).tolist() == kept
    assert int(got.invalid) == invalid
    assert torch.equal(got.order[got.inverse], torch.arange(n))
    if rust_tables is not None and invalid == 0:
        want = rust_tables(ids, E, capacity, policy, priority)
        assert all(torch.equal(a, b) for a, b in zip(got[:5], want)), "differs from the Rust path"


def make_ids(T: int, k: int, E: int, seed: int, skew: bool = False, bad: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if skew:  # a few hot experts: capacity drops many slots of them
        ids = torch.minimum(torch.randint(0, E, (T, k), generator=gen), torch.randint(0, max(1, E // 8), (T, k), generator=gen))
    else:
        ids = torch.randint(0, E, (T, k), generator=gen)
    if bad:
        sel = torch.rand(T, k, generator=gen) < bad
        ids[sel] = torch.tensor([-1, E, E + 7, -(2**40)])[torch.randint(0, 4, (int(sel.sum()),), generator=gen)]
    return ids


def make_priority(ids: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "ties":  # few values, -0.0 == +0.0 tie, -inf
        p = torch.randint(0, 3, ids.shape, generator=gen).float() * 0.25
        p[torch.rand(ids.shape, generator=gen) < 0.2] = -0.0
        p[torch.rand(ids.shape, generator=gen) < 0.1] = -math.inf
        return p
    if kind == "signed":  # every sign and exponent
        return torch.randn(ids.shape, generator=gen) * torch.exp2(torch.randint(-60, 60, ids.shape, generator=gen).float())
    return torch.rand(ids.shape, generator=gen)


# ------------------------------------------------------------------------------------------ top-k
TOPK_CASES = [  # (T, E, k, n_groups, topk_groups, mode)
    (1, 1, 1, None, None, "max"),
    (37, 2, 2, None, None, "max"),
    (300, 8, 2, None, None, "max"),
    (2000, 256, 8, None, None, "max"),
    (2000, 256, 8, 8, 4, "top2"),
    (700, 64, 6, 8, 3, "max"),
    (500, 160, 8, 32, 5, "top2"),
    (400, 24, 24, 4, 4, "top2"),  # k = E: the whole row sorted
    (300, 40, 7, 40, 7, "max"),  # groups of one expert
    (200, 300, 5, 3, 1, "top2"),  # E not a multiple of 32; a block of 256 threads takes two experts each
    (64, 1024, 8, 16, 4, "max"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", TOPK_CASES, ids=lambda c: "T{}-E{}-k{}-g{}-{}-{}".format(*c))
def test_route_topk(backend, case, kind):
    T, E, k, G, TG, mode = case
    x = make_scores(kind, (T, E), seed=T + E + KINDS.index(kind))
    ids, nan_count = cr.route_topk(x, k, G, TG, mode, backend=backend)
    assert ids.dtype == torch.int64 and ids.shape == (T, k) and nan_count.dtype == torch.int32 and nan_count.shape == (1,)
    assert torch.equal(ids, ref_topk(x, k, G, TG, mode))
    assert int(nan_count) == 0
    check_rust_topk(ids, x, k, G, TG, mode)


@settings(max_examples=40)
@given(
    T=st.integers(0, 40),
    E=st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16, 32, 33, 64, 96, 128, 256]),
    kind=st.sampled_from(KINDS),
    mode=st.sampled_from(["max", "top2"]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_route_topk_property(backend, T, E, kind, mode, seed, data):
    divisors = [g for g in range(1, E + 1) if E % g == 0 and (mode == "max" or E // g >= 2 or g == 1)]
    G = data.draw(st.sampled_from(divisors))
    TG = data.draw(st.integers(1, G))
    k = data.draw(st.integers(1, min(8, TG * (E // G))))
    x = make_scores(kind, (T, E), seed)
    ids, nan_count = cr.route_topk(x, k, G, TG, mode, backend=backend)
    assert torch.equal(ids, ref_topk(x, k, G, TG, mode)) and int(nan_count) == 0
    check_rust_topk(ids, x, k, G, TG, mode)


def test_route_topk_blocks_take_many_rows(backend, monkeypatch):
    monkeypatch.setattr(cr, "MAX_TOPK_GRID", 3)  # each block walks ~100 rows: shared keys are reused
    for kind in ("ties", "normal"):
        x = make_scores(kind, (301, 96), seed=5)
        for G, TG, mode in ((None, None, "max"), (8, 3, "top2"), (12, 2, "max")):
            ids, _ = cr.route_topk(x, 4, G, TG, mode, backend=backend)
            assert torch.equal(ids, ref_topk(x, 4, G, TG, mode)), (kind, G, mode)


@pytest.mark.parametrize("E", [257, 1024, 1025, 4096])
def test_route_topk_wide_rows(forward, E):
    # the larger instantiations; k up to E (the full descending order of the row)
    x = make_scores("ties", (3, E), seed=E)
    for k in (1, 8, E):
        assert torch.equal(cr.route_topk(x, k, backend=forward)[0], ref_topk(x, k, None, None, "max"))
    if E % 8 == 0:
        assert torch.equal(cr.route_topk(x, 8, 8, 2, "top2", backend=forward)[0], ref_topk(x, 8, 8, 2, "top2"))


def test_route_topk_tie_rules(forward):
    x = torch.tensor([[-0.0, 0.0, 1.0, 1.0, -math.inf, -math.inf]])
    assert cr.route_topk(x, 6, backend=forward)[0].tolist() == [[2, 3, 0, 1, 4, 5]]  # -0.0 == +0.0: by index
    # groups {0,1} {2,3} {4,5} with top2 sums 3, 3, 3: ties to the lower group
    y = torch.tensor([[1.0, 2.0, 2.0, 1.0, 1.5, 1.5]])
    assert cr.route_topk(y, 2, 3, 1, "top2", backend=forward)[0].tolist() == [[1, 0]]
    assert cr.route_topk(y, 2, 3, 2, "top2", backend=forward)[0].tolist() == [[1, 2]]
    # top two +inf and -inf: the sum is NaN, the group scores +inf (its max) and wins
    z = torch.tensor([[-math.inf, math.inf, 5.0, 4.0, 0.0, -1.0]])
    assert cr.route_topk(z, 2, 3, 1, "top2", backend=forward)[0].tolist() == [[1, 0]]
    assert cr.route_topk(z, 3, 3, 2, "top2", backend=forward)[0].tolist() == [[1, 2, 3]]
    assert cr.route_topk(z, 1, 3, 1, "max", backend=forward)[0].tolist() == [[1]]


def test_route_topk_empty(forward):
    ids, nan_count = cr.route_topk(torch.zeros(0, 16), 2, 4, 2, "top2", backend=forward)
    assert ids.shape == (0, 2) and ids.dtype == torch.int64 and nan_count.tolist() == [0]


NAN_BITS = [0x7F80_0001, 0x7FC0_0000, -0x0040_0000, -1]  # smallest positive NaN, canonical, negative ones


def test_route_topk_counts_nan(backend):
    x = make_scores("extremes", (500, 64), seed=11)  # +-inf next to NaN: inf is not NaN
    gen = torch.Generator().manual_seed(3)
    where = torch.rand(500, 64, generator=gen) < 0.03
    bits = torch.tensor(NAN_BITS, dtype=torch.int32)[torch.randint(0, 4, (int(where.sum()),), generator=gen)]
    x.view(torch.int32)[where] = bits
    assert torch.isnan(x).sum() == where.sum() > 0
    for G, TG, mode in ((None, None, "max"), (8, 2, "top2"), (4, 1, "max")):
        ids, nan_count = cr.route_topk(x, 8, G, TG, mode, backend=backend)
        assert int(nan_count) == int(where.sum())
        # the ranking with NaN is unspecified, but every row still gets k distinct experts of kept groups
        assert all(len(set(r)) == 8 and all(0 <= e < 64 for e in r) for r in ids.tolist())
        if G is not None:
            assert all(len({e // (64 // G) for e in r}) <= TG for r in ids.tolist())
    clean = make_scores("extremes", (500, 64), seed=11)
    assert int(cr.route_topk(clean, 8, backend=backend)[1]) == 0


def test_route_topk_bad_input(forward):
    x = torch.randn(4, 8)
    bad = [
        (lambda: cr.route_topk(x, 0, backend=forward), ValueError, "k"),
        (lambda: cr.route_topk(x, 9, backend=forward), ValueError, "k"),
        (lambda: cr.route_topk(x, 5, 4, 2, backend=forward), ValueError, "k"),  # only 4 experts in 2 groups
        (lambda: cr.route_topk(x, True, backend=forward), TypeError, "k"),
        (lambda: cr.route_topk(x, 2, 3, 1, backend=forward), ValueError, "n_groups"),
        (lambda: cr.route_topk(x, 2, 4, 5, backend=forward), ValueError, "topk_groups"),
        (lambda: cr.route_topk(x, 2, 4, 0, backend=forward), ValueError, "topk_groups"),
        (lambda: cr.route_topk(x, 2, 8, 2, "top2", backend=forward), ValueError, "top2"),
        (lambda: cr.route_topk(x, 2, 4, 2, "sum", backend=forward), ValueError, "group_mode"),
        (lambda: cr.route_topk(x.double(), 2, backend=forward), TypeError, "choice"),
        (lambda: cr.route_topk(x[0], 2, backend=forward), ValueError, "choice"),
        (lambda: cr.route_topk(x.t(), 2, backend=forward), ValueError, "contiguous"),
        (lambda: cr.route_topk(torch.zeros(2, 0), 1, backend=forward), ValueError, "E"),
        (lambda: cr.route_topk(torch.zeros(2, 4097), 1, backend=forward), ValueError, "E"),
        (lambda: cr.route_topk(x, 2), ValueError, "CUDA"),
    ]
    for call, exc, match in bad:
        with pytest.raises(exc, match=match):
            call()


# ----------------------------------------------------------------------------------------- tables
TABLE_CASES = [  # (T, k, E, capacity, policy, skew, bad fraction)
    (1, 1, 1, None, "probs", False, 0.0),
    (5, 2, 3, 1, "position", False, 0.0),
    (3000, 8, 256, None, "probs", False, 0.0),
    (3000, 8, 256, 80, "position", True, 0.0),
    (3000, 8, 256, 80, "probs", True, 0.0),
    (2000, 2, 16, 0, "probs", False, 0.0),  # capacity 0: everything dropped
    (2000, 2, 16, 250, "position", False, 0.01),  # out-of-range ids
    (1500, 4, 64, 70, "probs", True, 0.02),
    (800, 3, 7, 10**9, "probs", False, 0.0),  # capacity above every load: dropless
    (400, 8, 1, 1000, "position", False, 0.0),  # one expert
    (1000, 4, 3000, 1, "probs", False, 0.0),  # many experts: two tiles of 3008 positions
    (10, 2, 100_000, 1, "position", False, 0.0),  # E >> T*k: one tile, a table of E + 1 entries
]


@pytest.mark.parametrize("pkind", ["ties", "signed", "uniform"])
@pytest.mark.parametrize("case", TABLE_CASES, ids=lambda c: "T{}-k{}-E{}-C{}-{}-skew{}-bad{}".format(*c))
def test_route_tables(backend, case, pkind):
    T, k, E, cap, policy, skew, bad = case
    seed = T + k + E
    ids = make_ids(T, k, E, seed, skew, bad)
    prio = make_priority(ids, pkind, seed) if policy == "probs" else None
    got = cr.route_tables(ids, E, cap, policy, prio, backend=backend)
    check_tables(got, ids, E, cap, policy, prio)
    assert int(got.nan_count) == 0


@settings(max_examples=40)
@given(
    T=st.integers(0, 300),
    k=st.integers(1, 8),
    E=st.integers(1, 300),
    policy=st.sampled_from(["probs", "position"]),
    pkind=st.sampled_from(["ties", "signed", "uniform"]),
    skew=st.booleans(),
    bad=st.sampled_from([0.0, 0.0, 0.05]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_route_tables_property(backend, T, k, E, policy, pkind, skew, bad, seed, data):
    ids = make_ids(T, k, E, seed, skew, bad)
    cap = data.draw(st.none() | st.integers(0, max(1, 2 * T * k // E)))
    prio = make_priority(ids, pkind, seed) if policy == "probs" else None
    check_tables(cr.route_tables(ids, E, cap, policy, prio, backend=backend), ids, E, cap, policy, prio)


def test_route_tables_match_torch_pipeline(forward):
    # peer check, dropless: the permutation torch users build (stable argsort, bincount, cumsum)
    ids = make_ids(2500, 6, 128, seed=4, skew=True)
    got = cr.route_tables(ids, 128, backend=forward)
    assert torch.equal(got.order, torch.argsort(ids.reshape(-1), stable=True))
    counts = torch.bincount(ids.reshape(-1), minlength=128)
    assert torch.equal(got.counts, counts)
    assert torch.equal(got.offsets, torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)]))
    assert bool(got.kept.all()) and int(got.invalid) == 0


def test_topk_then_tables(backend):
    # the two steps as the router uses them: priority = the chosen experts' scores
    x = make_scores("softmax", (1200, 32), seed=8)
    ids, _ = cr.route_topk(x, 4, 4, 2, "top2", backend=backend)
    prio = torch.gather(x, 1, ids)
    cap = math.ceil(1200 * 4 / 32 * 1.25)
    for policy in ("probs", "position"):
        check_tables(cr.route_tables(ids, 32, cap, policy, prio, backend=backend), ids, 32, cap, policy, prio)


def test_route_tables_empty(forward):
    for shape in ((0, 4), (5, 0)):
        ids = torch.zeros(shape, dtype=torch.int64)
        got = cr.route_tables(ids, 6, 3, "probs", torch.zeros(shape), backend=forward)
        check_tables(got, ids, 6, 3, "probs", torch.zeros(shape))


def test_route_tables_counts_nan_priorities(forward):
    ids = make_ids(600, 4, 16, seed=2, skew=True)
    prio = make_priority(ids, "uniform", 2)
    where = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.05
    prio.view(torch.int32)[where] = torch.tensor(NAN_BITS, dtype=torch.int32)[torch.arange(int(where.sum())) % 4]
    got = cr.route_tables(ids, 16, 40, "probs", prio, backend=forward)
    assert int(got.nan_count) == int(where.sum()) > 0
    # ranking with NaN is unspecified, but the tables stay consistent: capacity respected, a permutation
    assert torch.equal(torch.sort(got.order).values, torch.arange(ids.numel()))
    assert torch.equal(got.order[got.inverse], torch.arange(ids.numel()))
    assert bool((got.counts <= 40).all()) and int(got.kept.sum()) == int(got.offsets[-1])
    want = torch.minimum(torch.bincount(ids.reshape(-1), minlength=16), torch.tensor(40))
    assert torch.equal(got.counts, want)
    assert int(cr.route_tables(ids, 16, 40, "position", prio, backend=forward).nan_count) == 0  # priority unused


def test_route_tables_bad_input(forward):
    ids = torch.zeros(4, 2, dtype=torch.int64)
    p = torch.rand(4, 2)
    bad = [
        (lambda: cr.route_tables(ids.int(), 4, backend=forward), TypeError, "expert_ids"),
        (lambda: cr.route_tables(ids.view(-1), 4, backend=forward), ValueError, "expert_ids"),
        (lambda: cr.route_tables(ids.t(), 4, backend=forward), ValueError, "contiguous"),
        (lambda: cr.route_tables(ids, 0, backend=forward), ValueError, "n_experts"),
        (lambda: cr.route_tables(ids, 4.0, backend=forward), TypeError, "n_experts"),
        (lambda: cr.route_tables(ids, 4, -1, backend=forward), ValueError, "capacity"),
        (lambda: cr.route_tables(ids, 4, 2, "random", p, backend=forward), ValueError, "drop_policy"),
        (lambda: cr.route_tables(ids, 4, 2, "probs", None, backend=forward), ValueError, "priority"),
        (lambda: cr.route_tables(ids, 4, 2, "probs", p.double(), backend=forward), TypeError, "priority"),
        (lambda: cr.route_tables(ids, 4, 2, "probs", p[:3], backend=forward), ValueError, "priority"),
        (lambda: cr.route_tables(ids, 4), ValueError, "CUDA"),
    ]
    for call, exc, match in bad:
        with pytest.raises(exc, match=match):
            call()


# ------------------------------------------------------------------------------- no host sync
def test_no_host_reads_in_the_launch_code(forward, monkeypatch):
    # every way of reading a tensor's value on the host raises: the launch code must not need one
    def refuse(*args, **kwargs):
        raise AssertionError("host read of a tensor value in the launch code")

    x = make_scores("normal", (100, 32), seed=1)
    ids_in = make_ids(100, 4, 32, seed=1, bad=0.05)
    prio = make_priority(ids_in, "ties", 1)
    for name in ("item", "tolist", "numpy", "nonzero", "__bool__", "__int__", "__index__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for name in ("bincount", "nonzero", "unique", "argwhere", "masked_select"):
        monkeypatch.setattr(torch, name, refuse)
    ids, nan_count = cr.route_topk(x, 4, 8, 2, "top2", backend=forward)
    tables = [cr.route_tables(ids_in, 32, c, p, prio, backend=forward) for c in (None, 7) for p in ("probs", "position")]
    monkeypatch.undo()
    assert torch.equal(ids, ref_topk(x, 4, 8, 2, "top2"))
    for got, (c, p) in zip(tables, [(None, "probs"), (None, "position"), (7, "probs"), (7, "position")]):
        check_tables(got, ids_in, 32, c, p, prio)


def test_loader_source_and_name_expressions():
    from sparsekit import _cuda

    assert _cuda.kernel_source("route").startswith('#line 1 "route.cu"\n')
    assert cr.NAME_EXPRESSIONS == tuple(f"route_topk<{s}>" for s in cr.TOPK_SIZES)
    assert cr.MAX_EXPERTS == max(cr.TOPK_SIZES)


# ---------------------------------------------------------------------------------- on a real GPU
def _have_gpu() -> bool:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _have_gpu(), reason="needs a CUDA device and cupy")
def test_on_gpu_equals_reference():
    # the CupyBackend side (DLPack, torch's stream, the cupy argument types), deselected by default (-m gpu)
    x = make_scores("ties", (3000, 256), seed=21)
    ids, nan_count = cr.route_topk(x.cuda(), 8, 8, 4, "top2")
    assert ids.device.type == "cuda" and torch.equal(ids.cpu(), ref_topk(x, 8, 8, 4, "top2")) and int(nan_count) == 0
    ids = make_ids(3000, 8, 256, seed=22, skew=True, bad=0.01)
    prio = make_priority(ids, "ties", 22)
    for cap, policy in ((None, "probs"), (60, "position"), (60, "probs")):
        got = cr.route_tables(ids.cuda(), 256, cap, policy, prio.cuda())
        assert all(t.device.type == "cuda" for t in got)
        check_tables(cr.RouteTables(*(t.cpu() for t in got)), ids, 256, cap, policy, prio)


# ------------------------------------------------------------------------------ at the scale
@pytest.mark.slow
def test_full_scale_route(forward):
    # T = 262144 tokens, E = 256, k = 8 (2M slots, ~7300 warp tiles), tie-heavy; vectorised torch references
    T, E, k = 262144, 256, 8
    x = make_scores("ties", (T, E), seed=99)
    ids, nan_count = cr.route_topk(x, k, backend=forward)
    assert torch.equal(ids, torch.sort(x + 0.0, dim=1, descending=True, stable=True).indices[:, :k])
    assert int(nan_count) == 0
    flat = ids.reshape(-1)
    got = cr.route_tables(ids, E, backend=forward)
    assert torch.equal(got.order, torch.argsort(flat, stable=True))
    assert torch.equal(got.counts, torch.bincount(flat, minlength=E))
    cap = T * k // E // 2
    got = cr.route_tables(ids, E, cap, "position", backend=forward)
    by_expert = torch.argsort(flat, stable=True)
    starts = torch.cumsum(torch.bincount(flat, minlength=E), 0) - torch.bincount(flat, minlength=E)
    rank = torch.empty_like(flat)
    rank[by_expert] = torch.arange(flat.numel()) - starts[flat[by_expert]]
    kept = rank < cap
    assert torch.equal(got.kept.reshape(-1), kept)
    assert torch.equal(got.order, torch.argsort(torch.where(kept, flat, E), stable=True))
    assert torch.equal(got.order[got.inverse], torch.arange(flat.numel()))
    prio = torch.gather(x, 1, ids)  # the chosen scores: many ties, -inf among them
    got = cr.route_tables(ids, E, cap, "probs", prio, backend=forward)
    by_prio = torch.sort(prio.reshape(-1) + 0.0, descending=True, stable=True).indices
    by_expert = by_prio[torch.argsort(flat[by_prio], stable=True)]  # expert, then priority, then slot
    rank[by_expert] = torch.arange(flat.numel()) - starts[flat[by_expert]]
    kept = rank < cap
    assert torch.equal(got.kept.reshape(-1), kept)
    assert torch.equal(got.order, torch.argsort(torch.where(kept, flat, E), stable=True))
