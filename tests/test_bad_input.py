"""Bad input gets a clear Python error naming the argument: never a panic, hang or wrong answer."""

from __future__ import annotations

import math

import pytest
import torch

import sparsekit
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
