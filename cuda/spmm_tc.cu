// Block-sparse GEMM on tensor cores (wmma 16x16x16, fp16 / bf16 inputs, fp32 accumulation, one rounding
// to the output dtype): DSD y = x @ W^T, its transposed-operand form dx = dy @ W through the transpose
// metadata, and SDD (dense x dense sampled at W's blocks). W is [N, K] with blocks (bh, bw), multiples of
// 16. A CTA is 4 warps (128 threads); each warp owns one 16x16 tile of the output. Tiles of the operands
// go through shared memory (rows padded to 24 elements: 48 B, a multiple of 16 B as wmma needs, and
// off the bank-conflict stride); with VEC (the launch code checks 16-byte alignment of every base
// pointer and row pitch) each thread moves 8 elements as one 16-byte load. The summation order is fixed
// (nonzero blocks in order, 16-wide k steps in order, SDD's 4 partial sums added as (w0 + w1) + (w2 + w3)),
// so results are deterministic. Launched by python/sparsekit/_cuda_spmm.py.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>

#include "common.cuh"

#define SK_TC_PAD 24   // smem row pitch of a 16-wide operand tile (elements)
#define SK_TC_CPAD 20  // smem row pitch of a 16-wide fp32 output tile (elements: 80 B)

namespace sk_tc {
using namespace nvcuda;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_t;

template <typename T> __device__ __forceinline__ T zero() { return T(0.0f); }
template <typename T> __device__ __forceinline__ T from_float(float v) { return T(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// 8 consecutive elements src[0..8) (or zeros when !ok) into dst[0..8): one 16-byte move with VEC.
template <typename T, bool VEC>
__device__ __forceinline__ void copy8(T* dst, const T* src, bool ok) {
    if (VEC) {
        *reinterpret_cast<uint4*>(dst) = ok ? *reinterpret_cast<const uint4*>(src) : make_uint4(0u, 0u, 0u, 0u);
    } else {
        for (int e = 0; e < 8; ++e) dst[e] = ok ? src[e] : zero<T>();
    }
}

// One warp's 16x16 fp32 tile (in smem, pitch SK_TC_CPAD) to out (pitch ld), rows < rows_left; lane l
// writes half a row, 8 consecutive outputs (entries other lanes stored: the barrier before is needed).
template <typename T>
__device__ __forceinline__ void write_tile(T* out, long long ld, const float* tile, long long rows_left) {
    const int lane = threadIdx.x % 32, r = lane / 2, c0 = (lane % 2) * 8;
    if (r < rows_left)
        for (int c = c0; c < c0 + 8; ++c) out[r * ld + c] = from_float<T>(tile[r * SK_TC_CPAD + c]);
}
}  // namespace sk_tc

// y[M, N] = x[M, K] @ W^T. grid (ceil(M/64), N/16), 128 threads; the CTA's 16 columns lie in block-row n0/bh.
template <typename T, bool VEC>
__global__ void __launch_bounds__(128) spmm_tc_dsd(const T* x, const T* values, const long long* row_offsets,
                                                   const long long* col_indices, T* y, long long M, long long N,
                                                   long long K, int bh, int bw) {
    using namespace nvcuda;
    __shared__ __align__(32) T xs[64][SK_TC_PAD];
    __shared__ __align__(32) T ws[16][SK_TC_PAD];
    __shared__ __align__(32) float cs[4][16][SK_TC_CPAD];
    const int t = threadIdx.x, warp = t / 32;
    const long long m0 = (long long)blockIdx.x * 64, n0 = (long long)blockIdx.y * 16;
    const long long r = n0 / bh, nb = n0 % bh;
    sk_tc::acc_t acc;
    wmma::fill_fragment(acc, 0.0f);
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // b(k, j) = W[n0 + j, k]
    const int xr = t / 2, xc = (t % 2) * 8;  // this thread's 8 elements of the x tile
    for (long long p = row_offsets[r]; p < row_offsets[r + 1]; ++p) {
        const long long c = col_indices[p];
        const T* blk = values + p * (long long)bh * bw;
        for (int kk = 0; kk < bw; kk += 16) {
            const long long m = m0 + xr;
            sk_tc::copy8<T, VEC>(&xs[xr][xc], x + (m < M ? m : 0) * K + c * bw + kk + xc, m < M);
            if (t < 32) sk_tc::copy8<T, VEC>(&ws[xr][xc], blk + (nb + xr) * bw + kk + xc, true);
            __syncthreads();
            wmma::load_matrix_sync(a, &xs[warp * 16][0], SK_TC_PAD);
            wmma::load_matrix_sync(b, &ws[0][0], SK_TC_PAD);
            wmma::mma_sync(acc, a, b, acc);
            __syncthreads();
        }
    }
    wmma::store_matrix_sync(&cs[warp][0][0], acc, SK_TC_CPAD, wmma::mem_row_major);
    __syncthreads();
    const long long row0 = m0 + warp * 16;
    if (row0 < M) sk_tc::write_tile<T>(y + row0 * N + n0, N, &cs[warp][0][0], M - row0);
}

// dx[M, K] = dy[M, N] @ W. grid (ceil(M/64), K/16), 128 threads; the CTA's 16 columns lie in block-column
// k0/bw, whose blocks are listed by t_offsets / t_perm / t_row_indices (no transpose materialised).
template <typename T, bool VEC>
__global__ void __launch_bounds__(128) spmm_tc_dsd_t(const T* dy, const T* values, const long long* t_offsets,
                                                     const long long* t_perm, const long long* t_row_indices,
                                                     T* dx, long long M, long long N, long long K, int bh, int bw) {
    using namespace nvcuda;
    __shared__ __align__(32) T ds[64][SK_TC_PAD];
    __shared__ __align__(32) T ws[16][SK_TC_PAD];
    __shared__ __align__(32) float cs[4][16][SK_TC_CPAD];
    const int t = threadIdx.x, warp = t / 32;
    const long long m0 = (long long)blockIdx.x * 64, k0 = (long long)blockIdx.y * 16;
    const long long c = k0 / bw, kb = k0 % bw;
    sk_tc::acc_t acc;
    wmma::fill_fragment(acc, 0.0f);
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;  // b(q, j) = W[r*bh + nn + q, k0 + j]
    const int xr = t / 2, xc = (t % 2) * 8;
    for (long long j = t_offsets[c]; j < t_offsets[c + 1]; ++j) {
        const long long r = t_row_indices[j];
        const T* blk = values + t_perm[j] * (long long)bh * bw;
        for (int nn = 0; nn < bh; nn += 16) {
            const long long m = m0 + xr;
            sk_tc::copy8<T, VEC>(&ds[xr][xc], dy + (m < M ? m : 0) * N + r * bh + nn + xc, m < M);
            if (t < 32) sk_tc::copy8<T, VEC>(&ws[xr][xc], blk + (nn + xr) * bw + kb + xc, true);
            __syncthreads();
            wmma::load_matrix_sync(a, &ds[warp * 16][0], SK_TC_PAD);
            wmma::load_matrix_sync(b, &ws[0][0], SK_TC_PAD);
            wmma::mma_sync(acc, a, b, acc);
            __syncthreads();
        }
    }
    wmma::store_matrix_sync(&cs[warp][0][0], acc, SK_TC_CPAD, wmma::mem_row_major);
    __syncthreads();
    const long long row0 = m0 + warp * 16;
    if (row0 < M) sk_tc::write_tile<T>(dx + row0 * K + k0, K, &cs[warp][0][0], M - row0);
}

// out[p, i, j] = sum_m a[m, r*bh + i] * b[m, c*bw + j] for block p = (r, c). grid (nnz, (bh/16)*(bw/16)),
// 128 threads: the CTA walks M in chunks of 64 rows, warp w taking rows 16w..16w+15 of each chunk.
template <typename T, bool VEC>
__global__ void spmm_tc_sdd(const T* a, const T* b, const long long* row_offsets,
                                                   const long long* col_indices, T* out, long long M, long long N,
                                                   long long K, long long n_rows, int bh, int bw) {
    using namespace nvcuda;
    __shared__ __align__(32) T as[64][SK_TC_PAD];
    __shared__ __align__(32) T bs[64][SK_TC_PAD];
    __shared__ __align__(32) float cs[4][16][SK_TC_CPAD];
    const int t = threadIdx.x, warp = t / 32;
    const long long p = blockIdx.x;
    const long long r = sk_last_at_most(row_offsets, n_rows, p), c = col_indices[p];  // block p's block-row
    const int tiles_j = bw / 16;
    const int i0 = (blockIdx.y / tiles_j) * 16, j0 = (blockIdx.y % tiles_j) * 16;
    sk_tc::acc_t acc;
    wmma::fill_fragment(acc, 0.0f);
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa;  // fa(i, q) = a[m + q, r*bh + i0 + i]
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;  // fb(q, j) = b[m + q, c*bw + j0 + j]
    const int xr = t / 2, xc = (t % 2) * 8;
    for (long long m0 = 0; m0 < M; m0 += 64) {
        const long long m = m0 + xr, ms = m < M ? m : 0;
        sk_tc::copy8<T, VEC>(&as[xr][xc], a + ms * N + r * bh + i0 + xc, m < M);
        sk_tc::copy8<T, VEC>(&bs[xr][xc], b + ms * K + c * bw + j0 + xc, m < M);
        __syncthreads();
        wmma::load_matrix_sync(fa, &as[warp * 16][0], SK_TC_PAD);
        wmma::load_matrix_sync(fb, &bs[warp * 16][0], SK_TC_PAD);
        wmma::mma_sync(acc, fa, fb, acc);
        __syncthreads();
    }
    wmma::store_matrix_sync(&cs[warp][0][0], acc, SK_TC_CPAD, wmma::mem_row_major);
    __syncthreads();
    T* dst = out + p * (long long)bh * bw + (long long)i0 * bw + j0;
    for (int e = t; e < 256; e += 128) {
        const int i = e / 16, j = e % 16;
        const float s = (cs[0][i][j] + cs[1][i][j]) + (cs[2][i][j] + cs[3][i][j]);
        dst[(long long)i * bw + j] = sk_tc::from_float<T>(s);
    }
}
