//! Bindings of `sparsekit_core::balance`.

use pyo3::prelude::*;

/// Adds this module's functions to `sparsekit._core`.
pub fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
