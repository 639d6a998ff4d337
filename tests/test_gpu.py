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
from reference import same_tensor

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
