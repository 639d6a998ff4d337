"""The GPU suite (marker ``gpu``; ``make gpu-test``): every public op on CUDA tensors against the CPU path
on the same data, on the default and on a side stream, on every device present, with views at offsets,
and with the host synchronisations counted. Skipped visibly, with the reason, without a GPU and cupy.

What it proves that the shim cannot: the cupy side of the launch (DLPack exchange, ``ExternalStream`` on
torch's current stream, the device guard), true inter-block concurrency of the global atomics, and the
pinned, non-blocking table upload (no hidden synchronisation)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import sparsekit
from reference import same_tensor, within_one_ulp

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _devices() -> list[torch.device]:
    return [torch.device("cuda", i) for i in range(torch.cuda.device_count())] or [torch.device("cuda", 0)]


def _data(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    x[torch.rand(n, generator=gen) < 0.1] = 0.5  # ties
    x[torch.rand(n, generator=gen) < 0.01] = -0.0
    return x.to(dtype)


def _all_ops(x: torch.Tensor, parts: list[torch.Tensor]) -> list[object]:
    two_d = x[: (x.numel() // 512) * 512].reshape(-1, 512)
    q = torch.tensor([0.0, 0.25, 0.5, 0.99, 1.0], dtype=x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32)
    return [
        sparsekit.topk_mask(x, x.numel() // 7),
        sparsekit.topk_mask(x, density=0.3, by="value"),
        sparsekit.global_topk_masks(parts, k=sum(p.numel() for p in parts) // 3),
        sparsekit.nm_mask(two_d, 2, 4),
        sparsekit.nm_mask(two_d, 3, 8, dim=0),
        sparsekit.block_topk_mask(two_d, (8, 32), density=0.2, norm="l2", return_block_mask=True),
        sparsekit.block_topk_mask(two_d, (8, 32), k=3, norm="max", return_block_mask=True),
        sparsekit.kth_largest(x, 1234),
        sparsekit.kth_largest(x, 77, by="abs"),
        sparsekit.quantile(x, q.to(x.device), interpolation="linear"),
        sparsekit.quantile(x, 0.9, interpolation="nearest"),
    ]


def _same(got: object, want: object) -> bool:
    if isinstance(got, (list, tuple)):
        return isinstance(want, (list, tuple)) and len(got) == len(want) and all(_same(g, w) for g, w in zip(got, want))
    assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)
    if got.dtype == torch.bool:
        return got.device.type == "cuda" and torch.equal(got.cpu(), want)
    return same_tensor(got.cpu(), want, zero_sign=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", _devices(), ids=str)
def test_every_op_matches_the_cpu_path(dtype, device):
    x = _data(300_000, dtype, seed=1)
    parts = [x[:1000], x[1000:1000], x[1000:200_000], x[200_000:]]
    want = _all_ops(x, parts)
    xd = x.to(device)
    got = _all_ops(xd, [xd[:1000], xd[1000:1000], xd[1000:200_000], xd[200_000:]])  # views at offsets
    for i, (g, w) in enumerate(zip(got, want)):
        assert _same(g, w), i


def test_side_stream_and_reuse_of_out_buffers():
    x = _data(1 << 20, torch.float32, seed=2)
    want = sparsekit.topk_mask(x, 5000)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        xd = x.cuda()
        out = torch.empty(xd.shape, dtype=torch.bool, device="cuda")
        got = sparsekit.topk_mask(xd, 5000, out=out)
        kth = sparsekit.kth_largest(xd, 5000, by="abs")
    stream.synchronize()
    assert got is out and torch.equal(got.cpu(), want)
    assert same_tensor(kth.cpu(), sparsekit.kth_largest(x, 5000, by="abs"))


def _count_syncs(fn) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_one_host_synchronisation_per_call():
    xd = _data(1 << 20, torch.float32, seed=3).cuda()
    parts = [xd[:5000], xd[5000:]]
    torch.cuda.synchronize()
    assert _count_syncs(lambda: sparsekit.topk_mask(xd, 1000)) == 1
    assert _count_syncs(lambda: sparsekit.global_topk_masks(parts, k=1000)) == 1
    assert _count_syncs(lambda: sparsekit.kth_largest(xd, 10)) == 1
    assert _count_syncs(lambda: sparsekit.nm_mask(xd.reshape(-1, 4), 2, 4)) == 1


def test_nan_and_bad_devices_on_cuda():
    xd = _data(10_000, torch.float32, seed=4).cuda()
    xd[1234] = math.nan
    with pytest.raises(ValueError, match=r"tensors\[1\] contains NaN"):
        sparsekit.global_topk_masks([xd[:10], xd], k=3)
    with pytest.raises(ValueError, match="NaN"):
        sparsekit.kth_largest(xd, 1)
    with pytest.raises(ValueError, match="devices"):
        sparsekit.global_topk_masks([xd, xd.cpu()], k=3)
    with pytest.raises(ValueError, match="out"):
        sparsekit.topk_mask(xd, 3, out=torch.empty(xd.shape, dtype=torch.bool))  # out on the CPU


def test_quantile_levels_stay_on_the_device():
    xd = _data(1 << 20, torch.float32, seed=5).cuda()
    q = torch.linspace(0, 1, 50)
    assert _count_syncs(lambda: sparsekit.quantile(xd, q)) == 1
    assert same_tensor(sparsekit.quantile(xd, q).cpu(), torch.quantile(xd.cpu(), q), zero_sign=False)


# ------------------------------------------------------------------------------------------------
# Routing and block-sparse GEMM on CUDA tensors against the CPU path (the helpers take the device, so the
# same code also runs on the CPU; on a GPU these prove the cupy launch of cuda/route.cu and cuda/spmm.cu)
# ------------------------------------------------------------------------------------------------
ROUTE_CASES = [
    {"k": 2},
    {"k": 8, "score": "sigmoid", "n_groups": 8, "topk_groups": 4},
    {"k": 2, "capacity_factor": 1.0, "drop_policy": "position"},
]


def _route(device: torch.device, kw: dict) -> tuple[torch.Tensor, ...]:
    from sparsekit import moe

    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(4096, 64, generator=gen)
    bias = torch.randn(64, generator=gen) * 0.01 if kw.get("score") == "sigmoid" else None
    p = moe.route(logits.to(device), bias=None if bias is None else bias.to(device), **kw)
    return p.expert_ids, p.weights, p.order, p.counts, p.offsets


@pytest.mark.parametrize("kw", ROUTE_CASES, ids=str)
def test_routing_plan_matches_the_cpu_path(kw):
    got, want = _route(torch.device("cuda"), kw), _route(torch.device("cpu"), kw)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.device.type == "cuda", i
        if w.dtype.is_floating_point:
            torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(g.cpu(), w), i


def _bsr_fwd_bwd(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    from sparsekit import BlockSparseMatrix
    from sparsekit.ops import bsr_linear

    gen = torch.Generator().manual_seed(8)
    mask = torch.rand(4, 6, generator=gen) < 0.4
    mask[2] = False  # an empty block-row
    dense = torch.randn(128, 192, generator=gen).to(dtype)
    x = torch.randn(70, 192, generator=gen).to(dtype)
    g = torch.randn(70, 128, generator=gen).to(dtype)
    w = BlockSparseMatrix.from_dense(dense.to(device), (32, 32), mask=mask.to(device))
    xi = x.to(device).requires_grad_(True)
    vi = w.values.detach().clone().requires_grad_(True)
    y = bsr_linear(xi, w, values=vi)
    y.backward(g.to(device))
    return y.detach(), xi.grad, vi.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_sparse_ops_match_the_cpu_path(dtype):
    got, want = _bsr_fwd_bwd(torch.device("cuda"), dtype), _bsr_fwd_bwd(torch.device("cpu"), dtype)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype)
    for i, (gt, w) in enumerate(zip(got, want)):
        assert gt.device.type == "cuda" and gt.dtype == dtype, i
        if tol is not None:
            torch.testing.assert_close(gt.cpu(), w, rtol=tol, atol=tol)
        else:  # both accumulate in float32 and round once
            assert within_one_ulp(gt.cpu(), w, 1e-2), i
