// Shared helpers of the selection kernels: order-preserving keys and launch constants.
//
// IEEE floats and bf16 are sign-magnitude, so their raw bits sort as unsigned integers once the sign
// is handled: by |x| the key is the bits with the sign cleared; by x it is `bits | SIGN` for
// non-negative values and `~bits` for negative ones. -0.0 ranks just below +0.0 by value and ties
// with it by |x|. The Rust core (rust/sparsekit-core/src/select/key.rs) uses the same maps, which is
// what makes CPU and GPU answers identical.
#pragma once

#define SK_RADIX_BITS 8
#define SK_RADIX_BINS 256
#define SK_CHUNK 4096      // elements per block in the mask kernels
#define SK_MAX_GROUP 32    // N:M groups up to this size keep their keys in registers

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

// NaN: magnitude bits above those of +inf (`nan_abs`, per format).
template <typename Bits>
__device__ __forceinline__ bool sk_is_nan(Bits bits, Bits nan_abs) {
    return (Bits)(bits & (Bits)~sk_sign_bit<Bits>()) > nan_abs;
}

// Whether a key's bits above `shift` equal `prefix` (shift >= 64: every key matches).
__device__ __forceinline__ bool sk_matches(unsigned long long key, unsigned long long prefix, int shift) {
    return shift >= 64 || (key >> shift) == prefix;
}
