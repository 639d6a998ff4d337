//! Pure-Rust core of sparsekit. Nothing here knows about Python: the `sparsekit-py` crate is the only
//! binding layer, and every algorithm is covered by `cargo test`.
//!
//! Layout (one module per capability; coming parts take their place beside `select`):
//! - [`select`]: exact top-k / order statistics / N:M and block masks over many slices at once.
//! - [`routing`]: MoE routing tables; [`balance`]: load-balance counters.
//! - [`comm`]: gradient communication planner (buckets, size classes, shards).
//! - [`spmm`]: CPU block-sparse GEMM; [`sparsity`]: dynamic sparse training mask updates.
//! - [`buffers`]: the cache of large output buffers (reused across a training loop's steps);
//!   [`pages`]: huge-page advice for large fresh output buffers (spmm, routing); [`simd`]: the vector
//!   build this CPU runs (routing, sparsity).
//! - [`pool`]: the rayon thread pool every parallel routine runs in (sized by `SPARSEKIT_NUM_THREADS`,
//!   rebuilt after `fork`).

// The intrinsic kernels (and the helpers only they call) are x86-64 only; elsewhere the portable paths
// run and those helpers are unused, which is expected, not dead code (checked: `cargo check --target
// aarch64-unknown-linux-gnu`).
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_variables, unused_mut, unused_imports))]

pub mod buffers;
pub mod error;
pub mod pages;
pub mod simd;
pub mod pool;
pub mod select;

pub mod balance;
pub mod comm;
pub mod routing;
pub mod sparsity;
pub mod spmm;

pub use error::CoreError;
