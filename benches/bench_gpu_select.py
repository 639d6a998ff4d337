"""GPU benchmarks of the selection ops against torch on the same GPU (``make gpu-bench``; skipped, with
the reason, without a CUDA device and cupy).

Each group times sparsekit and the torch way on the same device tensor, ``torch.cuda.synchronize()``
inside every timed call (so the time is the GPU's), after one warm-up call (kernel compilation by
NVRTC happens there). Outside the timing the answers are checked against each other once.

Groups (float32):
  topk_mask          2**26 elements, k = 10 %: vs torch.topk(|x|) + scatter.
  global_topk_masks  32 tensors of 2**21 elements, density 0.1: vs cat + topk + compare.
  kth_largest        2**26 elements, k = n / 10: vs torch.kthvalue.
  quantile           2**24 elements (torch.quantile's limit), 9 levels: vs torch.quantile.
"""

from __future__ import annotations

import pytest
import torch

import sparsekit

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the GPU benchmarks need one (make gpu-bench)", allow_module_level=True)
N26, N24 = 1 << 26, 1 << 24


@pytest.fixture(scope="module")
def vec():
    return torch.randn(N26, device="cuda", generator=torch.Generator("cuda").manual_seed(1))


def timed(benchmark, fn, rounds=10):
    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    call()  # warm-up: compiles and caches the kernels
    return benchmark.pedantic(call, rounds=rounds, iterations=1)


@pytest.mark.benchmark(group="topk_mask 2**26 k=10%")
@pytest.mark.parametrize("impl", ["sparsekit", "torch"])
def test_topk_mask(benchmark, vec, impl):
    k = N26 // 10
    if impl == "sparsekit":
        out = timed(benchmark, lambda: sparsekit.topk_mask(vec, k))
    else:
        def torch_way():
            mask = torch.zeros_like(vec, dtype=torch.bool)
            return mask.scatter_(0, torch.topk(vec.abs(), k, sorted=False).indices, True)

        out = timed(benchmark, torch_way)
    assert int(out.sum()) == k


@pytest.mark.benchmark(group="global_topk_masks 32 x 2**21 d=0.1")
@pytest.mark.parametrize("impl", ["sparsekit", "torch"])
def test_global_topk(benchmark, vec, impl):
    parts = list(vec[: 32 << 21].view(32, -1).unbind(0))
    k = (32 << 21) // 10
    if impl == "sparsekit":
        timed(benchmark, lambda: sparsekit.global_topk_masks(parts, k=k))
    else:
        def torch_way():
            threshold = torch.topk(torch.cat([p.abs() for p in parts]), k, sorted=False).values.min()
            return [p.abs() >= threshold for p in parts]

        timed(benchmark, torch_way)


@pytest.mark.benchmark(group="kth_largest 2**26 k=n/10")
@pytest.mark.parametrize("impl", ["sparsekit", "torch"])
def test_kth_largest(benchmark, vec, impl):
    k = N26 // 10
    if impl == "sparsekit":
        out = timed(benchmark, lambda: sparsekit.kth_largest(vec, k))
    else:
        out = timed(benchmark, lambda: torch.kthvalue(vec, N26 - k + 1).values)
    assert float(out) == float(torch.kthvalue(vec, N26 - k + 1).values)


@pytest.mark.benchmark(group="quantile 2**24 9 levels")
@pytest.mark.parametrize("impl", ["sparsekit", "torch"])
def test_quantile(benchmark, vec, impl):
    x = vec[:N24]
    q = torch.linspace(0.1, 0.9, 9, device="cuda")
    if impl == "sparsekit":
        out = timed(benchmark, lambda: sparsekit.quantile(x, q))
    else:
        out = timed(benchmark, lambda: torch.quantile(x, q))
    assert torch.equal(out, torch.quantile(x, q))
