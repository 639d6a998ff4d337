//! Which vector build of the sparsity passes this CPU runs (detected once per process).
//!
//! The passes are written as plain loops over fixed-size blocks and compiled three times: portable
//! (the crate's baseline target), AVX2 and AVX-512, chosen at run time. `SPARSEKIT_SIMD=0` or `1`
//! caps the choice (as for the routing kernels), so tests and benchmarks can compare the builds; every
//! build gives the same bits.

/// Tests cap the level here to compare the builds in one process (all builds give the same bits, so
/// tests running meanwhile are unaffected).
#[cfg(test)]
pub static TEST_CAP: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(u8::MAX);

/// 0 portable, 1 AVX2, 2 AVX-512 ([`crate::simd::level`], capped by [`TEST_CAP`] in tests).
pub fn level() -> u8 {
    let level = crate::simd::level();
    #[cfg(test)]
    let level = level.min(TEST_CAP.load(std::sync::atomic::Ordering::Relaxed));
    level
}
