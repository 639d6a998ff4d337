"""Bad input gets a clear Python error naming the argument: never a panic, hang or wrong answer."""

from __future__ import annotations

import math

import pytest
import torch

import sparsekit
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import same_tensor

X = torch.tensor([3.0, -1.0, 2.0, 0.5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("position", [0, 3, 100_000])
def test_nan_is_refused_everywhere(dtype, position):
    x = torch.arange(100_001, dtype=torch.float64).to(dtype)
    x[position] = math.nan
    calls = [
        lambda: sparsekit.topk_mask(x, 5),
        lambda: sparsekit.topk_mask(x, 0),
        lambda: sparsekit.global_topk_masks([X.to(dtype), x], k=3),
        lambda: sparsekit.kth_largest(x, 1),
    ]
    if position < 100_000:  # these two see the first 100_000 elements only
        calls.append(lambda: sparsekit.nm_mask(x[:100_000], 2, 4))
        calls.append(lambda: sparsekit.block_topk_mask(x[:100_000].reshape(100, 1000), (10, 10), k=1))
    for call in calls:
        with pytest.raises(ValueError, match="NaN"):
            call()
    if dtype in (torch.float32, torch.float64):
        with pytest.raises(ValueError, match="NaN"):
            sparsekit.quantile(x, 0.5)


def test_infinities_are_ordinary_extremes():
    x = torch.tensor([1.0, math.inf, -math.inf, 0.0])
    assert sparsekit.topk_mask(x, 2).tolist() == [False, True, True, False]
    assert sparsekit.topk_mask(x, 1, by="value").tolist() == [False, True, False, False]
    assert same_tensor(sparsekit.kth_largest(x, 4), torch.tensor(-math.inf))
    assert same_tensor(sparsekit.quantile(x, 1.0, interpolation="higher"), torch.tensor(math.inf))
    # linear interpolation between two infinities is NaN in torch too (inf + 0 * (inf - inf)).
    for q in (0.0, 0.5, 0.9, 1.0):
        assert same_tensor(sparsekit.quantile(x, q), torch.quantile(x, q))


def test_empty_tensors():
    e = torch.empty(0, 3)
    assert sparsekit.topk_mask(e, 0).shape == (0, 3)
    assert sparsekit.global_topk_masks([], k=0) == []
    with pytest.raises(ValueError, match=r"k must be in \[0, 0\]"):
        sparsekit.topk_mask(e, 1)
    with pytest.raises(ValueError, match=r"k must be in \[1, 0\]"):
        sparsekit.kth_largest(e, 1)
    with pytest.raises(ValueError, match="empty"):
        sparsekit.quantile(e, 0.5)


@pytest.mark.parametrize("k", [-1, 5, 10**20])
def test_k_out_of_range(k):
    with pytest.raises(ValueError, match=r"k must be in \[0, 4\]"):
        sparsekit.topk_mask(X, k)
    with pytest.raises(ValueError, match=r"k must be in \[0, 4\]"):
        sparsekit.global_topk_masks([X], k=k)


@pytest.mark.parametrize("k", [0, -2, 5])
def test_kth_largest_k_out_of_range(k):
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\]"):
        sparsekit.kth_largest(X, k)


@pytest.mark.parametrize("k", [1.5, True, "3", None])
def test_k_wrong_type(k):
    with pytest.raises((TypeError, ValueError), match="k"):
        sparsekit.topk_mask(X, k)


@pytest.mark.parametrize("density", [-0.1, 1.5, math.nan, math.inf])
def test_density_out_of_range(density):
    with pytest.raises(ValueError, match="density"):
        sparsekit.topk_mask(X, density=density)
    with pytest.raises(ValueError, match="density"):
        sparsekit.block_topk_mask(torch.ones(4, 4), (2, 2), density=density)


@pytest.mark.parametrize("q", [-0.01, 1.01, math.nan])
def test_quantile_level_out_of_range(q):
    with pytest.raises(ValueError, match="q"):
        sparsekit.quantile(X, q)
    with pytest.raises(ValueError, match="q"):
        sparsekit.quantile(X, torch.tensor([0.5, q]))


def test_quantile_bad_arguments():
    with pytest.raises(ValueError, match="interpolation"):
        sparsekit.quantile(X, 0.5, interpolation="cubic")
    with pytest.raises(ValueError, match="q must be"):
        sparsekit.quantile(X, torch.tensor([[0.5]]))
    with pytest.raises(TypeError, match="q must be"):
        sparsekit.quantile(X, "0.5")


@pytest.mark.parametrize(("n", "m", "message"), [(3, 2, r"n must be in \[0, m=2\]"), (-1, 4, "n must be"), (1, 0, "m must be at least 1"), (1, 3, "does not divide")])
def test_nm_bad_n_m(n, m, message):
    with pytest.raises(ValueError, match=message):
        sparsekit.nm_mask(torch.ones(2, 8), n, m)


def test_nm_bad_dim_and_scalar():
    with pytest.raises(ValueError, match="dim 2 is out of range"):
        sparsekit.nm_mask(torch.ones(2, 8), 2, 4, dim=2)
    with pytest.raises(ValueError, match="at least one dimension"):
        sparsekit.nm_mask(torch.tensor(1.0), 1, 1)


def test_block_bad_shapes():
    with pytest.raises(ValueError, match="does not divide"):
        sparsekit.block_topk_mask(torch.ones(6, 8), (4, 4), k=1)
    with pytest.raises(ValueError, match="2-D"):
        sparsekit.block_topk_mask(torch.ones(2, 2, 2), (1, 1), k=1)
    with pytest.raises(ValueError, match="positive"):
        sparsekit.block_topk_mask(torch.ones(4, 4), (0, 2), k=1)
    with pytest.raises(TypeError, match="pair"):
        sparsekit.block_topk_mask(torch.ones(4, 4), 2, k=1)
    with pytest.raises(ValueError, match="norm"):
        sparsekit.block_topk_mask(torch.ones(4, 4), (2, 2), k=1, norm="l3")
    with pytest.raises(ValueError, match=r"k must be in \[0, 4\]"):
        sparsekit.block_topk_mask(torch.ones(4, 4), (2, 2), k=5)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8])
def test_unsupported_dtype(dtype):
    with pytest.raises(TypeError, match="dtype"):
        sparsekit.topk_mask(torch.ones(4, dtype=dtype), 1)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="torch.Tensor"):
        sparsekit.topk_mask([1.0, 2.0], 1)
    with pytest.raises(TypeError, match="sequence"):
        sparsekit.global_topk_masks(X, k=1)
    with pytest.raises(TypeError, match=r"tensors\[1\]"):
        sparsekit.global_topk_masks([X, "no"], k=1)


def test_mixed_dtypes_and_devices():
    with pytest.raises(TypeError, match="one dtype"):
        sparsekit.global_topk_masks([X, X.double()], k=1)
    with pytest.raises(ValueError, match="device"):
        sparsekit.global_topk_masks([X, X.to("meta")], k=1)


def test_bad_by():
    with pytest.raises(ValueError, match="by must be"):
        sparsekit.topk_mask(X, 1, by="magnitude")


def test_core_rejects_what_slips_past_python():
    """The native layer re-checks: wrong lengths, dtypes and tags raise, never crash."""
    import numpy as np

    from sparsekit import _core

    x = np.ones(4, dtype=np.float32)
    with pytest.raises(ValueError, match="mask has 3 elements, expected 4"):
        _core.topk_masks([x], [np.zeros(3, dtype=bool)], "float32", 1, "abs")
    with pytest.raises(TypeError, match="float32"):
        _core.topk_masks([x.astype(np.float64)], [np.zeros(4, dtype=bool)], "float32", 1, "abs")
    with pytest.raises(TypeError, match="unsupported dtype"):
        _core.topk_masks([x], [np.zeros(4, dtype=bool)], "int8", 1, "abs")
    with pytest.raises(ValueError, match="k must be"):
        _core.topk_masks([x], [np.zeros(4, dtype=bool)], "float32", 9, "abs")
    with pytest.raises(ValueError, match="rank must be"):
        _core.kth_values([x], "float32", [0], "value")
    with pytest.raises(ValueError, match="does not divide"):
        _core.nm_mask(x, np.zeros(4, dtype=bool), "float32", 4, 1, 1, 3, "abs")
    with pytest.raises(ValueError, match="does not divide"):
        _core.block_topk_mask(x, np.zeros(4, dtype=bool), np.zeros(1, dtype=bool), "float32", (2, 2), (3, 2), 1, "l2")
    with pytest.raises(OverflowError):
        _core.topk_masks([x], [np.zeros(4, dtype=bool)], "float32", -1, "abs")


U64 = st.integers(0, 2**64 - 1)


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(0, 64),
    length=U64,
    inner=U64,
    n=U64,
    m=U64,
    shape=st.tuples(U64, U64),
    block=st.tuples(U64, U64),
    k=U64,
    ranks=st.lists(U64, max_size=3),
    stride=st.integers(1, 3),
)
def test_native_layer_never_panics_on_absurd_sizes(size, length, inner, n, m, shape, block, k, ranks, stride):
    """Any size, shape, count or stride reaching the binding raises a ValueError/TypeError (or succeeds);
    a PanicException (a BaseException, not an Exception) would escape this ``except Exception``."""
    import numpy as np

    from sparsekit import _core

    x = np.arange(size * stride, dtype=np.float32)[::stride]
    out = np.zeros(size * stride, dtype=bool)[::stride]
    calls = [
        lambda: _core.nm_mask(x, out, "float32", length, inner, n, m, "abs"),
        lambda: _core.block_topk_mask(x, out, np.zeros(size, dtype=bool), "float32", shape, block, k, "l1"),
        lambda: _core.topk_masks([x, x], [out, out], "float32", k, "value"),
        lambda: _core.kth_values([x], "float32", ranks, "abs"),
    ]
    for call in calls:
        try:
            call()
        except (ValueError, TypeError, OverflowError):
            pass


def test_set_num_threads_refuses_absurd_counts():
    from sparsekit import _core

    with pytest.raises(ValueError, match=r"\[0, 1024\]"):
        sparsekit.set_num_threads(10**6)
    with pytest.raises(ValueError, match="thread count"):
        _core.set_num_threads(10**6)  # the native layer checks too
    sparsekit.topk_mask(X, 1)  # the pool still works


def test_misaligned_contiguous_tensor_is_copied():
    data = bytearray(4 * 1001)
    x = torch.frombuffer(data, dtype=torch.float32, offset=1, count=1000)
    x.copy_(torch.randn(1000, generator=torch.Generator().manual_seed(2)))
    assert x.is_contiguous() and x.data_ptr() % 4
    aligned = x.clone()
    assert torch.equal(sparsekit.topk_mask(x, 10), sparsekit.topk_mask(aligned, 10))
    assert same_tensor(sparsekit.quantile(x, 0.3), sparsekit.quantile(aligned, 0.3))
    assert torch.equal(sparsekit.nm_mask(x, 2, 4), sparsekit.nm_mask(aligned, 2, 4))


def test_quantile_range_is_checked_before_rounding():
    for q in (1.00000001, -1e-50):
        with pytest.raises(ValueError, match=repr(q).replace(".", r"\.").replace("-", r"\-")):
            sparsekit.quantile(X, q)
        with pytest.raises(ValueError, match="q values must be in"):
            sparsekit.quantile(X, torch.tensor([q], dtype=torch.float64))
        with pytest.raises(RuntimeError):
            torch.quantile(X, q)  # torch refuses them too


def test_block_k_error_counts_blocks():
    with pytest.raises(ValueError, match=r"k must be in \[0, 4\] \(number of blocks\)"):
        sparsekit.block_topk_mask(torch.ones(4, 4), (2, 2), k=5)


@pytest.mark.parametrize("bad", [torch.zeros(4, dtype=torch.int8), torch.zeros(5, dtype=torch.bool), torch.zeros(8, dtype=torch.bool)[::2]])
def test_bad_out_buffers(bad):
    with pytest.raises((TypeError, ValueError), match="out"):
        sparsekit.topk_mask(X, 1, out=bad)
    with pytest.raises((TypeError, ValueError), match="out"):
        sparsekit.nm_mask(X, 1, 2, out=bad)
