"""Proof 2 for the CUDA kernels without a GPU: the launch code users run (sparsekit._cuda_select) drives
the kernels of cuda/select.cu on the CPU through the fiber shim, and must agree exactly with an
independent reference and with the Rust path, under several thread schedules."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsekit
from reference import global_topk_masks as ref_global
from reference import nm_mask as ref_nm
from sparsekit import _cuda_select as cs
from strategies import DTYPES, float_tensors

SCHEDULES = [("forward", 0), ("reverse", 0), ("random", 1)]


@pytest.fixture(scope="module", params=SCHEDULES, ids=[s for s, _ in SCHEDULES])
def backend(request):
    schedule, seed = request.param
    return cs.sim_backend(schedule=schedule, seed=seed)


@pytest.fixture(scope="module")
def forward():
    return cs.sim_backend()


def _data(kind: str, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(n, generator=gen, dtype=torch.float64)
    elif kind == "ties":
        x = torch.randint(-3, 4, (n,), generator=gen).to(torch.float64) * 0.5
        x[::7] = -0.0
    else:  # extremes
        x = torch.tensor([math.inf, -math.inf, 0.0, -0.0, 1.0, -1.0], dtype=torch.float64).repeat(n // 6 + 1)[:n]
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "ties", "extremes"])
def test_topk_masks_many_tensors_match_reference_and_rust(backend, dtype, kind):
    x = _data(kind, 9000, dtype, seed=3)
    parts = [x[:1], x[1:4001], x[4001:4001], x[4001:]]
    for by in ("abs", "value"):
        for k in (0, 1, 2999, 4500, 8999, 9000):
            got = cs.topk_masks(parts, k, by, backend=backend)
            assert all(torch.equal(a, b) for a, b in zip(got, ref_global(parts, k, by))), (by, k)
            rust = sparsekit.global_topk_masks(parts, k=k, by=by)
            assert all(torch.equal(a, b) for a, b in zip(got, rust)), (by, k)


@settings(max_examples=25)
@given(dtype=st.sampled_from(DTYPES), sizes=st.lists(st.integers(0, 300), max_size=4), by=st.sampled_from(["abs", "value"]), data=st.data())
def test_topk_masks_property(forward, dtype, sizes, by, data):
    tensors = [data.draw(float_tensors(dtype=dtype, shape=(s,))) for s in sizes]
    k = data.draw(st.integers(0, sum(sizes)))
    got = cs.topk_masks(tensors, k, by, backend=forward)
    assert all(torch.equal(a, b) for a, b in zip(got, ref_global(tensors, k, by)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_kth_values_match_rust(backend, dtype):
    x = _data("normal", 5000, dtype, seed=4)
    ranks = [1, 2, 1234, 4999, 5000]
    for by in ("abs", "value"):
        want = [sparsekit.kth_largest(x, r, by=by) for r in ranks]
        assert cs.kth_values(x, ranks, by, backend=backend) == want


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "n", "m", "dim"), [((6, 8, 5), 2, 4, 1), ((8, 3), 1, 2, 0), ((4, 40), 3, 40, 1), ((2, 64), 5, 8, 1)])
def test_nm_mask_matches_reference(backend, dtype, shape, n, m, dim):
    x = _data("ties", math.prod(shape), dtype, seed=5).reshape(shape)
    for by in ("abs", "value"):
        got = cs.nm_mask(x, n, m, dim, by, backend=backend)
        assert torch.equal(got, ref_nm(x, n, m, dim, by))
        assert torch.equal(got, sparsekit.nm_mask(x, n, m, dim=dim, by=by))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_is_refused(forward, dtype):
    x = _data("normal", 3000, dtype, seed=6)
    x[2345] = math.nan
    for call in (
        lambda: cs.topk_masks([x], 10, "abs", backend=forward),
        lambda: cs.topk_masks([x], 0, "abs", backend=forward),
        lambda: cs.kth_values(x, [1], "value", backend=forward),
        lambda: cs.nm_mask(x, 2, 4, 0, "abs", backend=forward),
    ):
        with pytest.raises(ValueError, match="NaN"):
            call()


def test_gpu_backend_without_cupy_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_cupy(name, *args, **kwargs):
        if name == "cupy" or name.startswith("cupy."):
            raise ImportError("No module named 'cupy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cupy)
    with pytest.raises(ImportError, match=r"pip install 'sparsekit\[cuda\]'"):
        cs.topk_masks([torch.ones(4)], 1, "abs")


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_block_topk_device_path_matches_cpu_path(forward, norm):
    from sparsekit.select import _block_topk_on_device

    gen = torch.Generator().manual_seed(7)
    x = torch.randint(-3, 4, (24, 32), generator=gen).float()  # small integers: exact norms, many ties
    for k in (0, 1, 10, 48):
        mask, blocks = _block_topk_on_device(x, (4, 4), k, norm, backend=forward)
        want_mask, want_blocks = sparsekit.block_topk_mask(x, (4, 4), k=k, norm=norm, return_block_mask=True)
        assert torch.equal(blocks, want_blocks) and torch.equal(mask, want_mask)
    x[3, 5] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        _block_topk_on_device(x, (4, 4), 1, norm, backend=forward)
