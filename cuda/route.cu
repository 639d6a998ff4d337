// Mixture-of-Experts routing on CUDA tensors: per-row top-k expert choice with group limiting, and the
// routing tables (a stable counting sort of the token slots by expert, with capacity). Launched by
// python/sparsekit/_cuda_route.py; executed on the CPU in tests through cuda/sim.
//
// Scores are ranked by order-preserving keys of their float32 bits (the map of common.cuh, by value),
// with -0.0 folded onto +0.0 so the two tie (IEEE equality; ties go to the lower index). Every result
// is a pure function of the input: ranks are counted, never decided by the order of atomics.
#include "common.cuh"

#define SK_ROUTE_FULL 0xffffffffu
#define SK_ROUTE_EXCLUDED 0u  // key of an expert outside the kept groups: below every other key
#define SK_ROUTE_NAN_KEY 1u   // key of a NaN score: below -inf (key 0x007FFFFF), above excluded experts

// Rank key of a float32 score's bits: -0.0 ties with +0.0, NaN ranks below -inf.
__device__ __forceinline__ unsigned int sk_route_key(unsigned int bits) {
    if (bits == 0x80000000u) bits = 0u;
    if (sk_is_nan<unsigned int>(bits, 0x7F800000u)) return SK_ROUTE_NAN_KEY;
    return (unsigned int)sk_key<unsigned int, 1>(bits);
}

// Float value of a key that sk_route_key produced from a non-NaN score (NaN keys decode to a NaN).
__device__ __forceinline__ float sk_route_value(unsigned int key) {
    const unsigned int bits = (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key;
    return __uint_as_float(bits);
}

// Saturating add of a non-negative count into *counter (int32): the total min(sum, INT_MAX) does not
// depend on the order of the adds. Only threads that saw something call it.
__device__ __forceinline__ void sk_route_count(int* counter, unsigned int add) {
    int old = *counter;
    while (old != 0x7FFFFFFF) {
        const long long sum = (long long)old + (long long)add;
        const int want = sum > 0x7FFFFFFFLL ? 0x7FFFFFFF : (int)sum;
        const int seen = atomicCAS(counter, old, want);
        if (seen == old) break;
        old = seen;
    }
}

// Per row of choice [rows, E] (float32 bits): the k experts with the largest scores, in descending
// order, ties to the lower expert index -> ids[row * k + rank]. With n_groups > 1 only the experts of
// the topk_groups best groups (E / n_groups consecutive experts each; group score = max, or with
// group_top2 the float32 sum of the two largest, or the largest where that sum is NaN: +inf + -inf;
// ties to the lower group index) can be chosen. NaN scores are counted into *nan_count (saturating
// at INT_MAX).
//
// One block per row (grid-stride over rows); the row's keys live in shared memory and each expert's
// rank is counted: rank(e) = #{l : key[l] > key[e] or (key[l] == key[e] and l < e)}, stopping at k.
// The caller guarantees E <= MAX_E, 1 <= k <= topk_groups * (E / n_groups).
template <int MAX_E>
__global__ void route_topk(const unsigned int* __restrict__ choice, long long rows, int n_experts, int k,
                           int n_groups, int topk_groups, int group_top2, long long* __restrict__ ids,
                           int* __restrict__ nan_count) {
    __shared__ unsigned int keys[MAX_E];
    __shared__ unsigned int group_keys[MAX_E];
    const int E = n_experts;
    const int group_size = E / n_groups;
    unsigned int nans = 0;
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const unsigned int* __restrict__ x = choice + row * (long long)E;
        for (int e = threadIdx.x; e < E; e += blockDim.x) {
            const unsigned int bits = x[e];
            nans += sk_is_nan<unsigned int>(bits, 0x7F800000u);
            keys[e] = sk_route_key(bits);
        }
        __syncthreads();  // B1: the row's keys are complete before any thread ranks or groups them
        if (n_groups > 1) {
            for (int g = threadIdx.x; g < n_groups; g += blockDim.x) {
                const unsigned int* __restrict__ member = keys + g * group_size;
                unsigned int first = member[0], second = 0;
                for (int j = 1; j < group_size; ++j) {
                    const unsigned int key = member[j];
                    if (key > first) { second = first; first = key; }
                    else if (j == 1 || key > second) second = key;
                }
                unsigned int score = first;
                if (group_top2) {  // +inf + -inf = NaN: the group holds +inf and ranks as its max, +inf
                    const unsigned int sum = __float_as_uint(__fadd_rn(sk_route_value(first), sk_route_value(second)));
                    if (!sk_is_nan<unsigned int>(sum, 0x7F800000u)) score = sk_route_key(sum);
                }
                group_keys[g] = score;
            }
            __syncthreads();  // B2: every group score is written before the groups are ranked
            for (int g = threadIdx.x; g < n_groups; g += blockDim.x) {
                const unsigned int mine = group_keys[g];
                int above = 0;
                for (int h = 0; h < n_groups && above < topk_groups; ++h) {
                    const unsigned int other = group_keys[h];
                    above += other > mine || (other == mine && h < g);
                }
                if (above >= topk_groups) {  // not among the kept groups: its experts can never be chosen
                    for (int j = 0; j < group_size; ++j) keys[g * group_size + j] = SK_ROUTE_EXCLUDED;
                }
            }
            __syncthreads();  // B3: the excluded groups' keys are cleared before experts are ranked
        }
        long long* __restrict__ out = ids + row * (long long)k;
        for (int e = threadIdx.x; e < E; e += blockDim.x) {
            const unsigned int mine = keys[e];
            int above = 0;
            for (int l = 0; l < E && above < k; ++l) {
                const unsigned int other = keys[l];
                above += other > mine || (other == mine && l < e);
            }
            if (above < k) out[above] = e;
        }
        __syncthreads();  // B4: all reads of this row's keys are done before the next row overwrites them
    }
    if (nans != 0) sk_route_count(nan_count, nans);
}

// Bucket functions of route_pass (`by`).
#define SK_BY_EXPERT 0    // ids[s] if 0 <= ids[s] < E, else E (out-of-range ids)
#define SK_BY_KEPT 1      // ids[s] if kept[s], else E (the dropped slots)
#define SK_BY_PRIORITY 2  // 8-bit digit at `shift` of ~sk_route_key(prio[s]): LSD radix passes, descending
// What route_pass does with each position (`mode`).
#define SK_MODE_COUNT 0    // cursor[b * tiles + tile] += slots of bucket b in the tile (cursor zeroed)
#define SK_MODE_SCATTER 1  // out_order[pos] = s (and out_inverse[s] = pos), pos from the scanned cursor
#define SK_MODE_MARK 2     // kept[s] = b < E && pos - starts[b] < capacity (rank inside the bucket)

// One pass of a stable counting sort of the slot sequence s_i = in_order[i] (or i), i < n, by bucket.
// Warp w owns tile w: positions [w * 32 * rounds, (w + 1) * 32 * rounds), walked in rounds of 32 in
// order. Lanes of a round with the same bucket find each other with __match_any_sync; the lowest of
// them (the leader) reads and advances the warp's own cursor of that bucket, cursor[b * tiles + w], so
// a slot's position is (slots of its bucket in earlier tiles, from the exclusive scan) + (earlier
// rounds of this tile) + (lower lanes of this round): stable and independent of any scheduling.
// Every cursor entry belongs to one warp: no atomics. Count with cursor = 0, scan on the host
// stream (torch.cumsum), then scatter or mark with the scanned cursor.
extern "C" __global__ void route_pass(long long n, long long tiles, int rounds, const long long* __restrict__ in_order,
                                      int has_order, int by, int n_experts, int shift,
                                      const long long* __restrict__ ids, const unsigned int* __restrict__ prio,
                                      bool* __restrict__ kept, int mode, long long* __restrict__ cursor,
                                      long long* __restrict__ out_order, long long* __restrict__ out_inverse,
                                      int write_inverse, const long long* __restrict__ starts, long long capacity) {
    const long long tile = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (tile >= tiles) return;  // whole warps only (blocks are whole warps)
    const int lane = threadIdx.x & 31;
    const long long E = n_experts;
    for (int r = 0; r < rounds; ++r) {
        const long long i = (tile * rounds + r) * 32 + lane;
        const bool active = i < n;
        long long s = 0, b = -1;  // inactive lanes: bucket -1, matched only among themselves
        if (active) {
            s = has_order ? in_order[i] : i;
            if (by == SK_BY_PRIORITY) {
                b = (long long)((~sk_route_key(prio[s]) >> shift) & 0xFFu);
            } else {
                const long long e = ids[s];
                const bool in_range = e >= 0 && e < E;
                b = (by == SK_BY_EXPERT ? in_range : (in_range && kept[s])) ? e : E;
            }
        }
        const unsigned int peers = __match_any_sync(SK_ROUTE_FULL, (unsigned long long)b);
        const int leader = __ffs((int)peers) - 1;
        const long long slot = b * tiles + tile;
        long long base = 0;
        if (active && lane == leader) base = cursor[slot];
        base = __shfl_sync(SK_ROUTE_FULL, base, leader);
        const long long pos = base + __popc(peers & ((1u << lane) - 1u));
        if (active && lane == leader) cursor[slot] = base + __popc(peers);
        if (active && mode == SK_MODE_SCATTER) {
            out_order[pos] = s;
            if (write_inverse) out_inverse[s] = pos;
        } else if (active && mode == SK_MODE_MARK) {
            kept[s] = b < E && pos - starts[b] < capacity;
        }
        __syncwarp();  // W1: this round's cursor writes are visible to the next round's leaders
    }
}
