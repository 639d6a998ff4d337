//! Pure-Rust core of sparsekit. Nothing here knows about Python: the `sparsekit-py` crate is the only
//! binding layer, and every algorithm is covered by `cargo test`.
//!
//! Layout (one module per capability; coming parts take their place beside `select`):
//! - [`select`]: exact top-k / order statistics / N:M and block masks over many slices at once.
//! - `routing` (MoE routing tables), `balance` (load-balance counters), `schedule` (gradient
//!   communication scheduler) and `spmm` (CPU block-sparse GEMM) are planned siblings.
//! - [`pool`]: the rayon thread pool every parallel routine runs in (sized by `SPARSEKIT_NUM_THREADS`,
//!   rebuilt after `fork`).

pub mod error;
pub mod pool;
pub mod select;

pub use error::CoreError;
