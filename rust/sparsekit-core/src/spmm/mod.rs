//! CPU block-sparse GEMM: BSR layout, transpose metadata, SIMD micro-kernels (DSD, SDD).
