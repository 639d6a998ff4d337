"""The CPU CUDA shim (cuda/sim/cudasim.h + sparsekit._cudasim) against numpy/torch references."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsekit._cudasim import SimPointer, SimRawModule

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("SPARSEKIT_SIM_CXX", "g++")) is None, reason="no g++")

FULL = 0xFFFFFFFF

# One module for most kernels: one g++ run.
KERNELS = r"""
#line 1 "shim_test.cu"
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

extern "C" __global__ void vadd(const float* __restrict__ a, const float* __restrict__ b, float* c, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) c[i] = a[i] + b[i];
}

// Shared-memory tree reduction, one partial sum per block.
extern "C" __global__ void __launch_bounds__(256) block_sum(const float* x, float* out, int n) {
  __shared__ float s[256];
  int t = threadIdx.x;
  float acc = 0.f;
  for (int i = blockIdx.x * blockDim.x + t; i < n; i += gridDim.x * blockDim.x) acc += x[i];
  s[t] = acc;
  __syncthreads();
  for (int h = blockDim.x / 2; h > 0; h >>= 1) {
    if (t < h) s[t] += s[t + h];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

// One shuffle of the given kind per thread: 0 idx, 1 up, 2 down, 3 xor.
extern "C" __global__ void shfl_once(const int* x, int* out, int kind, int arg, int width) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  int v = x[i], r = 0;
  switch (kind) {
    case 0: r = __shfl_sync(0xffffffffu, v, arg, width); break;
    case 1: r = __shfl_up_sync(0xffffffffu, v, arg, width); break;
    case 2: r = __shfl_down_sync(0xffffffffu, v, arg, width); break;
    default: r = __shfl_xor_sync(0xffffffffu, v, arg, width); break;
  }
  out[i] = r;
}

// Segment sums with width-wide segments: xor butterfly (all lanes) and down-shift (lane 0 of segment).
extern "C" __global__ void warp_sums(const double* x, double* xor_out, double* down_out, int width) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  double a = x[i], b = x[i];
  for (int o = width / 2; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o, width);
  for (int o = width / 2; o > 0; o >>= 1) b += __shfl_down_sync(0xffffffffu, b, o, width);
  xor_out[i] = a;
  down_out[i] = b;
}

extern "C" __global__ void vote(const int* p, unsigned* ballot, int* any, int* all, unsigned* half_ballot,
                                unsigned* radd) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  int lane = threadIdx.x & 31;
  ballot[i] = __ballot_sync(0xffffffffu, p[i]);
  any[i] = __any_sync(0xffffffffu, p[i]);
  all[i] = __all_sync(0xffffffffu, p[i]);
  unsigned m = lane < 16 ? 0x0000ffffu : 0xffff0000u;  // two independent half-warp groups
  half_ballot[i] = __ballot_sync(m, p[i]);
  radd[i] = __reduce_add_sync(0xffffffffu, (unsigned)p[i]);
}

extern "C" __global__ void hist(const int* x, unsigned int* bins, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) atomicAdd(&bins[x[i]], 1u);
}

extern "C" __global__ void atom_misc(const int* x, int n, int* mx, int* mn, unsigned long long* cnt, float* fsum,
                                     double* dsum, int* cas_winner) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  atomicMax(mx, x[i]);
  atomicMin(mn, x[i]);
  atomicAdd(cnt, 1ull);
  atomicAdd(fsum, 1.0f);
  atomicAdd(dsum, (double)x[i]);
  atomicCAS(cas_winner, -1, i);
}

// Reverse each block's chunk through dynamic shared memory (two declarations, like real kernels).
extern "C" __global__ void dyn_reverse(const float* x, float* y) {
  extern __shared__ float buf[];
  extern __shared__ __align__(16) unsigned char raw[];
  int t = threadIdx.x, b = blockIdx.x * blockDim.x;
  buf[t] = x[b + t];
  __syncthreads();
  y[b + t] = reinterpret_cast<float*>(raw)[blockDim.x - 1 - t];
}

template <typename T>
__global__ void axpy(T* y, const T* x, T a, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i] + y[i];
}

extern "C" __global__ void sync_preds(const int* p, int* cnt, int* all, int* any) {
  int t = threadIdx.x;
  int c = __syncthreads_count(p[t]);
  int a = __syncthreads_and(p[t]);
  int o = __syncthreads_or(p[t]);
  cnt[t] = c; all[t] = a; any[t] = o;
}

extern "C" __global__ void bits(const unsigned* x, int* popc, int* clz, int* ffs, unsigned* brev, float* f,
                                unsigned* back) {
  int i = threadIdx.x;
  unsigned v = x[i];
  popc[i] = __popc(v);
  clz[i] = __clz((int)v);
  ffs[i] = __ffs((int)v);
  brev[i] = __brev(v);
  f[i] = __uint_as_float(v);
  back[i] = __float_as_uint(f[i]);
}

extern "C" __global__ void halves(const float* x, uint16_t* h_bits, float* h_back, uint16_t* b_bits, float* b_back,
                                  const __half* hin, const __nv_bfloat16* bin, float* hin_f, float* bin_f) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  __half h = __float2half(x[i]);
  __nv_bfloat16 b = __float2bfloat16(x[i]);
  h_bits[i] = __half_as_ushort(h);
  h_back[i] = __half2float(__ushort_as_half(h_bits[i]));
  b_bits[i] = __bfloat16_as_ushort(b);
  b_back[i] = __bfloat162float(__ushort_as_bfloat16(b_bits[i]));
  hin_f[i] = __half2float(hin[i]);
  bin_f[i] = __bfloat162float(bin[i]);
}

extern "C" __global__ void scalars(long long* out, long long a, unsigned long long b, float c, double d, bool e,
                                   short f, unsigned char g) {
  out[0] = a; out[1] = (long long)b; out[2] = (long long)(c * 4); out[3] = (long long)(d * 4); out[4] = e;
  out[5] = f; out[6] = g;
}

// Threads of a block hand a token around through shared memory; __nanosleep lets the others run.
extern "C" __global__ void token_ring(int* order) {
  __shared__ int turn;
  __shared__ int pos;
  if (threadIdx.x == 0) { turn = blockDim.x - 1; pos = 0; }
  __syncthreads();
  while (((volatile int&)turn) != (int)threadIdx.x) __nanosleep(10);
  order[pos++] = threadIdx.x;
  turn = threadIdx.x - 1;
}
"""

WMMA = r"""
#include <mma.h>
using namespace nvcuda;
// One warp per 16x16 output tile; A row-major (M x K), B col-major (K x N given as N x K), C row-major.
extern "C" __global__ void wmma_gemm(const __half* A, const __half* B, float* C, int M, int N, int K) {
  int tm = blockIdx.y, tn = blockIdx.x;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
  wmma::fill_fragment(c, 0.0f);
  for (int k = 0; k < K; k += 16) {
    wmma::load_matrix_sync(a, A + tm * 16 * K + k, K);
    wmma::load_matrix_sync(b, B + tn * 16 * K + k, K);
    wmma::mma_sync(c, a, b, c);
  }
  for (int i = 0; i < c.num_elements; i++) c.x[i] *= 2.0f;
  wmma::store_matrix_sync(C + tm * 16 * N + tn * 16, c, N, wmma::mem_row_major);
}
"""

GEMM = r"""
#line 1 "gemm.cu"
#define TILE 16
extern "C" __global__ void gemm(const float* A, const float* B, float* C, int M, int N, int K) {
  __shared__ float As[TILE][TILE];
  __shared__ float Bs[TILE][TILE];
  int tx = threadIdx.x, ty = threadIdx.y;
  int row = blockIdx.y * TILE + ty, col = blockIdx.x * TILE + tx;
  float acc = 0.f;
  for (int t = 0; t < K; t += TILE) {
    As[ty][tx] = (row < M && t + tx < K) ? A[row * K + t + tx] : 0.f;
    Bs[ty][tx] = (t + ty < K && col < N) ? B[(t + ty) * N + col] : 0.f;
#ifndef DROP_FIRST_SYNC
    __syncthreads();
#endif
    for (int k = 0; k < TILE; k++) acc += As[ty][k] * Bs[k][tx];
#ifndef DROP_SECOND_SYNC
    __syncthreads();
#endif
  }
  if (row < M && col < N) C[row * N + col] = acc;
}
"""


@pytest.fixture(scope="module")
def mod() -> SimRawModule:
    return SimRawModule(KERNELS, options=("-std=c++17", "-arch=sm_90"), name_expressions=("axpy<float>", "axpy<int>"))


def _gemm(schedule: str = "forward", seed: int = 0, options: tuple[str, ...] = (), threads: int | None = None):
    return SimRawModule(GEMM, options=options, schedule=schedule, seed=seed, threads=threads).get_function("gemm")


def test_vector_add(mod: SimRawModule) -> None:
    n = 1000
    a, b = torch.rand(n), torch.rand(n)
    c = torch.full((n,), -1.0)
    mod.get_function("vadd")(((n + 255) // 256,), (256,), (a, b, c, n))
    torch.testing.assert_close(c, a + b)


def test_block_reduction(mod: SimRawModule) -> None:
    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    out = np.zeros(7, np.float32)
    mod.get_function("block_sum")(7, 256, (x, out, x.size))
    np.testing.assert_allclose(out.sum(), x.astype(np.float64).sum(), rtol=1e-4, atol=1e-3)


def _shfl_ref(x: np.ndarray, kind: int, arg: int, width: int) -> np.ndarray:
    out = np.empty_like(x)
    for i in range(x.size):
        warp, lane = divmod(i, 32)
        seg = lane & ~(width - 1)
        if kind == 0:
            src = seg + (arg & (width - 1))
        elif kind == 1:
            src = lane - arg if lane - arg >= seg else lane
        elif kind == 2:
            src = lane + arg if lane + arg < seg + width else lane
        else:
            src = lane ^ arg if (lane ^ arg) < seg + width else lane
        out[i] = x[warp * 32 + src]
    return out


@pytest.mark.parametrize("kind", [0, 1, 2, 3], ids=["idx", "up", "down", "xor"])
@pytest.mark.parametrize("width", [32, 16, 8, 4])
def test_shuffles(mod: SimRawModule, kind: int, width: int) -> None:
    x = np.arange(1000, 1064, dtype=np.int32)
    f = mod.get_function("shfl_once")
    for arg in {1, 3, width // 2, 5} if kind else {0, 3, 7, 31}:
        out = np.zeros_like(x)
        f(1, 64, (x, out, kind, arg, width))
        np.testing.assert_array_equal(out, _shfl_ref(x, kind, arg, width), err_msg=f"kind={kind} arg={arg}")


@pytest.mark.parametrize("width", [32, 16, 8, 2])
def test_warp_reductions(mod: SimRawModule, width: int) -> None:
    x = np.random.default_rng(width).standard_normal(128)
    xo, do = np.zeros_like(x), np.zeros_like(x)
    mod.get_function("warp_sums")(2, 64, (x, xo, do, width))
    seg = x.reshape(-1, width).sum(1)
    np.testing.assert_allclose(xo, np.repeat(seg, width), rtol=1e-12)
    np.testing.assert_allclose(do[::width], seg, rtol=1e-12)


def test_votes(mod: SimRawModule) -> None:
    rng = np.random.default_rng(1)
    p = (rng.random(96) < 0.5).astype(np.int32)
    p[64:] = 1  # third warp: all set
    p[32:64] = 0  # second warp: none set
    ballot, hb, radd = (np.zeros(96, np.uint32) for _ in range(3))
    any_, all_ = np.zeros(96, np.int32), np.zeros(96, np.int32)
    mod.get_function("vote")(1, 96, (p, ballot, any_, all_, hb, radd))
    for w in range(3):
        pw = p[w * 32 : (w + 1) * 32]
        bits = int(sum(1 << i for i in range(32) if pw[i]))
        assert (ballot[w * 32 : (w + 1) * 32] == bits).all()
        assert (any_[w * 32 : (w + 1) * 32] == int(pw.any())).all()
        assert (all_[w * 32 : (w + 1) * 32] == int(pw.all())).all()
        assert (hb[w * 32 : w * 32 + 16] == (bits & 0xFFFF)).all()
        assert (hb[w * 32 + 16 : (w + 1) * 32] == (bits & 0xFFFF0000)).all()
        assert (radd[w * 32 : (w + 1) * 32] == pw.sum()).all()


@pytest.mark.parametrize("threads", [1, 2])
def test_atomic_histogram(mod: SimRawModule, threads: int) -> None:
    x = np.random.default_rng(2).integers(0, 37, 50_000).astype(np.int32)
    bins = np.zeros(37, np.uint32)
    mod.threads = threads
    try:
        mod.get_function("hist")(16, 128, (x, bins, x.size))
    finally:
        mod.threads = 2
    np.testing.assert_array_equal(bins, np.bincount(x, minlength=37))


def test_atomics_misc(mod: SimRawModule) -> None:
    x = torch.randint(-1000, 1000, (3000,), dtype=torch.int32)
    mx, mn = torch.tensor([-(2**31)], dtype=torch.int32), torch.tensor([2**31 - 1], dtype=torch.int32)
    cnt = torch.zeros(1, dtype=torch.uint64)
    fsum, dsum = torch.zeros(1), torch.zeros(1, dtype=torch.float64)
    winner = torch.tensor([-1], dtype=torch.int32)
    mod.get_function("atom_misc")(12, 256, (x, 3000, mx, mn, cnt, fsum, dsum, winner))
    assert mx.item() == x.max().item() and mn.item() == x.min().item()
    assert int(cnt.view(torch.int64).item()) == 3000 and fsum.item() == 3000.0
    assert dsum.item() == x.double().sum().item()
    assert 0 <= winner.item() < 3000


def test_dynamic_shared(mod: SimRawModule) -> None:
    x = torch.arange(384, dtype=torch.float32)
    y = torch.zeros(384)
    mod.get_function("dyn_reverse")(3, 128, (x, y), shared_mem=128 * 4)
    torch.testing.assert_close(y, x.view(3, 128).flip(1).reshape(-1))


def test_templates_via_name_expressions(mod: SimRawModule) -> None:
    y, x = torch.ones(100), torch.arange(100, dtype=torch.float32)
    mod.get_function("axpy<float>")(1, 128, (y, x, 2.0, 100))
    torch.testing.assert_close(y, 2 * torch.arange(100, dtype=torch.float32) + 1)
    yi, xi = np.ones(100, np.int32), np.arange(100, dtype=np.int32)
    f = mod.get_function("axpy<int>")
    assert f.signature == "axpy<int>(int*, const int*, int, int)"
    f(1, 128, (yi, xi, np.int32(3), 100))
    np.testing.assert_array_equal(yi, 3 * np.arange(100) + 1)


def test_syncthreads_predicates(mod: SimRawModule) -> None:
    p = np.zeros(64, np.int32)
    p[[3, 40]] = 1
    cnt, all_, any_ = (np.zeros(64, np.int32) for _ in range(3))
    mod.get_function("sync_preds")(1, 64, (p, cnt, all_, any_))
    assert (cnt == 2).all() and (all_ == 0).all() and (any_ == 1).all()


def test_bit_intrinsics(mod: SimRawModule) -> None:
    x = np.array([0, 1, 2, 0x80000000, 0xFFFFFFFF, 0x12345678, 0x3F800000, 0x7FC00000], np.uint32)
    popc, clz, ffs = (np.zeros(8, np.int32) for _ in range(3))
    brev, back, f = np.zeros(8, np.uint32), np.zeros(8, np.uint32), np.zeros(8, np.float32)
    mod.get_function("bits")(1, 8, (x, popc, clz, ffs, brev, f, back))
    ints = [int(v) for v in x]
    assert list(popc) == [bin(v).count("1") for v in ints]
    assert list(clz) == [32 - v.bit_length() for v in ints]
    assert list(ffs) == [(v & -v).bit_length() for v in ints]
    assert list(brev) == [int(f"{v:032b}"[::-1], 2) for v in ints]
    np.testing.assert_array_equal(f.view(np.uint32), x)
    np.testing.assert_array_equal(back, x)


def test_half_bfloat16_round_trip(mod: SimRawModule) -> None:
    x = torch.cat([torch.randn(250) * 100, torch.tensor([0.0, -0.0, 1e-8, 65504.0, 70000.0, float("inf")])])
    n = x.numel()
    hb, bb = torch.zeros(n, dtype=torch.int16), torch.zeros(n, dtype=torch.int16)
    hback, bback, hin_f, bin_f = (torch.zeros(n) for _ in range(4))
    hin, bin_ = x.half(), x.bfloat16()
    mod.get_function("halves")(1, n, (x, hb, hback, bb, bback, hin, bin_, hin_f, bin_f))
    assert torch.equal(hb, x.half().view(torch.int16))
    assert torch.equal(bb, x.bfloat16().view(torch.int16))
    assert torch.equal(hback, x.half().float()) and torch.equal(bback, x.bfloat16().float())
    assert torch.equal(hin_f, hin.float()) and torch.equal(bin_f, bin_.float())


def test_scalar_conversions(mod: SimRawModule) -> None:
    out = np.zeros(7, np.int64)
    f = mod.get_function("scalars")
    f(1, 1, (out, -(2**40), 2**63 + 5, 1.25, np.float64(2.5), True, np.int16(-7), 200))
    assert list(out) == [-(2**40), -(2**63) + 5, 5, 10, 1, -7, 200]


def test_nanosleep_lets_block_threads_progress(mod: SimRawModule) -> None:
    order = np.full(64, -1, np.int32)
    mod.get_function("token_ring")(1, 64, (order,))
    np.testing.assert_array_equal(order, np.arange(63, -1, -1))


@pytest.mark.parametrize("schedule,seed", [("forward", 0), ("reverse", 0), ("random", 1), ("random", 2)])
def test_tiled_gemm_schedules(schedule: str, seed: int) -> None:
    g = torch.Generator().manual_seed(3)
    m, k, n = 70, 45, 50  # ragged: exercises the bounds checks
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    c = torch.zeros(m, n)
    _gemm(schedule, seed)(((n + 15) // 16, (m + 15) // 16), (16, 16), (a, b, c, m, n, k))
    torch.testing.assert_close(c, a @ b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("drop", ["DROP_FIRST_SYNC", "DROP_SECOND_SYNC"])
def test_missing_barrier_is_caught(drop: str) -> None:
    g = torch.Generator().manual_seed(4)
    m = k = n = 64
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    wrong = []
    for schedule, seed in [("forward", 0), ("reverse", 0), ("random", 0), ("random", 1)]:
        c = torch.zeros(m, n)
        _gemm(schedule, seed, options=(f"-D{drop}",))((4, 4), (16, 16), (a, b, c, m, n, k))
        wrong.append(not torch.allclose(c, a @ b, rtol=1e-4, atol=1e-4))
    assert all(wrong), f"a GEMM missing a __syncthreads gave right results under some schedule: {wrong}"


def test_ucontext_fallback() -> None:
    """The portable switch (used off x86-64) runs the same GEMM and reports barrier errors."""
    m = k = n = 48
    a, b = torch.randn(m, k), torch.randn(k, n)
    c = torch.zeros(m, n)
    _gemm("random", 7, options=("-DCUDASIM_USE_UCONTEXT",))((3, 3), (16, 16), (a, b, c, m, n, k))
    torch.testing.assert_close(c, a @ b, rtol=1e-4, atol=1e-4)
    dl = SimRawModule(DEADLOCKS, options=("-DCUDASIM_USE_UCONTEXT",), threads=1)
    with pytest.raises(RuntimeError, match="can never complete"):
        dl.get_function("exited")(1, 64, (np.ones(64, np.float32),))


def test_gemm_256_speed() -> None:
    n = 256
    a, b = torch.rand(n, n), torch.rand(n, n)
    c = torch.zeros(n, n)
    f = _gemm("forward", threads=1)
    t0 = time.perf_counter()
    f((16, 16), (16, 16), (a, b, c, n, n, n))
    dt = time.perf_counter() - t0
    torch.testing.assert_close(c, a @ b, rtol=1e-4, atol=1e-3)
    print(f"256^3 tiled GEMM on 1 worker: {dt * 1e3:.1f} ms")
    assert dt < 5.0  # target is well under 1 s; generous for a noisy shared machine


def test_wmma_gemm() -> None:
    g = torch.Generator().manual_seed(5)
    m, n, k = 32, 48, 64
    a, b = torch.randn(m, k, generator=g).half(), torch.randn(n, k, generator=g).half()
    c = torch.zeros(m, n)
    SimRawModule(WMMA).get_function("wmma_gemm")((n // 16, m // 16), 32, (a, b, c, m, n, k))
    torch.testing.assert_close(c, 2 * a.float() @ b.float().T, rtol=1e-4, atol=1e-4)


WMMA_ERRORS = r"""
#include <mma.h>
using namespace nvcuda;
extern "C" __global__ void exited(const __half* A, float* C) {
  if (threadIdx.x == 5) return;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
  wmma::fill_fragment(c, 0.0f);
  wmma::load_matrix_sync(a, A, 16);
  wmma::load_matrix_sync(b, A, 16);
  wmma::mma_sync(c, a, b, c);
}
extern "C" __global__ void misaligned(const __half* A, float* C) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
  wmma::load_matrix_sync(a, A + 1, 16);
}
extern "C" __global__ void bad_ldm(const __half* A, float* C) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
  wmma::load_matrix_sync(a, A, 12);
}
"""


@pytest.mark.parametrize(("kernel", "message"), [
    ("exited", "every lane of the warp"), ("misaligned", "256-bit aligned"), ("bad_ldm", "multiple of 16 bytes"),
])
def test_wmma_misuse_is_an_error(kernel: str, message: str) -> None:
    """What a GPU requires of wmma (the whole warp in mma_sync, aligned pointers, ldm of 16-byte multiples)."""
    a = torch.zeros(16 * 32, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=message):
        SimRawModule(WMMA_ERRORS).get_function(kernel)((1,), 32, (a, torch.zeros(256)))


def test_wmma_bf16_distributed_fragments() -> None:
    """bfloat16 operands, elementwise ops on the 8 per-lane elements, several warps per block."""
    g = torch.Generator().manual_seed(9)
    m, n, k = 16, 64, 32
    a, b = torch.randn(m, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()
    c = torch.zeros(m, n)
    src = WMMA.replace("__half", "__nv_bfloat16")
    SimRawModule(src).get_function("wmma_gemm")((n // 16, m // 16), 32, (a, b, c, m, n, k))
    torch.testing.assert_close(c, 2 * a.float() @ b.float().T, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Barriers that can never complete -> RuntimeError (run in a child process: a bug must not hang CI)
# ------------------------------------------------------------------------------------------------
DEADLOCKS = r"""
extern "C" __global__ void exited(float* x) {
  if (threadIdx.x < 16) return;
  __syncthreads();
  x[threadIdx.x] = 1.f;
}
extern "C" __global__ void divergent(float* x) {
  if (threadIdx.x < 16) { __syncthreads(); } else { __syncthreads(); }
}
extern "C" __global__ void warp_vs_block(float* x) {
  if ((threadIdx.x & 31) < 16) x[threadIdx.x] = __shfl_sync(0xffffffffu, x[threadIdx.x], 0);
  else __syncthreads();
}
extern "C" __global__ void bad_mask(float* x) {
  x[threadIdx.x] = __shfl_sync(0x1u, x[threadIdx.x], 0);
}
extern "C" __global__ void trap(float* x) {
  if (threadIdx.x == 5) __trap();
  __syncthreads();
}
extern "C" __global__ void failed_assert(float* x) { assert(x[threadIdx.x] < 0.f); }
// Exited lanes do not count in a warp mask (CUDA: "all non-exited threads named in mask").
extern "C" __global__ void exited_lanes_ok(float* x) {
  if (threadIdx.x >= 20) return;
  x[threadIdx.x] = __shfl_sync(0xffffffffu, x[threadIdx.x], 3);
}
"""

CHILD = r"""
import sys, numpy as np
from sparsekit._cudasim import SimRawModule
mod = SimRawModule(sys.stdin.read(), schedule="forward", threads=1)
for name in sys.argv[1:]:
    x = np.ones(64, np.float32)
    try:
        mod.get_function(name)(2, 64, (x,))
    except RuntimeError as e:
        print(name, "RuntimeError:", str(e).replace("\\n", " "), flush=True)
    else:
        print(name, "OK", flush=True)
"""
ERROR_CASES = {
    "exited": "can never complete",
    "divergent": "divergent __syncthreads",
    "warp_vs_block": "deadlock",
    "bad_mask": "does not contain the calling lane",
    "trap": "__trap",
    "failed_assert": "assertion",
}


@pytest.fixture(scope="module")
def child_results() -> dict[str, str]:
    """All error kernels in one child process with a timeout: a shim bug must fail, not hang CI."""
    names = [*ERROR_CASES, "exited_lanes_ok"]
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *names], input=DEADLOCKS, capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines())


@pytest.mark.parametrize("kernel,needle", list(ERROR_CASES.items()))
def test_kernel_errors_raise(child_results: dict[str, str], kernel: str, needle: str) -> None:
    out = child_results[kernel]
    assert out.startswith("RuntimeError:") and needle in out, out


def test_exited_lanes_leave_warp_masks(child_results: dict[str, str]) -> None:
    assert child_results["exited_lanes_ok"] == "OK"


def test_kernel_error_in_process(mod: SimRawModule) -> None:
    """The same error path in this process, and the module stays usable afterwards."""
    dl = SimRawModule(DEADLOCKS, threads=2)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"block \(\d+,0,0\).*can never complete"):
        dl.get_function("exited")(8, 64, (np.ones(64, np.float32),))
    assert time.perf_counter() - t0 < 10
    x = np.ones(64, np.float32)
    dl.get_function("exited_lanes_ok")(1, 64, (x,))


# ------------------------------------------------------------------------------------------------
# Argument and launch checks
# ------------------------------------------------------------------------------------------------
def test_signature_type_errors(mod: SimRawModule) -> None:
    f = mod.get_function("vadd")
    assert f.signature == "vadd(const float*, const float*, float*, int)"
    a, c = torch.zeros(8), torch.zeros(8)
    with pytest.raises(TypeError, match=r"args\[3\].*'int'.*numpy.int32"):
        f(1, 8, (a, a, c, np.int64(8)))
    with pytest.raises(TypeError, match=r"args\[0\].*'const float\*'.*float32.*got float64"):
        f(1, 8, (a.double(), a, c, 8))
    with pytest.raises(TypeError, match=r"args\[2\].*got int32"):
        f(1, 8, (a, a, np.zeros(8, np.int32), 8))
    with pytest.raises(TypeError, match="takes 4 arguments, got 3"):
        f(1, 8, (a, a, c))
    with pytest.raises(TypeError, match="expected an int"):
        f(1, 8, (a, a, c, 8.0))
    with pytest.raises(TypeError, match="does not fit"):
        f(1, 8, (a, a, c, 2**31))
    with pytest.raises(TypeError, match="expected a CPU torch tensor"):
        f(1, 8, (a, [0.0] * 8, c, 8))
    with pytest.raises(ValueError, match="not contiguous"):
        f(1, 8, (a, torch.zeros(16)[::2], c, 8))
    ro = np.zeros(8, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        f(1, 8, (a, a, ro, 8))
    f(1, 8, (a, ro, SimPointer(c.data_ptr()), 8))  # const pointer takes a read-only array; raw escape hatch
    s = mod.get_function("scalars")
    out = np.zeros(7, np.int64)
    with pytest.raises(TypeError, match="numpy.float32"):
        s(1, 1, (out, 1, 1, np.float64(1.0), 1.0, True, 1, 1))
    with pytest.raises(TypeError, match="expected bool"):
        s(1, 1, (out, 1, 1, 1.0, 1.0, 1, 1, 1))
    with pytest.raises(TypeError, match="does not fit"):
        s(1, 1, (out, 1, -1, 1.0, 1.0, True, 1, 1))


def test_cuda_tensor_rejected(mod: SimRawModule) -> None:
    class FakeCuda(torch.Tensor):  # no GPU here: fake only the device attribute
        @property
        def device(self) -> torch.device:  # type: ignore[override]
            return torch.device("cuda", 0)

    a = torch.zeros(8).as_subclass(FakeCuda)
    with pytest.raises(TypeError, match="cuda tensor"):
        mod.get_function("vadd")(1, 8, (a, torch.zeros(8), torch.zeros(8), 8))


def test_launch_validation(mod: SimRawModule) -> None:
    f = mod.get_function("vadd")
    a = torch.zeros(8)
    with pytest.raises(ValueError, match="1024"):
        f(1, (32, 33), (a, a, a, 8))
    with pytest.raises(ValueError, match="> 0"):
        f((0, 1), 8, (a, a, a, 8))
    with pytest.raises(ValueError, match="shared_mem"):
        f(1, 8, (a, a, a, 8), shared_mem=228 * 1024 + 1)
    with pytest.raises(KeyError):
        mod.get_function("nope")


def test_includes_line_directives_and_compile_errors(tmp_path: Path) -> None:
    (tmp_path / "common.cuh").write_text(
        "#pragma once\n#include <cuda_fp16.h>\n__device__ __forceinline__ float twice(float v) { return 2.f * v; }\n"
        "extern __shared__ float common_smem[];\n"
    )
    code = textwrap.dedent(
        """\
        #line 1 "select.cu"
        #include "common.cuh"
        #include "common.cuh"
        extern "C" __global__ void k(float* x) {
          common_smem[threadIdx.x] = twice(x[threadIdx.x]) * SCALE;
          __syncthreads();
          x[threadIdx.x] = common_smem[blockDim.x - 1 - threadIdx.x];
        }
        __global__ void cpp_linkage(float* x) {}
        """
    )
    mod = SimRawModule(code, options=(f"-I{tmp_path}", "-DSCALE=3", "--use_fast_math"))
    x = torch.arange(4, dtype=torch.float32)
    mod.get_function("k")(1, 4, (x,), shared_mem=16)
    torch.testing.assert_close(x, torch.tensor([18.0, 12.0, 6.0, 0.0]))
    with pytest.raises(KeyError, match="C\\+\\+ linkage"):
        mod.get_function("cpp_linkage")
    # `#line 1` numbers the next line 1; lines after an inlined include keep their numbers
    bad = '#line 1 "select.cu"\n#include "common.cuh"\nextern "C" __global__ void k(float* x) {\n  x[0] = nope;\n}\n'
    with pytest.raises(RuntimeError, match=r"select\.cu:3:\d+: error: .nope. was not declared"):
        SimRawModule(bad, options=("-I", str(tmp_path)))


def test_missing_compiler_is_a_clear_runtime_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSEKIT_SIM_CXX", "definitely-not-a-compiler")
    with pytest.raises(RuntimeError, match="not found"):
        SimRawModule('extern "C" __global__ void k() {}')
