"""The public switch ``sparsekit.testing.simulated_cuda``: public ops given CPU tensors take their CUDA
launch code on the CPU shim and must give exactly what the Rust path gives (and an independent reference),
raise the same errors, and synchronise the host as often as a GPU run would (once per call)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsekit
from reference import block_topk_mask as ref_block
from reference import global_topk_masks as ref_global
from reference import same_tensor
from sparsekit.testing import simulated_cuda
from strategies import DTYPES, float_tensors

SCHEDULES = [("forward", 0), ("reverse", 0), ("random", 5)]


def _syncs(sim) -> int:
    return sum(b.syncs for b in sim.backends.values())


@pytest.mark.parametrize(("schedule", "seed"), SCHEDULES)
def test_every_selection_op_matches_the_rust_path(schedule, seed):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(64, 96, generator=gen)
    x[::7] = 0.5  # ties
    parts = [x[:10], torch.empty(0), x[10:]]
    q = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    cpu = (
        sparsekit.topk_mask(x, 100),
        sparsekit.global_topk_masks(parts, density=0.2, by="value"),
        sparsekit.nm_mask(x, 2, 4, dim=0),
        sparsekit.block_topk_mask(x, (8, 16), k=5, norm="l1", return_block_mask=True),
        sparsekit.kth_largest(x, 17, by="abs"),
        sparsekit.quantile(x, q, interpolation="midpoint"),
        sparsekit.quantile(x, 0.3),
    )
    with simulated_cuda(schedule=schedule, seed=seed):
        sim = (
            sparsekit.topk_mask(x, 100),
            sparsekit.global_topk_masks(parts, density=0.2, by="value"),
            sparsekit.nm_mask(x, 2, 4, dim=0),
            sparsekit.block_topk_mask(x, (8, 16), k=5, norm="l1", return_block_mask=True),
            sparsekit.kth_largest(x, 17, by="abs"),
            sparsekit.quantile(x, q, interpolation="midpoint"),
            sparsekit.quantile(x, 0.3),
        )
    assert torch.equal(sim[0], cpu[0])
    assert all(torch.equal(a, b) for a, b in zip(sim[1], cpu[1]))
    assert torch.equal(sim[2], cpu[2])
    assert torch.equal(sim[3][0], cpu[3][0]) and torch.equal(sim[3][1], cpu[3][1])
    for got, want in zip(sim[4:], cpu[4:]):
        assert same_tensor(got, want)
    assert same_tensor(sim[5], torch.quantile(x, q, interpolation="midpoint"))


@settings(max_examples=25, deadline=None)
@given(x=float_tensors(min_size=1, max_size=300), data=st.data())
def test_masks_and_order_statistics_property(x, data):
    n = x.numel()
    k = data.draw(st.integers(0, n))
    rank = data.draw(st.integers(1, n))
    by = data.draw(st.sampled_from(["abs", "value"]))
    with simulated_cuda():
        mask = sparsekit.topk_mask(x, k, by=by)
        kth = sparsekit.kth_largest(x, rank, by=by)
    assert torch.equal(mask, ref_global([x], k, by)[0])
    assert same_tensor(kth, sparsekit.kth_largest(x, rank, by=by))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_block_norms_near_ties_pick_the_same_blocks(dtype, norm):
    """Random floats in permuted order within equal-valued blocks: sums differ only by rounding, so any
    difference in summation order between the two paths shows up as different blocks."""
    gen = torch.Generator().manual_seed(21)
    for trial in range(12):
        bh, bw = [(4, 4), (3, 5), (8, 2), (1, 7)][trial % 4]
        base = torch.randn(bh * bw, generator=gen, dtype=torch.float64).to(dtype)
        blocks = [base[torch.randperm(bh * bw, generator=gen)].reshape(bh, bw) for _ in range(3)]
        blocks.append(torch.randn(bh, bw, generator=gen).to(dtype) * 0.1)
        x = torch.cat([torch.cat(blocks[:2], 1), torch.cat(blocks[2:], 1)], 0)
        want = sparsekit.block_topk_mask(x, (bh, bw), k=1 + trial % 3, norm=norm, return_block_mask=True)
        with simulated_cuda():
            got = sparsekit.block_topk_mask(x, (bh, bw), k=1 + trial % 3, norm=norm, return_block_mask=True)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), (trial, dtype, norm)
        if norm == "max":  # order-free: the reference (torch amax) must agree too
            assert torch.equal(want[1], ref_block(x, bh, bw, 1 + trial % 3, norm)[1])


def test_block_topk_matches_reference_on_exact_sums():
    x = torch.randint(-4, 5, (16, 24), generator=torch.Generator().manual_seed(3)).float()
    for norm in ("l1", "l2", "max"):
        with simulated_cuda(schedule="reverse"):
            got = sparsekit.block_topk_mask(x, (4, 4), k=7, norm=norm, return_block_mask=True)
        want = ref_block(x, 4, 4, 7, norm)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_errors_are_the_same_as_on_the_cpu_path():
    x = torch.randn(5000)
    x[4321] = math.nan
    with simulated_cuda():
        with pytest.raises(ValueError, match=r"tensors\[1\] contains NaN"):
            sparsekit.global_topk_masks([torch.ones(3), x], k=4)
        with pytest.raises(ValueError, match="NaN"):
            sparsekit.kth_largest(x, 3)
        with pytest.raises(ValueError, match="NaN"):
            sparsekit.quantile(x, 0.5)
        with pytest.raises(ValueError, match="NaN"):
            sparsekit.block_topk_mask(x[:4900].reshape(70, 70), (7, 7), k=3)
        with pytest.raises(ValueError, match="NaN"):
            sparsekit.nm_mask(x, 2, 4)
        with pytest.raises(ValueError, match=r"k must be in \[0, 3\]"):
            sparsekit.topk_mask(torch.ones(3), 4)
    with pytest.raises(ValueError, match=r"tensors\[1\] contains NaN"):
        sparsekit.global_topk_masks([torch.ones(3), x], k=4)


def test_one_host_sync_per_call():
    x = torch.randn(20_000)
    with simulated_cuda() as sim:
        sparsekit.topk_mask(x, 500)
        assert _syncs(sim) == 1
        sparsekit.global_topk_masks([x, x[:100]], k=10)
        assert _syncs(sim) == 2
        sparsekit.kth_largest(x, 5)
        assert _syncs(sim) == 3
        sparsekit.quantile(x, torch.linspace(0, 1, 9))  # nine levels, eighteen ranks: still one sync
        assert _syncs(sim) == 4
        sparsekit.nm_mask(x, 1, 4)
        assert _syncs(sim) == 5


def test_out_buffers_are_reused():
    x = torch.randn(32, 64)
    buf = torch.ones(32, 64, dtype=torch.bool)
    with simulated_cuda():
        got = sparsekit.topk_mask(x, 0, out=buf)
        assert got is buf and not buf.any()
        got = sparsekit.nm_mask(x, 1, 4, out=buf)
        assert got is buf and torch.equal(buf, sparsekit.nm_mask(x, 1, 4))
        got = sparsekit.block_topk_mask(x, (8, 8), k=3, out=buf)
        assert got is buf and torch.equal(buf, sparsekit.block_topk_mask(x, (8, 8), k=3))


def test_nesting_and_reset():
    from sparsekit._cuda import ACTIVE_SIMULATION

    assert ACTIVE_SIMULATION.get() is None
    with simulated_cuda(schedule="reverse") as outer:
        with simulated_cuda(schedule="random", seed=2) as inner:
            assert ACTIVE_SIMULATION.get() is inner
        assert ACTIVE_SIMULATION.get() is outer
    assert ACTIVE_SIMULATION.get() is None


def test_bad_switch_arguments():
    with pytest.raises(ValueError, match="schedule"):
        with simulated_cuda(schedule="sideways"):
            pass
    with pytest.raises(ValueError, match="threads"):
        with simulated_cuda(threads=0):
            pass
    with pytest.raises(TypeError, match="seed"):
        with simulated_cuda(seed=1.5):  # type: ignore[arg-type]
            pass


def test_many_quantile_levels_share_passes_across_batches():
    """More ranks than one radix_hist_multi launch takes (1024): the batches must agree with torch."""
    x = torch.randn(3000, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    x[::5] = 0.25  # ties shared by many ranks
    q = torch.linspace(0, 1, 700, dtype=torch.float64)
    with simulated_cuda() as sim:
        got = sparsekit.quantile(x, q)
        assert _syncs(sim) == 1
    assert same_tensor(got, torch.quantile(x, q))
