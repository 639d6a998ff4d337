// Block-sparse GEMM (fp32 / fp64 SIMT, shared-memory tiled): DSD y = x @ W^T, its transposed-operand form
// dx = dy @ W through the transpose metadata, and SDD (dense x dense sampled at W's blocks).
// W is [N, K] with blocks (bh, bw), bh and bw multiples of 16. Each CTA is 16x16 threads computing a
// 16x16 output tile; the summation order is fixed (per nonzero block, then 0..15 inside a chunk).
// Launched by python/sparsekit/_cuda_spmm.py. float16/bfloat16: the tensor-core kernels of spmm_tc.cu.
#include "common.cuh"

#define SK_T 16

// y[M, N] = x[M, K] @ W^T. grid (ceil(M/16), N/16); the CTA's 16 columns lie in block-row n0 / bh.
template <typename T>
__global__ void spmm_dsd(const T* x, const T* values, const long long* row_offsets, const long long* col_indices,
                         T* y, long long M, long long N, long long K, int bh, int bw) {
    __shared__ T xs[SK_T][SK_T + 1];
    __shared__ T ws[SK_T][SK_T + 1];
    const int tx = threadIdx.x % SK_T, ty = threadIdx.x / SK_T;
    const long long m0 = (long long)blockIdx.x * SK_T, n0 = (long long)blockIdx.y * SK_T;
    const long long r = n0 / bh, nb = n0 % bh;
    T acc = (T)0;
    for (long long p = row_offsets[r]; p < row_offsets[r + 1]; ++p) {
        const long long c = col_indices[p];
        const T* blk = values + p * (long long)bh * bw;
        for (int kk = 0; kk < bw; kk += SK_T) {
            const long long m = m0 + ty;
            xs[ty][tx] = m < M ? x[m * K + c * bw + kk + tx] : (T)0;
            ws[ty][tx] = blk[(nb + ty) * bw + kk + tx];
            __syncthreads();
            for (int q = 0; q < SK_T; ++q) acc += xs[ty][q] * ws[tx][q];
            __syncthreads();
        }
    }
    if (m0 + ty < M) y[(m0 + ty) * N + n0 + tx] = acc;
}

// dx[M, K] = dy[M, N] @ W. grid (ceil(M/16), K/16); the CTA's 16 columns lie in block-column k0 / bw,
// whose blocks are listed by t_offsets / t_perm / t_row_indices.
template <typename T>
__global__ void spmm_dsd_t(const T* dy, const T* values, const long long* t_offsets, const long long* t_perm,
                           const long long* t_row_indices, T* dx, long long M, long long N, long long K, int bh, int bw) {
    __shared__ T ds[SK_T][SK_T + 1];
    __shared__ T ws[SK_T][SK_T + 1];
    const int tx = threadIdx.x % SK_T, ty = threadIdx.x / SK_T;
    const long long m0 = (long long)blockIdx.x * SK_T, k0 = (long long)blockIdx.y * SK_T;
    const long long c = k0 / bw, kb = k0 % bw;
    T acc = (T)0;
    for (long long j = t_offsets[c]; j < t_offsets[c + 1]; ++j) {
        const long long r = t_row_indices[j];
        const T* blk = values + t_perm[j] * (long long)bh * bw;
        for (int nn = 0; nn < bh; nn += SK_T) {
            const long long m = m0 + ty;
            ds[ty][tx] = m < M ? dy[m * N + r * bh + nn + tx] : (T)0;
            ws[ty][tx] = blk[(nn + ty) * bw + kb + tx];
            __syncthreads();
            for (int q = 0; q < SK_T; ++q) acc += ds[ty][q] * ws[q][tx];
            __syncthreads();
        }
    }
    if (m0 + ty < M) dx[(m0 + ty) * K + k0 + tx] = acc;
}

// out[p, i, j] = sum_m a[m, r*bh + i] * b[m, c*bw + j] for block p = (r, c). grid (nnz, (bh/16)*(bw/16)).
template <typename T>
__global__ void spmm_sdd(const T* a, const T* b, const long long* row_offsets, const long long* col_indices,
                         T* out, long long M, long long N, long long K, long long n_rows, int bh, int bw) {
    __shared__ T as[SK_T][SK_T + 1];
    __shared__ T bs[SK_T][SK_T + 1];
    const int tx = threadIdx.x % SK_T, ty = threadIdx.x / SK_T;
    const long long p = blockIdx.x;
    const long long r = sk_last_at_most(row_offsets, n_rows, p), c = col_indices[p];  // block p's block-row
    const int tiles_j = bw / SK_T;
    const int i0 = (blockIdx.y / tiles_j) * SK_T, j0 = (blockIdx.y % tiles_j) * SK_T;
    T acc = (T)0;
    for (long long m0 = 0; m0 < M; m0 += SK_T) {
        const long long m = m0 + ty;
        as[ty][tx] = m < M ? a[m * N + r * bh + i0 + tx] : (T)0;
        bs[ty][tx] = m < M ? b[m * K + c * bw + j0 + tx] : (T)0;
        __syncthreads();
        for (int q = 0; q < SK_T; ++q) acc += as[q][ty] * bs[q][tx];
        __syncthreads();
    }
    out[p * (long long)bh * bw + (long long)(i0 + ty) * bw + j0 + tx] = acc;
}
