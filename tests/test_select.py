"""The selection API against independent references (tests/reference.py, torch), with hypothesis."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparsekit
from reference import block_topk_mask as ref_block
from reference import global_topk_masks as ref_global
from reference import nm_mask as ref_nm
from reference import same_tensor
from strategies import DTYPES, float_tensors

BY = st.sampled_from(["abs", "value"])


# ------------------------------------------------------------------------------------ top-k masks
@given(x=float_tensors(), by=BY, data=st.data())
def test_topk_mask_matches_stable_sort(x, by, data):
    k = data.draw(st.integers(0, x.numel()))
    mask = sparsekit.topk_mask(x, k, by=by)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    assert int(mask.sum()) == k
    assert torch.equal(mask, ref_global([x], k, by)[0])


@given(
    dtype=st.sampled_from(DTYPES),
    sizes=st.lists(st.integers(0, 60), min_size=0, max_size=6),
    by=BY,
    data=st.data(),
)
def test_global_topk_equals_topk_on_concatenation(dtype, sizes, by, data):
    tensors = [data.draw(float_tensors(dtype=dtype, shape=(s,))) for s in sizes]
    n = sum(sizes)
    k = data.draw(st.integers(0, n))
    masks = sparsekit.global_topk_masks(tensors, k=k, by=by)
    assert [m.shape for m in masks] == [t.shape for t in tensors]
    expected = ref_global(tensors, k, by)
    assert all(torch.equal(a, b) for a, b in zip(masks, expected))
    if tensors:
        whole = sparsekit.topk_mask(torch.cat(tensors), k, by=by)
        assert torch.equal(torch.cat(masks), whole)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "ties", "narrow"])
def test_large_inputs_take_every_radix_path(dtype, kind):
    """Big enough for full histogram passes, gathers, and (narrow) a second histogram pass."""
    gen = torch.Generator().manual_seed(1)
    n = 600_000
    if kind == "normal":
        x = torch.randn(n, generator=gen, dtype=torch.float64)
    elif kind == "ties":
        x = torch.randint(-3, 4, (n,), generator=gen).to(torch.float64) * 0.5
    else:
        x = 1.0 + torch.rand(n, generator=gen, dtype=torch.float64) * 1e-3
    x = x.to(dtype)
    parts = [x[:1], x[1:250_001], x[250_001:250_001], x[250_001:]]
    for by in ("abs", "value"):
        for k in (1, 12_345, n // 3, n - 1):
            got = sparsekit.global_topk_masks(parts, k=k, by=by)
            want = ref_global(parts, k, by)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (by, k)


def test_density_rounds_to_nearest_and_k_density_exclusive():
    x = torch.arange(10, dtype=torch.float32)
    assert int(sparsekit.topk_mask(x, density=0.25).sum()) == 3  # 2.5 rounds up
    assert int(sparsekit.topk_mask(x, density=0.0).sum()) == 0
    assert int(sparsekit.topk_mask(x, density=1.0).sum()) == 10
    with pytest.raises(ValueError, match="exactly one of k or density"):
        sparsekit.topk_mask(x, 3, density=0.3)
    with pytest.raises(ValueError, match="exactly one of k or density"):
        sparsekit.global_topk_masks([x])


def test_non_contiguous_and_requires_grad_inputs():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(64, 48, generator=gen, requires_grad=True)
    x = base.t()[::2]
    assert not x.is_contiguous()
    mask = sparsekit.topk_mask(x, 100)
    assert torch.equal(mask, ref_global([x.detach()], 100, "abs")[0])


def test_cpu_input_is_read_in_place():
    from sparsekit.select import _flat_bits

    x = torch.randn(1000)
    assert np.shares_memory(_flat_bits(x), x.numpy())
    h = torch.randn(1000).to(torch.bfloat16)
    assert _flat_bits(h).ctypes.data == h.data_ptr()


# ------------------------------------------------------------------------------ order statistics
@given(x=float_tensors(min_size=1), data=st.data())
def test_kth_largest_matches_torch_topk(x, data):
    k = data.draw(st.integers(1, x.numel()))
    expected = torch.topk(x.reshape(-1).to(torch.float64), k).values[-1].to(x.dtype)
    assert same_tensor(sparsekit.kth_largest(x, k), expected, zero_sign=False)  # topk ties -0.0 with +0.0


@given(x=float_tensors(min_size=1), data=st.data())
def test_kth_largest_by_abs(x, data):
    k = data.draw(st.integers(1, x.numel()))
    expected = torch.topk(x.abs().reshape(-1).double(), k).values[-1].to(x.dtype)
    assert same_tensor(sparsekit.kth_largest(x, k, by="abs"), expected)


INTERP = st.sampled_from(["linear", "lower", "higher", "midpoint", "nearest"])
FINITE = st.floats(allow_nan=False, allow_infinity=False, width=32, min_value=-1e6, max_value=1e6)


@given(
    dtype=st.sampled_from([torch.float32, torch.float64]),
    values=st.lists(FINITE | st.sampled_from([0.0, 1.0, -1.0]), min_size=1, max_size=300),
    q=st.floats(0.0, 1.0) | st.sampled_from([0.0, 0.5, 1.0, 0.1, 0.9]),
    interpolation=INTERP,
)
def test_quantile_matches_torch_bit_for_bit(dtype, values, q, interpolation):
    x = torch.tensor(values, dtype=dtype)
    expected = torch.quantile(x, q, interpolation=interpolation)
    assert same_tensor(sparsekit.quantile(x, q, interpolation=interpolation), expected, zero_sign=False)


@given(
    dtype=st.sampled_from([torch.float32, torch.float64]),
    values=st.lists(FINITE, min_size=1, max_size=200),
    levels=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5),
    interpolation=INTERP,
)
def test_quantile_tensor_levels(dtype, values, levels, interpolation):
    x = torch.tensor(values, dtype=dtype).reshape(-1, 1)
    q = torch.tensor(levels, dtype=dtype)
    got = sparsekit.quantile(x, q, interpolation=interpolation)
    expected = torch.quantile(x.flatten(), q, interpolation=interpolation)
    assert same_tensor(got, expected, zero_sign=False)


def test_quantile_large_float32_bit_exact_at_torch_limit():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1 << 22, generator=gen)
    for q in (0.0, 0.1, 0.5, 0.9, 0.999, 1.0):
        assert same_tensor(sparsekit.quantile(x, q), torch.quantile(x, q))


def test_quantile_beyond_2_pow_24():
    n = (1 << 24) + 1  # torch.quantile before 2.x refused more than 2**24 elements
    x = torch.randn(n, generator=torch.Generator().manual_seed(4))
    median = torch.kthvalue(x, (n + 1) // 2).values  # rank (n-1)/2 is an integer: no interpolation
    assert same_tensor(sparsekit.quantile(x, 0.5), median)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantile_half_precision_uses_exact_order_statistics(dtype):
    x = torch.randn(10_001, generator=torch.Generator().manual_seed(5)).to(dtype)
    assert same_tensor(sparsekit.quantile(x, 0.5), torch.sort(x.float()).values[5000].to(dtype))
    lower = torch.quantile(x.float(), 0.25, interpolation="lower").to(dtype)
    assert same_tensor(sparsekit.quantile(x, 0.25, interpolation="lower"), lower)


# -------------------------------------------------------------------------------------- N:M masks
@given(
    dtype=st.sampled_from(DTYPES),
    nm=st.sampled_from([(2, 4), (1, 4), (0, 2), (4, 4), (3, 8), (1, 1), (5, 40)]),
    outer=st.integers(0, 3),
    groups=st.integers(1, 3),
    inner=st.integers(1, 3),
    dim_first=st.booleans(),
    by=BY,
    data=st.data(),
)
def test_nm_mask_matches_per_group_sort(dtype, nm, outer, groups, inner, dim_first, by, data):
    n, m = nm
    shape = (groups * m, outer, inner) if dim_first else (outer, groups * m, inner)
    dim = 0 if dim_first else 1
    x = data.draw(float_tensors(dtype=dtype, shape=shape))
    mask = sparsekit.nm_mask(x, n, m, dim=dim, by=by)
    assert torch.equal(mask, ref_nm(x, n, m, dim, by))


def test_nm_mask_2_4_default_last_dim():
    x = torch.tensor([[4.0, -1.0, 3.0, 0.5, 1.0, 1.0, 1.0, 1.0]])
    assert sparsekit.nm_mask(x, 2, 4).tolist() == [[True, False, True, False, True, True, False, False]]


# ---------------------------------------------------------------------------------- block masks
@given(
    dtype=st.sampled_from(DTYPES),
    block=st.sampled_from([(1, 1), (2, 2), (1, 4), (3, 2)]),
    grid=st.tuples(st.integers(0, 4), st.integers(1, 4)),
    norm=st.sampled_from(["l1", "l2", "max"]),
    data=st.data(),
)
def test_block_topk_matches_reference(dtype, block, grid, norm, data):
    bh, bw = block
    shape = (grid[0] * bh, grid[1] * bw)
    # Small integers: every norm is exact in float64, whatever the summation order.
    values = data.draw(st.lists(st.integers(-3, 3), min_size=math.prod(shape), max_size=math.prod(shape)))
    x = torch.tensor(values, dtype=torch.float64).to(dtype).reshape(shape)
    k = data.draw(st.integers(0, grid[0] * grid[1]))
    mask, block_mask = sparsekit.block_topk_mask(x, block, k=k, norm=norm, return_block_mask=True)
    want_mask, want_blocks = ref_block(x, bh, bw, k, norm)
    assert torch.equal(block_mask, want_blocks) and torch.equal(mask, want_mask)


def test_block_topk_density_on_random_floats():
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(6))
    mask = sparsekit.block_topk_mask(x, (8, 8), density=0.25)
    assert int(mask.sum()) == 24 * 64
    assert torch.equal(mask, ref_block(x, 8, 8, 24, "l2")[0])


def test_out_buffers_are_written_and_returned():
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(9))
    buf = torch.ones(16, 32, dtype=torch.bool)
    assert sparsekit.topk_mask(x, 0, out=buf) is buf and not buf.any()
    assert sparsekit.topk_mask(x, 50, out=buf) is buf and torch.equal(buf, ref_global([x], 50, "abs")[0])
    assert sparsekit.nm_mask(x, 2, 4, out=buf) is buf and torch.equal(buf, ref_nm(x, 2, 4, -1, "abs"))
    assert sparsekit.block_topk_mask(x, (4, 8), k=3, out=buf) is buf
    assert torch.equal(buf, ref_block(x, 4, 8, 3, "l2")[0])
    bufs = [torch.ones(16, 32, dtype=torch.bool), torch.zeros(7, dtype=torch.bool)]
    y = torch.randn(7)
    got = sparsekit.global_topk_masks([x, y], k=20, out=bufs)
    assert got[0] is bufs[0] and got[1] is bufs[1]
    want = ref_global([x, y], 20, "abs")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="out must be a sequence of 2"):
        sparsekit.global_topk_masks([x, y], k=20, out=bufs[:1])
