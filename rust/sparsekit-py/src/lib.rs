//! `sparsekit._core`: the thin PyO3 layer over `sparsekit-core`. One file per core module; no
//! algorithm lives here.

mod arrays;
mod balance;
mod buffers;
mod comm;
mod error;
mod routing;
mod select;
mod sparsity;
mod spmm;

use pyo3::prelude::*;

/// Set the worker thread count (0: back to `SPARSEKIT_NUM_THREADS` or the core count), at most
/// `MAX_THREADS`.
#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    sparsekit_core::pool::set_num_threads(n).map_err(error::to_py)
}

/// The worker thread count the next parallel call will use.
#[pyfunction]
fn get_num_threads() -> usize {
    sparsekit_core::pool::num_threads()
}

/// "release" or "debug": how this extension was compiled.
#[pyfunction]
fn build_profile() -> &'static str {
    if cfg!(debug_assertions) { "debug" } else { "release" }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("MAX_THREADS", sparsekit_core::pool::MAX_THREADS)?;
    m.add_function(wrap_pyfunction!(select::topk_masks, m)?)?;
    m.add_function(wrap_pyfunction!(select::kth_values, m)?)?;
    m.add_function(wrap_pyfunction!(select::nm_mask, m)?)?;
    m.add_function(wrap_pyfunction!(select::block_topk_mask, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(build_profile, m)?)?;
    // One register() per core module, each in its own file.
    buffers::register(m)?;
    routing::register(m)?;
    balance::register(m)?;
    comm::register(m)?;
    spmm::register(m)?;
    sparsity::register(m)?;
    Ok(())
}
