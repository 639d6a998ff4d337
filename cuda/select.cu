// Exact selection on CUDA tensors: radix histograms over order-preserving key bits, mask writing
// with exact tie handling, and N:M masks. Launched by python/sparsekit/_cuda_select.py; executed on
// the CPU in tests through cuda/sim. Keys: see common.cuh.
#include "common.cuh"

// One radix pass: histogram of the 8-bit digit at `digit_shift` over the keys whose bits above
// `prefix_shift` equal `prefix` (prefix_shift = key bits: all keys). `nan_flag` (may be null) is set
// when a NaN is seen. Grid-stride; per-block shared histogram, then global atomics.
template <typename Bits, int BY_VALUE>
__global__ void radix_hist(const Bits* __restrict__ x, long long n, unsigned long long prefix, int prefix_shift,
                           int digit_shift, Bits nan_abs, unsigned long long* __restrict__ hist,
                           unsigned int* __restrict__ nan_flag) {
    __shared__ unsigned int counts[SK_RADIX_BINS];
    for (int i = threadIdx.x; i < SK_RADIX_BINS; i += blockDim.x) counts[i] = 0;
    __syncthreads();
    bool saw_nan = false;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const Bits bits = x[i];
        saw_nan |= sk_is_nan<Bits>(bits, nan_abs);
        const unsigned long long key = sk_key<Bits, BY_VALUE>(bits);
        if (sk_matches(key, prefix, prefix_shift)) {
            atomicAdd(&counts[(key >> digit_shift) & (SK_RADIX_BINS - 1)], 1u);
        }
    }
    if (saw_nan && nan_flag != nullptr) atomicOr(nan_flag, 1u);
    __syncthreads();
    for (int i = threadIdx.x; i < SK_RADIX_BINS; i += blockDim.x) {
        if (counts[i] != 0) atomicAdd(&hist[i], (unsigned long long)counts[i]);
    }
}

// mask = key >= threshold over one chunk of SK_CHUNK elements per block; also counts, per block, the
// keys equal to the threshold (so the host can hand out exactly `take_equal` of them in index order).
template <typename Bits, int BY_VALUE>
__global__ void mask_at_least(const Bits* __restrict__ x, long long n, unsigned long long threshold,
                              bool* __restrict__ out, unsigned long long* __restrict__ equal_per_block) {
    __shared__ unsigned int equal;
    if (threadIdx.x == 0) equal = 0;
    __syncthreads();
    const long long start = (long long)blockIdx.x * SK_CHUNK;
    const long long end = start + SK_CHUNK < n ? start + SK_CHUNK : n;
    unsigned int mine = 0;
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        const unsigned long long key = sk_key<Bits, BY_VALUE>(x[i]);
        out[i] = key >= threshold;
        mine += key == threshold;
    }
    if (mine != 0) atomicAdd(&equal, mine);
    __syncthreads();
    if (threadIdx.x == 0) equal_per_block[blockIdx.x] = equal;
}

// Keep only the first keep[b] keys equal to the threshold in block b's chunk (index order): a
// block-wide scan of "is equal" flags, tile by tile, built from warp ballots. Blocks that keep all
// their equal keys return at once.
template <typename Bits, int BY_VALUE>
__global__ void mask_trim_equal(const Bits* __restrict__ x, long long n, unsigned long long threshold,
                                bool* __restrict__ out, const unsigned long long* __restrict__ equal_per_block,
                                const long long* __restrict__ keep) {
    __shared__ unsigned int warp_totals[32];
    const long long keep_here = keep[blockIdx.x];
    if ((unsigned long long)keep_here >= equal_per_block[blockIdx.x]) return;  // uniform per block
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    const long long start = (long long)blockIdx.x * SK_CHUNK;
    const long long end = start + SK_CHUNK < n ? start + SK_CHUNK : n;
    long long seen = 0;  // equal keys before the current tile, in index order
    for (long long base = start; base < end; base += blockDim.x) {
        const long long i = base + threadIdx.x;
        const bool is_equal = i < end && sk_key<Bits, BY_VALUE>(x[i]) == threshold;
        const unsigned int ballot = __ballot_sync(0xffffffffu, is_equal);
        if (lane == 0) warp_totals[warp] = __popc(ballot);
        __syncthreads();
        long long before = seen + __popc(ballot & ((1u << lane) - 1u));
        long long tile_total = 0;
        for (int w = 0; w < warps; ++w) {
            if (w < warp) before += warp_totals[w];
            tile_total += warp_totals[w];
        }
        if (is_equal && before >= keep_here) out[i] = false;
        seen += tile_total;
        __syncthreads();  // warp_totals is rewritten by the next tile
    }
}

// N:M mask: one thread per group of m elements along the group axis of a (outer, len, inner) view;
// keep the n largest keys, ties to the lower position. m <= SK_MAX_GROUP keeps keys in registers.
template <typename Bits, int BY_VALUE>
__global__ void nm_mask(const Bits* __restrict__ x, bool* __restrict__ out, long long groups, long long len,
                        long long inner, int n, int m, Bits nan_abs, unsigned int* __restrict__ nan_flag) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long per_row = (len / m) * inner;
    for (long long gid = (long long)blockIdx.x * blockDim.x + threadIdx.x; gid < groups; gid += stride) {
        const long long o = gid / per_row;
        const long long rest = gid - o * per_row;
        const long long g = rest / inner;
        const long long i = rest - g * inner;
        const long long base = o * len * inner + g * m * inner + i;
        unsigned long long keys[SK_MAX_GROUP];
        bool saw_nan = false;
        for (int j = 0; j < m; ++j) {
            const Bits bits = x[base + (long long)j * inner];
            saw_nan |= sk_is_nan<Bits>(bits, nan_abs);
            if (j < SK_MAX_GROUP) keys[j] = sk_key<Bits, BY_VALUE>(bits);
        }
        if (saw_nan) atomicOr(nan_flag, 1u);
        for (int j = 0; j < m; ++j) {
            const unsigned long long kj = j < SK_MAX_GROUP ? keys[j] : sk_key<Bits, BY_VALUE>(x[base + (long long)j * inner]);
            int rank = 0;
            for (int l = 0; l < m; ++l) {
                const unsigned long long kl = l < SK_MAX_GROUP ? keys[l] : sk_key<Bits, BY_VALUE>(x[base + (long long)l * inner]);
                rank += (kl > kj) || (kl == kj && l < j);
            }
            out[base + (long long)j * inner] = rank < n;
        }
    }
}
