// Shared helpers of the selection kernels: order-preserving keys, the tensor table, launch constants.
//
// IEEE floats and bf16 are sign-magnitude, so their raw bits sort as unsigned integers once the sign
// is handled: by |x| the key is the bits with the sign cleared; by x it is `bits | SIGN` for
// non-negative values and `~bits` for negative ones. -0.0 ranks just below +0.0 by value and ties
// with it by |x|. The Rust core (rust/sparsekit-core/src/select/key.rs) uses the same maps, which is
// what makes CPU and GPU answers identical. Keys are widened to 64 bits (order unchanged) so one
// radix code path serves 16-, 32- and 64-bit formats.
#pragma once

#define SK_RADIX_BITS 11                  // widest digit of one radix pass
#define SK_RADIX_BINS (1 << SK_RADIX_BITS)  // 2048 bins: 8 KiB of shared counts
#define SK_CHUNK 4096                     // elements of one tensor handled by one block at a time
#define SK_MAX_GROUP 32                   // N:M groups up to this size keep their keys in registers
#define SK_MAX_SELECTS 1024               // selects sharing one radix_hist_multi pass (8 KiB of prefixes)

// Slots of the per-select state vector (int64 words on the device; read back once at the end).
#define SK_PREFIX 0     // key bits fixed so far (after the last pass: the k-th largest key)
#define SK_REMAINING 1  // rank still to find below the prefix (1-based)
#define SK_GREATER 2    // keys strictly greater than the prefix (over all tensors)
#define SK_EQUAL 3      // keys under the prefix after the last pass (= keys equal to the k-th key)
#define SK_STATE_WORDS 4

template <typename Bits>
__device__ __forceinline__ Bits sk_sign_bit() {
    return (Bits)((Bits)1 << (sizeof(Bits) * 8 - 1));
}

// Key of one element, widened to 64 bits (the order is unchanged).
template <typename Bits, int BY_VALUE>
__device__ __forceinline__ unsigned long long sk_key(Bits bits) {
    const Bits sign = sk_sign_bit<Bits>();
    Bits key;
    if (BY_VALUE) {
        key = (bits & sign) ? (Bits)~bits : (Bits)(bits | sign);
    } else {
        key = (Bits)(bits & (Bits)~sign);
    }
    return (unsigned long long)key;
}

// NaN: magnitude bits above those of +inf (`nan_abs`, per format: 0x7C00 f16, 0x7F80 bf16,
// 0x7F800000 f32, 0x7FF0000000000000 f64).
template <typename Bits>
__device__ __forceinline__ bool sk_is_nan(Bits bits, Bits nan_abs) {
    return (Bits)(bits & (Bits)~sk_sign_bit<Bits>()) > nan_abs;
}

// Whether a key's bits above `shift` equal `prefix` (shift >= 64: every key matches).
__device__ __forceinline__ bool sk_matches(unsigned long long key, unsigned long long prefix, int shift) {
    return shift >= 64 || (key >> shift) == prefix;
}

// The last i in [0, n) with starts[i] <= v, for non-decreasing starts with starts[0] <= v < starts[n]
// (binary search; block-uniform when v is): the tensor owning a chunk, the block-row holding a block.
__device__ __forceinline__ long long sk_last_at_most(const long long* __restrict__ starts, long long n, long long v) {
    long long lo = 0, hi = n;  // invariant: starts[lo] <= v < starts[hi]
    while (hi - lo > 1) {
        const long long mid = lo + (hi - lo) / 2;
        if (starts[mid] <= v) lo = mid; else hi = mid;
    }
    return lo;
}

// The tensor table: many tensors seen as one sequence without concatenating them. `chunk_start[t]` is
// the first chunk (SK_CHUNK elements of one tensor) of tensor t in the global chunk numbering (tensor
// order, then index order); `chunk_start[num_tensors]` is the chunk count. Empty tensors own no chunk.
// Returns the tensor owning chunk c: the last t with chunk_start[t] <= c.
__device__ __forceinline__ int sk_chunk_owner(const long long* __restrict__ chunk_start, int num_tensors,
                                              long long c) {
    return (int)sk_last_at_most(chunk_start, num_tensors, c);
}

// Double-precision add and multiply that the compiler may not fuse into an FMA: block norms must round
// exactly as the Rust core does (rust/sparsekit-core/src/select/block.rs, no contraction). The CPU shim
// compiles with -ffp-contract=off, so plain operators are exact there.
#ifdef SPARSEKIT_CUDASIM
__device__ __forceinline__ double sk_dadd(double a, double b) { return a + b; }
__device__ __forceinline__ double sk_dmul(double a, double b) { return a * b; }
#else
__device__ __forceinline__ double sk_dadd(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double sk_dmul(double a, double b) { return __dmul_rn(a, b); }
#endif
