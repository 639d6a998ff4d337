"""The shim's happens-before race check (ThreadSanitizer over the fibers; cuda/README.md, "Race check").

ThreadSanitizer's runtime must be loaded when a process starts, so the checks live in tests marked
``tsan`` that run inside one subprocess started with ``sparsekit.testing.race_check_env()``
(:func:`test_race_check_suite`). In the ordinary run they are skipped with that reason; the suite test
fails if any of them fails or does not run. ``make mutants`` runs the same tests on each mutant.

Two groups:
- the detector: small kernels with one hazard of each class the check must report (a missing barrier,
  shared and global, write/read and write/write, across a warp collective; non-atomic read-modify-write
  within a block and across blocks) and their correct twins, which must stay silent;
- every kernel family of ``cuda/`` through its public op under ``simulated_cuda(race_check=True)``: race
  free, and equal to the Rust path.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sparsekit
from sparsekit._cudasim import RaceError, SimRawModule, race_check_env, tsan_loaded
from sparsekit.testing import simulated_cuda

HERE = Path(__file__).resolve().parent
tsan = pytest.mark.skipif(
    not tsan_loaded(), reason="runs inside the ThreadSanitizer subprocess of test_race_check_suite"
)
# the family of a tsan test, for `make mutants` (-k select, -k route, ...)
FAMILIES = ("select", "route", "spmm_tc", "spmm")


def test_race_check_suite() -> None:
    """Runs this file's tsan tests in a process with ThreadSanitizer loaded; all must pass."""
    if tsan_loaded():
        pytest.skip("already inside the ThreadSanitizer process")
    env = race_check_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(HERE)) if p)
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:randomly", str(Path(__file__))],
        env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    m = re.search(r"(\d+) passed", out)
    n_tests = sum(1 for ln in Path(__file__).read_text().splitlines() if ln.startswith("@tsan"))
    assert m and int(m.group(1)) >= n_tests, out[-3000:]
    # The only skips allowed in there are the two tests of this process's side (this one and the refusal).
    skipped = [ln for ln in out.splitlines() if ln.startswith("SKIPPED")]
    allowed = ("already inside the ThreadSanitizer process", "ThreadSanitizer is loaded in this process")
    assert all(ln.endswith(allowed) for ln in skipped), out[-3000:]


def test_race_check_needs_tsan_loaded() -> None:
    if tsan_loaded():
        pytest.skip("ThreadSanitizer is loaded in this process")
    with pytest.raises(RuntimeError, match="race_check_env"):
        SimRawModule('extern "C" __global__ void k(int* x) { x[0] = 1; }', race_check=True)


def test_race_check_env() -> None:
    env = race_check_env({"PATH": os.environ.get("PATH", "")})
    assert "libtsan" in env["LD_PRELOAD"] and Path(env["LD_PRELOAD"].split()[0]).exists()
    assert "halt_on_error=0" in env["TSAN_OPTIONS"] and "exitcode=0" in env["TSAN_OPTIONS"]


# ------------------------------------------------------------------------------------------------
# The detector: one hazard per class, and its correct twin
# ------------------------------------------------------------------------------------------------
def _run(src: str, kernel: str, grid: int, block: int, n_out: int) -> np.ndarray:
    mod = SimRawModule(src, race_check=True)
    out = np.zeros(n_out, np.int32)
    mod.get_function(kernel)((grid,), (block,), (out,))
    return out


def _line(src: str, marker: str) -> int:
    return next(i for i, ln in enumerate(src.splitlines(), 1) if marker in ln)


SHARED = r"""
extern "C" __global__ void k(int* out) {
  __shared__ int s[64];
  s[threadIdx.x] = threadIdx.x + 1;  // WRITE
  SYNC
  out[blockIdx.x * 64 + threadIdx.x] = s[IDX];  // READ
}
"""
SAME_WARP = "(threadIdx.x & ~31u) | ((threadIdx.x + 1) & 31u)"  # the next lane of the same warp
OTHER_WARP = "(threadIdx.x + 32) % 64"  # the same lane of the other warp


def _want(idx: str, grid: int) -> list[int]:
    f = (lambda t: (t & ~31) | ((t + 1) & 31)) if idx == SAME_WARP else (lambda t: (t + 32) % 64)
    return [f(t) + 1 for _ in range(grid) for t in range(64)]


@tsan
@pytest.mark.parametrize(
    ("sync", "idx", "racy"),
    [
        ("", SAME_WARP, True),  # missing barrier
        ("__syncthreads();", OTHER_WARP, False),
        ("__syncwarp();", SAME_WARP, False),  # a warp collective orders the lanes of its warp
        ("__syncwarp();", OTHER_WARP, True),  # ... but not the other warp: a hazard across a warp collective
        ("(void)__ballot_sync(0xffffffffu, 1);", OTHER_WARP, True),
        ("(void)__ballot_sync(0xffffffffu, 1);", SAME_WARP, False),
    ],
    ids=["none", "syncthreads", "syncwarp-same-warp", "syncwarp-other-warp", "ballot-other-warp", "ballot-same-warp"],
)
def test_missing_barrier_on_shared_memory(sync: str, idx: str, racy: bool) -> None:
    src = SHARED.replace("SYNC", sync).replace("IDX", idx)
    if not racy:
        assert _run(src, "k", 4, 64, 256).tolist() == _want(idx, 4)
        return
    with pytest.raises(RaceError) as e:
        _run(src, "k", 4, 64, 256)
    head = str(e.value).splitlines()[0]
    assert head.startswith("data race in kernel k:"), head
    assert f"kernel.cu:{_line(src, 'WRITE')}" in head and f"kernel.cu:{_line(src, 'READ')}" in head, head
    assert re.search(r"block \(\d,0,0\) thread \(\d+,0,0\).*block \(\d,0,0\) thread \(\d+,0,0\)", head), head


WMMA_SHARED = r"""
#include <mma.h>
using namespace nvcuda;
extern "C" __global__ void k(int* out) {
  __shared__ __align__(32) __half s[16][16];
  __shared__ __align__(32) float c[16][16];
  for (int e = threadIdx.x; e < 256; e += 32) s[e / 16][e % 16] = __float2half((float)(e % 7));  // WRITE
  SYNC
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;  // READ below
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  wmma::load_matrix_sync(a, &s[0][0], 16);  // READ
  wmma::load_matrix_sync(b, &s[0][0], 16);
  wmma::mma_sync(acc, a, b, acc);
  wmma::store_matrix_sync(&c[0][0], acc, 16, wmma::mem_row_major);
  __syncwarp();
  for (int e = threadIdx.x; e < 256; e += 32) out[e] = (int)c[e / 16][e % 16];
}
"""


@tsan
@pytest.mark.parametrize(("sync", "racy"), [("", True), ("__syncwarp();", False)], ids=["none", "syncwarp"])
def test_wmma_loads_need_a_barrier(sync: str, racy: bool) -> None:
    """wmma::load_matrix_sync of shared memory other lanes wrote orders nothing by itself (as on a GPU)."""
    src = WMMA_SHARED.replace("SYNC", sync)
    v = (torch.arange(256) % 7).double().view(16, 16)
    if not racy:
        assert _run(src, "k", 1, 32, 256).tolist() == (v @ v.T).flatten().int().tolist()
        return
    with pytest.raises(RaceError) as e:
        _run(src, "k", 1, 32, 256)
    head = str(e.value).splitlines()[0]
    assert f"kernel.cu:{_line(src, '// WRITE')}" in head, head


def test_no_schedule_exposes_the_cross_warp_hazard() -> None:
    """Why the race check exists: the schedules alone compute the right answer for this racy kernel."""
    src = SHARED.replace("SYNC", "__syncwarp();").replace("IDX", OTHER_WARP)
    for schedule in ("forward", "reverse", "random"):
        mod = SimRawModule(src, schedule=schedule, seed=1)
        out = np.zeros(128, np.int32)
        mod.get_function("k")((2,), (64,), (out,))
        assert out.tolist() == _want(OTHER_WARP, 2)


WRITE_WRITE = r"""
extern "C" __global__ void k(int* out) {
  __shared__ int s;
  if (threadIdx.x == 0) s = 1;  // FIRST
  SYNC
  if (threadIdx.x == 33) s = 2;  // SECOND
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}
"""


@tsan
@pytest.mark.parametrize("sync", ["", "__syncthreads();"])
def test_two_writes_without_barrier(sync: str) -> None:
    src = WRITE_WRITE.replace("SYNC", sync)
    if sync:
        assert _run(src, "k", 2, 64, 2).tolist() == [2, 2]
        return
    with pytest.raises(RaceError, match=r"write of 4 bytes at kernel.cu:\d+ by block .*previous write") as e:
        _run(src, "k", 2, 64, 2)
    head = str(e.value).splitlines()[0]
    assert f"kernel.cu:{_line(src, 'FIRST')}" in head and f"kernel.cu:{_line(src, 'SECOND')}" in head


GLOBAL_IN_BLOCK = r"""
extern "C" __global__ void k(int* out) {
  out[threadIdx.x] = threadIdx.x;  // WRITE
  SYNC
  if (threadIdx.x == 0) out[64] = out[63];  // READ
}
"""


@tsan
@pytest.mark.parametrize("sync", ["", "__syncthreads();"])
def test_missing_barrier_on_global_memory(sync: str) -> None:
    src = GLOBAL_IN_BLOCK.replace("SYNC", sync)
    if sync:
        assert _run(src, "k", 1, 64, 65)[64] == 63
        return
    with pytest.raises(RaceError) as e:
        _run(src, "k", 1, 64, 65)
    head = str(e.value).splitlines()[0]
    assert f"kernel.cu:{_line(src, 'READ')}" in head and f"kernel.cu:{_line(src, 'WRITE')}" in head, head


RMW_SHARED = r"""
extern "C" __global__ void k(int* out) {
  __shared__ int c;
  if (threadIdx.x == 0) c = 0;
  __syncthreads();
  ADD;  // RMW
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = c;
}
"""
RMW_GLOBAL = r"""
extern "C" __global__ void k(int* out) {
  if (threadIdx.x == 0) ADD;  // RMW
}
"""


@tsan
@pytest.mark.parametrize(("src", "grid"), [(RMW_SHARED, 3), (RMW_GLOBAL, 3)], ids=["shared_in_block", "global_across_blocks"])
@pytest.mark.parametrize("atomic", [True, False])
def test_non_atomic_read_modify_write(src: str, grid: int, atomic: bool) -> None:
    target = "&c" if "__shared__" in src else "&out[0]"
    code = src.replace("ADD", f"atomicAdd({target}, 1)" if atomic else f"*({target}) += 1")
    if atomic:
        out = _run(code, "k", grid, 64, grid)
        assert out.tolist() == ([64] * grid if "__shared__" in src else [grid] + [0] * (grid - 1))
        return
    with pytest.raises(RaceError, match=rf"kernel.cu:{_line(code, 'RMW')}") as e:
        _run(code, "k", grid, 64, grid)
    if "__shared__" not in src:  # two blocks' thread 0
        assert re.search(r"block \((\d),0,0\) thread \(0,0,0\).*block \((?!\1)\d,0,0\) thread \(0,0,0\)", str(e.value).splitlines()[0])


REUSE = r"""
extern "C" __global__ void k(int* out) {
  __shared__ int s[128];
  extern __shared__ int dyn[];
  int acc = 0;
  for (int it = 0; it < 3; it++) {
    s[threadIdx.x] = it + threadIdx.x;
    dyn[threadIdx.x] = 2 * it;
    __syncthreads();
    acc += s[(threadIdx.x + 5) % 128] + dyn[127 - threadIdx.x];
    __syncthreads();
  }
  int v = acc;
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[blockIdx.x * 128 + threadIdx.x] = v;
}
"""


@tsan
def test_correct_kernel_reusing_memory_across_blocks_is_silent() -> None:
    # Blocks reuse the same stacks, static and dynamic shared memory: no false report between them.
    mod = SimRawModule(REUSE, race_check=True)
    out = np.zeros(6 * 128, np.int32)
    mod.get_function("k")((6,), (128,), (out,), shared_mem=128 * 4)
    acc = np.array([sum(it + (t + 5) % 128 + 2 * it for it in range(3)) for t in range(128)])
    want = np.concatenate([acc.reshape(4, 32).sum(1).repeat(32)] * 6)
    assert out.tolist() == want.tolist()


# ------------------------------------------------------------------------------------------------
# Every kernel family through its public op: race free and equal to the Rust path
# ------------------------------------------------------------------------------------------------
@tsan
def test_select_kernels_race_free() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(128, 100, generator=gen)  # 4 chunks of 4096: several blocks, 16 tiles per chunk
    x.view(-1)[::14] = 3.0  # ~900 ties at the top: the threshold is tied, mask_trim_equal trims in every chunk
    q = torch.tensor([0.1, 0.5, 0.9])
    ops = [
        lambda t: sparsekit.topk_mask(t, 700),
        lambda t: sparsekit.global_topk_masks([t[:7], torch.empty(0), t[7:]], density=0.05, by="value"),
        lambda t: sparsekit.nm_mask(t, 2, 4, dim=1),
        lambda t: sparsekit.block_topk_mask(t, (8, 20), k=4, return_block_mask=True),
        lambda t: sparsekit.kth_largest(t, 50, by="abs"),
        lambda t: sparsekit.quantile(t, q),
    ]
    for op in ops:
        want = op(x)
        with simulated_cuda(race_check=True):
            got = op(x)
        for a, b in zip(got if isinstance(got, (list, tuple)) else [got], want if isinstance(want, (list, tuple)) else [want]):
            assert torch.equal(a, b)
    # NaN in many threads of several blocks: the NaN counters (shared, then global) are updated concurrently.
    bad = x.clone()
    bad.view(-1)[5::37] = float("nan")
    for op in ops[:2]:
        with pytest.raises(ValueError, match="NaN"):
            op(bad)
        with simulated_cuda(race_check=True), pytest.raises(ValueError, match="NaN"):
            op(bad)


@tsan
def test_route_kernels_race_free(monkeypatch: pytest.MonkeyPatch) -> None:
    from sparsekit import _cuda_route, moe

    # Few blocks, so that each walks several rows (grid stride) and the barrier between rows matters.
    monkeypatch.setattr(_cuda_route, "MAX_TOPK_GRID", 4)
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(96, 16, generator=gen)
    logits[::9] = 0.0  # ties between experts
    for kw in ({}, {"score": "sigmoid", "n_groups": 4, "topk_groups": 2}, {"capacity_factor": 1.0}):
        want = moe.route(logits, 2, **kw)
        with simulated_cuda(race_check=True):
            got = moe.route(logits, 2, **kw)
        for f in ("expert_ids", "order", "counts", "offsets"):
            assert torch.equal(getattr(got, f), getattr(want, f)), f
        assert torch.allclose(got.weights, want.weights)


@tsan
def test_spmm_kernels_race_free() -> None:
    from sparsekit import BlockSparseMatrix
    from sparsekit.ops import bsr_linear

    gen = torch.Generator().manual_seed(5)
    mask = torch.rand(4, 6, generator=gen) < 0.5
    mask[1] = False  # an empty block-row
    dense = torch.randn(64, 96, generator=gen)
    x = torch.randn(24, 96, generator=gen)
    results = []
    for sim in (False, True):
        xi = x.clone().requires_grad_(True)
        wi = BlockSparseMatrix.from_dense(dense, (16, 16), mask=mask)
        wi.values = wi.values.detach().clone().requires_grad_(True)
        with simulated_cuda(race_check=True) if sim else contextlib.nullcontext():
            y = bsr_linear(xi, wi)  # forward (dsd), then dX (dsd_t) and dW (sdd)
            y.square().sum().backward()
        results.append((y.detach(), xi.grad, wi.values.grad))
    for cpu, shim in zip(*results):
        torch.testing.assert_close(shim, cpu, rtol=1e-5, atol=1e-5)


@tsan
def test_spmm_tc_kernels_race_free() -> None:
    """The tensor-core kernels (float16 here) through bsr_linear forward and backward; 32x32 blocks and 70
    rows, so every loop runs more than once (a missing end-of-step barrier shows as a write-after-read)."""
    from reference import within_one_ulp
    from sparsekit import BlockSparseMatrix
    from sparsekit.ops import bsr_linear

    gen = torch.Generator().manual_seed(5)
    mask = torch.rand(3, 3, generator=gen) < 0.6
    mask[1] = False  # an empty block-row
    mask[0, :2] = True  # a block-row of two blocks
    dense = torch.randn(96, 96, generator=gen).half()
    x = torch.randn(70, 96, generator=gen).half()
    results = []
    for sim in (False, True):
        xi = x.clone().requires_grad_(True)
        wi = BlockSparseMatrix.from_dense(dense, (32, 32), mask=mask)
        vi = wi.values.detach().clone().requires_grad_(True)
        with simulated_cuda(race_check=True) if sim else contextlib.nullcontext():
            y = bsr_linear(xi, wi, values=vi)
            y.float().square().sum().backward()
        results.append((y.detach(), xi.grad, vi.grad))
    for cpu, shim in zip(*results):
        assert within_one_ulp(shim, cpu, 1e-2)
