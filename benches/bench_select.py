"""Benchmarks of sparsekit's selection API against what a user would otherwise write (torch / numpy).

Run (benchmarks are disabled by the project's pytest addopts, so enable them explicitly; ``testpaths``
is ``tests``, so pass this file):

    .venv/bin/python -m pytest benches/bench_select.py --benchmark-enable -p no:cacheprovider

or ``.venv/bin/python benches/report.py`` for a markdown table (ours vs baselines, ratios, memory).

Each group times ours and its baselines in one run on the same data (fixed seeds, generated once per
session), median of a few rounds after one warm-up round. Outside the timing, every baseline's answer
is checked against ours once: masks equal modulo ties at the threshold (float32 random data of 2**24+
elements does contain a few exactly equal values there; ours keeps exactly k, the baselines may keep
all tied ones), order statistics equal bit for bit.

Groups:
  global_topk_masks  64 float32 tensors (a small transformer's weight shapes), 2**26 elements, density
                     0.1: sparsekit vs torch (cat + kthvalue + compare) vs numpy (concatenate +
                     partition + compare), and the floor: one plain read pass (sum of every tensor).
                     Peak extra memory of each method (fresh subprocess, VmHWM) is stored in extra_info.
  quantile           2**24 float32, q = 0.9: vs torch.quantile, np.quantile.
  topk_mask          2**24 float32, k = 10 %: vs torch.topk(|x|) + scatter (sorted and unsorted), numpy
                     argpartition + mask.
  nm_mask            4096 x 4096 float32, 2:4: vs torch view(-1, 4).topk(2) + scatter.
  block_topk_mask    4096 x 4096 float32, (32, 32) blocks, density 0.1, L2: vs torch reshape + norm +
                     topk + repeat_interleave.
  kth_largest        2**24 float32, k = n / 10: vs torch.kthvalue.

Threads: torch uses its intra-op pool (all cores by default), sparsekit its rayon pool (all cores by
default, SPARSEKIT_NUM_THREADS), numpy one thread.

Peak memory child (used by the fixture; can also be run by hand):
    .venv/bin/python benches/bench_select.py --peak-memory {sparsekit,torch,numpy,floor}
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import sparsekit

SEED = 20261124
DENSITY = 0.1
N24 = 1 << 24
D = 1024


# ------------------------------------------------------------------------------------------- data
def model_shapes() -> list[tuple[int, ...]]:
    """64 weight shapes totalling exactly 2**26: an embedding and 7 layers of
    [norm, q, k, v, o, norm, gate, up, down] (same layout as rust/sparsekit-core/benches/select.rs)."""
    shapes: list[tuple[int, ...]] = [(15346, D)]
    for _ in range(7):
        shapes += [(D,), (D, D), (256, D), (256, D), (D, D), (D,), (1536, D), (1536, D), (D, 1536)]
    assert len(shapes) == 64 and sum(math.prod(s) for s in shapes) == 1 << 26
    return shapes


def make_model(seed: int = SEED) -> list[torch.Tensor]:
    """Continuous random weights, scaled like an initialised model (std 1/sqrt(fan_in); norms ~1)."""
    g = torch.Generator().manual_seed(seed)
    tensors = []
    for shape in model_shapes():
        t = torch.randn(shape, generator=g)
        if len(shape) == 1:
            t.mul_(0.1).add_(1.0)
        else:
            t.mul_(1.0 / math.sqrt(shape[-1]))
        tensors.append(t)
    return tensors


def make_vector(seed: int) -> torch.Tensor:
    return torch.randn(N24, generator=torch.Generator().manual_seed(seed))


def make_matrix(seed: int) -> torch.Tensor:
    return torch.randn(4096, 4096, generator=torch.Generator().manual_seed(seed))


def k_of(n: int, density: float = DENSITY) -> int:
    return min(n, int(math.floor(density * n + 0.5)))  # sparsekit's own rounding of density


# -------------------------------------------------------------------------------------- baselines
def torch_global_topk(tensors: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    flat = torch.cat([t.abs().flatten() for t in tensors])
    thr = flat.kthvalue(flat.numel() - k + 1).values
    return [t.abs() >= thr for t in tensors]


def numpy_global_topk(arrays: list[np.ndarray], k: int) -> list[np.ndarray]:
    flat = np.concatenate([np.abs(a).ravel() for a in arrays])
    n = flat.size
    thr = np.partition(flat, n - k)[n - k]
    return [np.abs(a) >= thr for a in arrays]


def floor_read_pass(tensors: list[torch.Tensor]):
    return sum(t.sum() for t in tensors)


def torch_topk_mask(x: torch.Tensor, k: int, sorted: bool = True) -> torch.Tensor:
    idx = torch.topk(x.abs().flatten(), k, sorted=sorted).indices
    return torch.zeros(x.numel(), dtype=torch.bool).scatter_(0, idx, True).view(x.shape)


def numpy_topk_mask(a: np.ndarray, k: int) -> np.ndarray:
    n = a.size
    idx = np.argpartition(np.abs(a).ravel(), n - k)[n - k :]
    mask = np.zeros(n, dtype=bool)
    mask[idx] = True
    return mask.reshape(a.shape)


def torch_nm_mask(x: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    idx = x.abs().view(-1, m).topk(n, dim=1).indices
    return torch.zeros(x.numel() // m, m, dtype=torch.bool).scatter_(1, idx, True).view(x.shape)


def torch_block_topk(x: torch.Tensor, block: tuple[int, int], k: int) -> torch.Tensor:
    (rows, cols), (bh, bw) = x.shape, block
    scores = torch.linalg.vector_norm(x.view(rows // bh, bh, cols // bw, bw), dim=(1, 3))
    idx = scores.flatten().topk(k).indices
    block_mask = torch.zeros(scores.numel(), dtype=torch.bool)
    block_mask[idx] = True
    return block_mask.view(rows // bh, cols // bw).repeat_interleave(bh, 0).repeat_interleave(bw, 1)


# ------------------------------------------------------------------------------------------ checks
def assert_masks_equal_modulo_ties(ours, theirs, scores, k) -> int:
    """Ours keeps exactly k; it and the baseline differ only on scores equal to the threshold.
    Returns the number of elements tied with the threshold."""
    ours = [torch.as_tensor(m) for m in ours]
    theirs = [torch.as_tensor(m) for m in theirs]
    scores = [torch.as_tensor(s) for s in scores]
    assert sum(int(m.sum()) for m in ours) == k
    thr = min(s[m].min() for s, m in zip(scores, ours) if bool(m.any()))
    tied = 0
    for s, mo, mt in zip(scores, ours, theirs):
        assert mo.shape == mt.shape == s.shape and mt.dtype == torch.bool
        assert bool(mo[s > thr].all()) and not bool(mo[s < thr].any())
        diff = mo != mt
        assert bool((s[diff] == thr).all()), "masks differ away from the threshold"
        tied += int((s == thr).sum())
    return tied


# --------------------------------------------------------------------------------- peak memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:  # Linux >= 4.0: writing 5 resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_child(method: str) -> dict:
    """Run one method once to warm up, then again with VmHWM reset; report the peak RSS above the
    RSS before the call (inputs already resident), i.e. temporaries + the outputs."""
    model = make_model()
    arrays = [t.numpy() for t in model]
    k = k_of(sum(t.numel() for t in model))
    fn = {
        "sparsekit": lambda: sparsekit.global_topk_masks(model, density=DENSITY),
        "torch": lambda: torch_global_topk(model, k),
        "numpy": lambda: numpy_global_topk(arrays, k),
        "floor": lambda: floor_read_pass(model),
    }[method]
    out = fn()
    del out
    rss0 = _status_kib("VmRSS")
    reset = _reset_peak()
    hwm0 = _status_kib("VmHWM")
    out = fn()
    hwm1 = _status_kib("VmHWM")
    del out
    base = rss0 if reset else max(rss0, hwm0)  # without a reset, only a peak above the old one shows
    return {
        "method": method,
        "peak_extra_bytes": max(0, hwm1 - base) * 1024,
        "input_bytes": sum(t.numel() * t.element_size() for t in model),
        "mask_bytes": sum(t.numel() for t in model),  # torch.bool / np.bool_: one byte each
        "hwm_reset": reset,
    }


@pytest.fixture(scope="session")
def global_topk_memory() -> dict[str, dict]:
    """Peak extra memory per method, each measured in a fresh subprocess."""
    results = {}
    for method in ("sparsekit", "torch", "numpy", "floor"):
        # A fixed mmap threshold: glibc otherwise raises it after the warm-up call frees its big
        # buffers, and would then keep them in the heap (counted in the "before" RSS).
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--peak-memory", method],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def model() -> list[torch.Tensor]:
    return make_model()


@pytest.fixture(scope="session")
def model_k(model) -> int:
    return k_of(sum(t.numel() for t in model))


@pytest.fixture(scope="session")
def model_ours(model) -> list[torch.Tensor]:
    return sparsekit.global_topk_masks(model, density=DENSITY)


@pytest.fixture(scope="session")
def vec() -> torch.Tensor:
    return make_vector(SEED + 1)


@pytest.fixture(scope="session")
def mat() -> torch.Tensor:
    return make_matrix(SEED + 2)


def run(benchmark, fn, *, rounds: int, op: str, size: str, role: str, impl: str, **extra):
    benchmark.extra_info.update(op=op, size=size, role=role, impl=impl, **extra)
    return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


# ----------------------------------------------------------------------------------- global top-k
GLOBAL = dict(op="global_topk_masks", size="64 tensors, 2**26 f32, density 0.1")


@pytest.mark.benchmark(group="global_topk_masks")
def test_global_topk_sparsekit(benchmark, model, model_k, global_topk_memory):
    out = run(benchmark, lambda: sparsekit.global_topk_masks(model, density=DENSITY), rounds=11, role="ours",
              impl="sparsekit", memory=global_topk_memory["sparsekit"], **GLOBAL)
    assert sum(int(m.sum()) for m in out) == model_k


@pytest.mark.benchmark(group="global_topk_masks")
def test_global_topk_torch(benchmark, model, model_k, model_ours, global_topk_memory):
    out = run(benchmark, lambda: torch_global_topk(model, model_k), rounds=3, role="baseline",
              impl="torch: cat + kthvalue + compare", memory=global_topk_memory["torch"], **GLOBAL)
    tied = assert_masks_equal_modulo_ties(model_ours, out, [t.abs() for t in model], model_k)
    benchmark.extra_info["tied_at_threshold"] = tied


@pytest.mark.benchmark(group="global_topk_masks")
def test_global_topk_numpy(benchmark, model, model_k, model_ours, global_topk_memory):
    arrays = [t.numpy() for t in model]
    out = run(benchmark, lambda: numpy_global_topk(arrays, model_k), rounds=3, role="baseline",
              impl="numpy: concatenate + partition + compare", memory=global_topk_memory["numpy"], **GLOBAL)
    tied = assert_masks_equal_modulo_ties(model_ours, out, [t.abs() for t in model], model_k)
    benchmark.extra_info["tied_at_threshold"] = tied


@pytest.mark.benchmark(group="global_topk_masks")
def test_global_topk_floor(benchmark, model, global_topk_memory):
    total = run(benchmark, lambda: floor_read_pass(model), rounds=11, role="floor",
                impl="floor: sum(t.sum() for t in tensors)", memory=global_topk_memory["floor"], **GLOBAL)
    assert torch.isfinite(total)


# ---------------------------------------------------------------------------------------- quantile
QUANT = dict(op="quantile", size="2**24 f32, q=0.9")


@pytest.mark.benchmark(group="quantile")
def test_quantile_sparsekit(benchmark, vec):
    out = run(benchmark, lambda: sparsekit.quantile(vec, 0.9), rounds=11, role="ours", impl="sparsekit", **QUANT)
    assert isinstance(out, float)


@pytest.mark.benchmark(group="quantile")
def test_quantile_torch(benchmark, vec):
    out = run(benchmark, lambda: torch.quantile(vec, 0.9), rounds=5, role="baseline", impl="torch.quantile", **QUANT)
    assert sparsekit.quantile(vec, 0.9) == float(out)  # bit for bit, as documented


@pytest.mark.benchmark(group="quantile")
def test_quantile_numpy(benchmark, vec):
    a = vec.numpy()
    out = run(benchmark, lambda: np.quantile(a, 0.9), rounds=5, role="baseline", impl="np.quantile", **QUANT)
    ours = sparsekit.quantile(vec, 0.9)
    # numpy interpolates in float64 (torch in float32): equal up to float32 rounding of the lerp
    assert abs(ours - float(out)) <= 2 * np.spacing(np.float32(abs(ours)))


# --------------------------------------------------------------------------------------- topk_mask
TOPK = dict(op="topk_mask", size="2**24 f32, k=10%")


@pytest.mark.benchmark(group="topk_mask")
def test_topk_mask_sparsekit(benchmark, vec):
    k = k_of(vec.numel())
    out = run(benchmark, lambda: sparsekit.topk_mask(vec, k), rounds=11, role="ours", impl="sparsekit", **TOPK)
    assert int(out.sum()) == k


@pytest.mark.benchmark(group="topk_mask")
def test_topk_mask_torch(benchmark, vec):
    k = k_of(vec.numel())
    out = run(benchmark, lambda: torch_topk_mask(vec, k), rounds=5, role="baseline",
              impl="torch.topk(|x|) + scatter", **TOPK)
    benchmark.extra_info["tied_at_threshold"] = assert_masks_equal_modulo_ties(
        [sparsekit.topk_mask(vec, k)], [out], [vec.abs()], k)


@pytest.mark.benchmark(group="topk_mask")
def test_topk_mask_torch_unsorted(benchmark, vec):
    k = k_of(vec.numel())
    out = run(benchmark, lambda: torch_topk_mask(vec, k, sorted=False), rounds=5, role="baseline",
              impl="torch.topk(|x|, sorted=False) + scatter", **TOPK)
    assert_masks_equal_modulo_ties([sparsekit.topk_mask(vec, k)], [out], [vec.abs()], k)


@pytest.mark.benchmark(group="topk_mask")
def test_topk_mask_numpy(benchmark, vec):
    k = k_of(vec.numel())
    a = vec.numpy()
    out = run(benchmark, lambda: numpy_topk_mask(a, k), rounds=5, role="baseline",
              impl="numpy argpartition + mask", **TOPK)
    assert_masks_equal_modulo_ties([sparsekit.topk_mask(vec, k)], [out], [vec.abs()], k)


# ----------------------------------------------------------------------------------------- nm_mask
NM = dict(op="nm_mask 2:4", size="4096x4096 f32")


@pytest.mark.benchmark(group="nm_mask")
def test_nm_mask_sparsekit(benchmark, mat):
    out = run(benchmark, lambda: sparsekit.nm_mask(mat, 2, 4), rounds=11, role="ours", impl="sparsekit", **NM)
    assert int(out.sum()) == mat.numel() // 2


@pytest.mark.benchmark(group="nm_mask")
def test_nm_mask_torch(benchmark, mat):
    out = run(benchmark, lambda: torch_nm_mask(mat), rounds=11, role="baseline",
              impl="torch view(-1,4).topk(2) + scatter", **NM)
    ours = sparsekit.nm_mask(mat, 2, 4)
    diff_groups = (ours != out).view(-1, 4).any(dim=1)
    if bool(diff_groups.any()):  # only groups with a tie at their 2nd/3rd largest may differ
        s = mat.abs().view(-1, 4)[diff_groups].sort(dim=1, descending=True).values
        assert bool((s[:, 1] == s[:, 2]).all())


# --------------------------------------------------------------------------------- block_topk_mask
BLOCK = dict(op="block_topk_mask", size="4096x4096 f32, (32,32), density 0.1")


@pytest.mark.benchmark(group="block_topk_mask")
def test_block_topk_sparsekit(benchmark, mat):
    out = run(benchmark, lambda: sparsekit.block_topk_mask(mat, (32, 32), density=DENSITY), rounds=11,
              role="ours", impl="sparsekit", **BLOCK)
    assert int(out.sum()) == k_of(128 * 128) * 32 * 32


@pytest.mark.benchmark(group="block_topk_mask")
def test_block_topk_torch(benchmark, mat):
    k = k_of(128 * 128)
    out = run(benchmark, lambda: torch_block_topk(mat, (32, 32), k), rounds=11, role="baseline",
              impl="torch reshape + vector_norm + topk + repeat_interleave", **BLOCK)
    ours, ours_blocks = sparsekit.block_topk_mask(mat, (32, 32), density=DENSITY, return_block_mask=True)
    if not torch.equal(ours, out):
        # torch's float32 norms may order blocks within rounding of the threshold differently
        scores = mat.double().view(128, 32, 128, 32).square().sum(dim=(1, 3))
        theirs_blocks = out[::32, ::32]
        thr = scores[ours_blocks].min()
        diff = ours_blocks != theirs_blocks
        assert bool(((scores[diff] - thr).abs() <= 1e-5 * thr).all())


# ------------------------------------------------------------------------------------- kth_largest
KTH = dict(op="kth_largest", size="2**24 f32, k=n/10")


@pytest.mark.benchmark(group="kth_largest")
def test_kth_largest_sparsekit(benchmark, vec):
    k = vec.numel() // 10
    out = run(benchmark, lambda: sparsekit.kth_largest(vec, k), rounds=11, role="ours", impl="sparsekit", **KTH)
    assert isinstance(out, float)


@pytest.mark.benchmark(group="kth_largest")
def test_kth_largest_torch(benchmark, vec):
    n, k = vec.numel(), vec.numel() // 10
    out = run(benchmark, lambda: vec.flatten().kthvalue(n - k + 1).values, rounds=5, role="baseline",
              impl="torch.kthvalue", **KTH)
    assert sparsekit.kth_largest(vec, k) == float(out)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peak-memory":
        print(json.dumps(peak_memory_child(sys.argv[2])))
    else:
        sys.exit(__doc__)
