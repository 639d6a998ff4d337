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

/// 0 portable, 1 AVX2, 2 AVX-512.
pub fn level() -> u8 {
    static LEVEL: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    let level = *LEVEL.get_or_init(detect);
    #[cfg(test)]
    let level = level.min(TEST_CAP.load(std::sync::atomic::Ordering::Relaxed));
    level
}

fn detect() -> u8 {
    #[cfg(target_arch = "x86_64")]
    {
        let cap = std::env::var("SPARSEKIT_SIMD").ok().and_then(|v| v.trim().parse::<u8>().ok()).unwrap_or(2);
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("popcnt");
        let avx512 = avx2
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq");
        (if avx512 { 2 } else if avx2 { 1 } else { 0 }).min(cap)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        0
    }
}
