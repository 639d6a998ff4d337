// Exact selection on CUDA tensors: a most-significant-digit radix select over order-preserving key
// bits across many tensors at once (a device table of tensors, nothing concatenated), mask writing
// with exact tie handling, and N:M masks. Launched by python/sparsekit/_cuda_select.py; executed on
// the CPU in tests through cuda/sim. Keys and the tensor table: see common.cuh.
//
// Every step of a select reads its inputs (prefix, rank left) from a small device state vector and
// writes its results back there, so a whole top-k is a chain of launches on one stream with a single
// host synchronisation at the very end (to read the NaN count, and for kth values the key).
#include "common.cuh"

// One radix pass over all tensors of the table: histogram of the `digit_bits`-bit digit at
// `digit_shift` of the keys whose bits above `prefix_shift` equal state[SK_PREFIX] (prefix_shift =
// key width: every key). Blocks take chunks grid-stride; per-block shared-memory counts, then one
// global atomicAdd per non-empty bin. With `count_nan`, NaNs are counted into *nan_count.
template <typename Bits, int BY_VALUE>
__global__ void radix_hist(const unsigned long long* __restrict__ xs, const long long* __restrict__ lens,
                           const long long* __restrict__ chunk_start, int num_tensors,
                           const long long* __restrict__ state, int prefix_shift, int digit_shift, int digit_bits,
                           int count_nan, Bits nan_abs, unsigned long long* __restrict__ hist,
                           unsigned long long* __restrict__ nan_count) {
    __shared__ unsigned int counts[SK_RADIX_BINS];
    __shared__ unsigned int block_nans;
    const int bins = 1 << digit_bits;
    for (int i = threadIdx.x; i < bins; i += blockDim.x) counts[i] = 0;
    if (threadIdx.x == 0) block_nans = 0;
    __syncthreads();
    const unsigned long long prefix = (unsigned long long)state[SK_PREFIX];
    const unsigned long long digit_mask = (unsigned long long)(bins - 1);
    const long long chunks = chunk_start[num_tensors];
    unsigned int nans = 0;
    for (long long c = blockIdx.x; c < chunks; c += gridDim.x) {
        const int t = sk_chunk_owner(chunk_start, num_tensors, c);
        const Bits* __restrict__ x = reinterpret_cast<const Bits*>(xs[t]);
        const long long start = (c - chunk_start[t]) * SK_CHUNK;
        const long long end = start + SK_CHUNK < lens[t] ? start + SK_CHUNK : lens[t];
        for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
            const Bits bits = x[i];
            if (count_nan) nans += sk_is_nan<Bits>(bits, nan_abs);
            const unsigned long long key = sk_key<Bits, BY_VALUE>(bits);
            if (sk_matches(key, prefix, prefix_shift)) atomicAdd(&counts[(key >> digit_shift) & digit_mask], 1u);
        }
    }
    if (nans != 0) atomicAdd(&block_nans, nans);
    __syncthreads();
    for (int i = threadIdx.x; i < bins; i += blockDim.x) {
        if (counts[i] != 0) atomicAdd(&hist[i], (unsigned long long)counts[i]);
    }
    if (threadIdx.x == 0 && block_nans != 0) atomicAdd(nan_count, (unsigned long long)block_nans);
}

// A later radix pass for many selects at once (a multi-rank select: quantile levels share every pass):
// histogram row r counts the digit at `digit_shift` of the keys whose bits above `prefix_shift` equal
// select r's prefix. The selects are ordered by ascending rank, so their prefixes are non-increasing and
// the selects matching a key's prefix are one run, found by binary search in shared memory. Only keys
// under some prefix are counted (a small share after the first pass), straight into global counts.
template <typename Bits, int BY_VALUE>
__global__ void radix_hist_multi(const unsigned long long* __restrict__ xs, const long long* __restrict__ lens,
                                 const long long* __restrict__ chunk_start, int num_tensors,
                                 const long long* __restrict__ states, int num_selects, int prefix_shift,
                                 int digit_shift, int digit_bits, unsigned long long* __restrict__ hist) {
    __shared__ unsigned long long prefixes[SK_MAX_SELECTS];
    for (int r = threadIdx.x; r < num_selects; r += blockDim.x) {
        prefixes[r] = (unsigned long long)states[(long long)r * SK_STATE_WORDS + SK_PREFIX];
    }
    __syncthreads();
    const unsigned long long digit_mask = (1ull << digit_bits) - 1;
    const long long chunks = chunk_start[num_tensors];
    for (long long c = blockIdx.x; c < chunks; c += gridDim.x) {
        const int t = sk_chunk_owner(chunk_start, num_tensors, c);
        const Bits* __restrict__ x = reinterpret_cast<const Bits*>(xs[t]);
        const long long start = (c - chunk_start[t]) * SK_CHUNK;
        const long long end = start + SK_CHUNK < lens[t] ? start + SK_CHUNK : lens[t];
        for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
            const unsigned long long key = sk_key<Bits, BY_VALUE>(x[i]);
            const unsigned long long p = key >> prefix_shift;
            int lo = 0, hi = num_selects;  // first select whose prefix is <= p
            while (lo < hi) {
                const int mid = (lo + hi) / 2;
                if (prefixes[mid] > p) lo = mid + 1; else hi = mid;
            }
            const unsigned long long digit = (key >> digit_shift) & digit_mask;
            for (int r = lo; r < num_selects && prefixes[r] == p; ++r) {
                atomicAdd(&hist[((long long)r << SK_RADIX_BITS) + (long long)digit], 1ull);
            }
        }
    }
}

// After a pass: find the digit holding the state[SK_REMAINING]-th largest key among the `bins`
// counts, append it to the prefix, and move the counts above it to state[SK_GREATER]. One block per
// select: block b reads counts at hist + b * hist_stride (stride 0: all share the first pass's row) and
// updates state + b * SK_STATE_WORDS. Each thread sums a slice of bins, then thread 0 walks the slice
// sums and the chosen slice from the top. The counts are this pass's only (zeroed by the host).
extern "C" __global__ void radix_pick(const unsigned long long* __restrict__ hist, long long hist_stride,
                                      int digit_bits, long long* __restrict__ state) {
    __shared__ unsigned long long slice_sum[1024];
    hist += (long long)blockIdx.x * hist_stride;
    state += (long long)blockIdx.x * SK_STATE_WORDS;
    const int bins = 1 << digit_bits;
    const int per = (bins + blockDim.x - 1) / blockDim.x;
    unsigned long long sum = 0;
    for (int j = 0; j < per; ++j) {
        const int b = threadIdx.x * per + j;
        if (b < bins) sum += hist[b];
    }
    slice_sum[threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.x != 0) return;
    const unsigned long long remaining = (unsigned long long)state[SK_REMAINING];
    unsigned long long above = 0;
    int slice = 0;
    for (int s = (int)blockDim.x - 1; s >= 0; --s) {
        if (above + slice_sum[s] >= remaining) { slice = s; break; }
        above += slice_sum[s];
    }
    int digit = slice * per;  // fallback (rank out of range: cannot happen for validated input)
    for (int b = (slice + 1) * per - 1; b >= slice * per; --b) {
        if (b >= bins) continue;
        if (above + hist[b] >= remaining) { digit = b; break; }
        above += hist[b];
    }
    state[SK_PREFIX] = (long long)(((unsigned long long)state[SK_PREFIX] << digit_bits) | (unsigned long long)digit);
    state[SK_REMAINING] = (long long)(remaining - above);
    state[SK_GREATER] += (long long)above;
    state[SK_EQUAL] = (long long)hist[digit];
}

// mask = key >= T (T = state[SK_PREFIX], the k-th largest key) over one chunk per block, for every
// tensor of the table; also counts, per chunk, the keys equal to T (so the kept ties can be handed
// out in global index order).
template <typename Bits, int BY_VALUE>
__global__ void mask_at_least(const unsigned long long* __restrict__ xs, const unsigned long long* __restrict__ outs,
                              const long long* __restrict__ lens, const long long* __restrict__ chunk_start,
                              int num_tensors, const long long* __restrict__ state,
                              unsigned long long* __restrict__ equal_per_chunk) {
    __shared__ unsigned int equal;
    if (threadIdx.x == 0) equal = 0;
    __syncthreads();
    const long long c = blockIdx.x;
    const int t = sk_chunk_owner(chunk_start, num_tensors, c);
    const Bits* __restrict__ x = reinterpret_cast<const Bits*>(xs[t]);
    bool* __restrict__ out = reinterpret_cast<bool*>(outs[t]);
    const unsigned long long threshold = (unsigned long long)state[SK_PREFIX];
    const long long start = (c - chunk_start[t]) * SK_CHUNK;
    const long long end = start + SK_CHUNK < lens[t] ? start + SK_CHUNK : lens[t];
    unsigned int mine = 0;
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        const unsigned long long key = sk_key<Bits, BY_VALUE>(x[i]);
        out[i] = key >= threshold;
        mine += key == threshold;
    }
    if (mine != 0) atomicAdd(&equal, mine);
    __syncthreads();
    if (threadIdx.x == 0) equal_per_chunk[c] = equal;
}

// Keep only the first keep = clamp(k - state[SK_GREATER] - equal_before[c], 0) keys equal to T in
// chunk c (index order), clear the rest: a block-wide scan of "is equal" flags, tile by tile, built
// from warp ballots. `equal_before` is the exclusive scan of mask_at_least's per-chunk counts. Chunks
// that keep all their equal keys (the usual case) return at once.
template <typename Bits, int BY_VALUE>
__global__ void mask_trim_equal(const unsigned long long* __restrict__ xs, const unsigned long long* __restrict__ outs,
                                const long long* __restrict__ lens, const long long* __restrict__ chunk_start,
                                int num_tensors, const long long* __restrict__ state, long long k,
                                const unsigned long long* __restrict__ equal_per_chunk,
                                const long long* __restrict__ equal_before) {
    __shared__ unsigned int warp_totals[32];
    const long long c = blockIdx.x;
    long long keep_here = k - state[SK_GREATER] - equal_before[c];
    keep_here = keep_here < 0 ? 0 : keep_here;
    if ((unsigned long long)keep_here >= equal_per_chunk[c]) return;  // uniform per block
    const int t = sk_chunk_owner(chunk_start, num_tensors, c);
    const Bits* __restrict__ x = reinterpret_cast<const Bits*>(xs[t]);
    bool* __restrict__ out = reinterpret_cast<bool*>(outs[t]);
    const unsigned long long threshold = (unsigned long long)state[SK_PREFIX];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    const long long start = (c - chunk_start[t]) * SK_CHUNK;
    const long long end = start + SK_CHUNK < lens[t] ? start + SK_CHUNK : lens[t];
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
// keep the n largest keys, ties to the lower position. m <= SK_MAX_GROUP keeps the keys in a local
// array (registers/L1); larger groups re-read them. NaN sets *nan_flag.
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
        Bits keys[SK_MAX_GROUP];
        bool saw_nan = false;
        for (int j = 0; j < m; ++j) {
            const Bits bits = x[base + (long long)j * inner];
            saw_nan |= sk_is_nan<Bits>(bits, nan_abs);
            if (j < SK_MAX_GROUP) keys[j] = (Bits)sk_key<Bits, BY_VALUE>(bits);
        }
        if (saw_nan) atomicOr(nan_flag, 1u);
        for (int j = 0; j < m; ++j) {
            const Bits kj = j < SK_MAX_GROUP ? keys[j] : (Bits)sk_key<Bits, BY_VALUE>(x[base + (long long)j * inner]);
            int rank = 0;
            for (int l = 0; l < m; ++l) {
                const Bits kl = l < SK_MAX_GROUP ? keys[l] : (Bits)sk_key<Bits, BY_VALUE>(x[base + (long long)l * inner]);
                rank += (kl > kj) || (kl == kj && l < j);
            }
            out[base + (long long)j * inner] = rank < n;
        }
    }
}

// |x| as a double, exactly, from the raw bits of each format (FORMAT 0: f32, 1: f64, 2: f16, 3: bf16).
// f16 is decoded by hand (subnormals included) so no fp16 header is needed.
template <int FORMAT, typename Bits>
__device__ __forceinline__ double sk_magnitude(Bits bits) {
    if (FORMAT == 0) return (double)fabsf(__uint_as_float((unsigned int)bits));
    if (FORMAT == 1) return fabs(__longlong_as_double((long long)bits));
    if (FORMAT == 3) return (double)fabsf(__uint_as_float(((unsigned int)bits & 0x7FFFu) << 16));
    const unsigned int e = ((unsigned int)bits >> 10) & 0x1Fu, m = (unsigned int)bits & 0x3FFu;
    if (e == 0) return (double)m * (1.0 / 16777216.0);  // subnormal: m * 2^-24
    if (e == 31) return m ? __longlong_as_double(0x7FF8000000000000LL) : __longlong_as_double(0x7FF0000000000000LL);
    return (double)__uint_as_float(((e + 112u) << 23) | (m << 13));
}

// NORM 0: sum |x|, 1: sum x^2, 2: max |x| (a NaN sticks, so the selection kernels refuse it).
template <int NORM>
__device__ __forceinline__ double sk_fold(double acc, double a) {
    if (NORM == 0) return sk_dadd(acc, a);
    if (NORM == 1) return sk_dadd(acc, sk_dmul(a, a));
    return (a > acc || a != a) ? a : acc;
}

template <int NORM>
__device__ __forceinline__ double sk_combine(double a, double b) {
    if (NORM == 2) return (b > a || b != b) ? b : a;
    return sk_dadd(a, b);
}

// One norm per (bh x bw) block of a row-major rows x cols matrix, in the Rust core's order: for each
// block row in turn, lane j % 4 folds its elements in index order, the lanes combine as
// (l0 + l1) + (l2 + l3), and the row adds to the running score. One thread per block, grid-stride.
template <typename Bits, int FORMAT, int NORM>
__global__ void block_norms(const Bits* __restrict__ x, long long rows, long long cols, int bh, int bw,
                            double* __restrict__ scores) {
    const long long block_cols = cols / bw;
    const long long blocks = (rows / bh) * block_cols;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x; b < blocks; b += stride) {
        const long long br = b / block_cols;
        const Bits* base = x + br * bh * cols + (b - br * block_cols) * bw;
        double score = 0.0;
        for (int r = 0; r < bh; ++r) {
            const Bits* row = base + (long long)r * cols;
            double l0 = 0.0, l1 = 0.0, l2 = 0.0, l3 = 0.0;
            int j = 0;
            for (; j + 4 <= bw; j += 4) {
                l0 = sk_fold<NORM>(l0, sk_magnitude<FORMAT>(row[j]));
                l1 = sk_fold<NORM>(l1, sk_magnitude<FORMAT>(row[j + 1]));
                l2 = sk_fold<NORM>(l2, sk_magnitude<FORMAT>(row[j + 2]));
                l3 = sk_fold<NORM>(l3, sk_magnitude<FORMAT>(row[j + 3]));
            }
            if (j < bw) l0 = sk_fold<NORM>(l0, sk_magnitude<FORMAT>(row[j]));
            if (j + 1 < bw) l1 = sk_fold<NORM>(l1, sk_magnitude<FORMAT>(row[j + 1]));
            if (j + 2 < bw) l2 = sk_fold<NORM>(l2, sk_magnitude<FORMAT>(row[j + 2]));
            score = sk_combine<NORM>(score, sk_combine<NORM>(sk_combine<NORM>(l0, l1), sk_combine<NORM>(l2, l3)));
        }
        scores[b] = score;
    }
}
