//! Bindings of `sparsekit_core::buffers`: large output buffers handed to Python as numpy uint8 arrays
//! whose base object owns the cached memory (torch wraps them with `torch.from_numpy`, zero-copy). When
//! the last tensor or array over one is freed, the memory goes back to the cache, not to the OS.

use numpy::ndarray::ArrayView1;
use numpy::PyArray1;
use pyo3::prelude::*;
use sparsekit_core::buffers::{self, Buffer};

use crate::error::to_py;

/// Owner of one cached buffer (the numpy array's base object); dropping it returns the buffer. Not added
/// to the module: nothing constructs it from Python.
#[pyclass(frozen, module = "sparsekit._core")]
pub struct CachedBuffer {
    _buf: Buffer,
}

/// An uninitialised uint8 array of `nbytes` (at least `buffer_cache_min_bytes`), 2 MiB aligned, from the
/// cache when it holds one of that size.
#[pyfunction]
fn cached_empty(py: Python<'_>, nbytes: usize) -> PyResult<Bound<'_, PyArray1<u8>>> {
    let mut buf = Buffer::take(nbytes).map_err(to_py)?;
    let ptr = buf.as_mut_ptr();
    let owner = Bound::new(py, CachedBuffer { _buf: buf })?;
    // SAFETY: `ptr` points at `nbytes` bytes owned by `owner`, which becomes the array's base object and so
    // outlives it; the buffer is never reallocated. The bytes may be uninitialised, as numpy.empty's are.
    let view = unsafe { ArrayView1::from_shape_ptr(nbytes, ptr as *const u8) };
    Ok(unsafe { PyArray1::borrow_from_array(&view, owner.into_any()) })
}

/// (idle buffers, idle bytes, limit in bytes) of the cache.
#[pyfunction]
fn buffer_cache_stats() -> (usize, usize, usize) {
    buffers::stats()
}

/// Cap the cache's idle bytes (0 turns it off), freeing the oldest idle buffers over the cap.
#[pyfunction]
fn buffer_cache_set_limit(nbytes: usize) {
    buffers::set_limit(nbytes)
}

/// Free every idle buffer.
#[pyfunction]
fn buffer_cache_clear() {
    buffers::clear()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("buffer_cache_min_bytes", buffers::MIN_BYTES)?;
    m.add_function(wrap_pyfunction!(cached_empty, m)?)?;
    m.add_function(wrap_pyfunction!(buffer_cache_stats, m)?)?;
    m.add_function(wrap_pyfunction!(buffer_cache_set_limit, m)?)?;
    m.add_function(wrap_pyfunction!(buffer_cache_clear, m)?)?;
    Ok(())
}
