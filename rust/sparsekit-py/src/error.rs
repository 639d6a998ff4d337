//! The one mapping from core errors to Python exceptions: every core error is a bad argument, so it
//! becomes a `ValueError` whose message names that argument.

use pyo3::exceptions::PyValueError;
use pyo3::PyErr;
use sparsekit_core::CoreError;

pub fn to_py(err: CoreError) -> PyErr {
    PyValueError::new_err(err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pyo3::Python;

    #[test]
    fn core_errors_become_value_errors_naming_the_argument() {
        Python::initialize();
        Python::attach(|py| {
            let err = to_py(CoreError::KOutOfRange { k: 7, n: 3 });
            assert!(err.is_instance_of::<PyValueError>(py));
            assert!(err.to_string().contains("k must be in [0, 3]"));
        });
    }
}
