//! The widest vector build this CPU runs, shared by the kernels compiled portable / AVX2 / AVX-512
//! (routing rows, sparsity passes): 0 portable, 1 AVX2, 2 AVX-512. Detected once per process;
//! `SPARSEKIT_SIMD=0` or `1` caps it, so tests and benchmarks can compare the builds.

pub fn level() -> u8 {
    static LEVEL: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(detect)
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
