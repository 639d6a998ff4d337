//! The one mapping from core errors to Python exceptions, and the one way long core work runs: with the
//! GIL released and any panic turned into a `RuntimeError`, so no `PanicException` (a `BaseException`)
//! can ever reach Python.
//!
//! Argument errors become `ValueError`s whose message names the argument; a thread pool the OS cannot
//! build becomes `RuntimeError`.

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::{PyErr, PyResult, Python};
use sparsekit_core::CoreError;

pub fn to_py(err: CoreError) -> PyErr {
    match err {
        CoreError::ThreadPool { .. } => PyRuntimeError::new_err(err.to_string()),
        _ => PyValueError::new_err(err.to_string()),
    }
}

/// Run `f` without the GIL; core errors are mapped by [`to_py`] and a panic (a bug: the core checks its
/// inputs) becomes a `RuntimeError` that says so.
pub fn detach<T: Send>(py: Python<'_>, f: impl FnOnce() -> Result<T, CoreError> + Send) -> PyResult<T> {
    match py.detach(|| catch_unwind(AssertUnwindSafe(f))) {
        Ok(result) => result.map_err(to_py),
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(PyRuntimeError::new_err(format!("sparsekit internal error (please report): {what}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pyo3::exceptions::PyRuntimeError;

    #[test]
    fn core_errors_become_value_errors_naming_the_argument() {
        Python::initialize();
        Python::attach(|py| {
            let err = to_py(CoreError::KOutOfRange { k: 7, n: 3 });
            assert!(err.is_instance_of::<PyValueError>(py));
            assert!(err.to_string().contains("k must be in [0, 3]"));
            let err = to_py(CoreError::ThreadPool { why: "no threads".into() });
            assert!(err.is_instance_of::<PyRuntimeError>(py));
        });
    }

    #[test]
    fn panics_become_runtime_errors() {
        Python::initialize();
        Python::attach(|py| {
            let err = detach::<()>(py, || panic!("boom")).unwrap_err();
            assert!(err.is_instance_of::<PyRuntimeError>(py));
            assert!(err.to_string().contains("boom"));
            assert_eq!(detach(py, || Ok(5)).unwrap(), 5);
        });
    }
}
