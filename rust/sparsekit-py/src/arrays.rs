//! Borrowing numpy buffers as Rust slices, zero-copy. float16 and bfloat16 arrive as int16 views of
//! their raw bits (numpy has no bfloat16) together with a dtype tag, and are reinterpreted in place.

use numpy::{Element, PyReadonlyArray1, PyReadwriteArray1, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// One array as the one-element list `readonly` / `readwrite` take.
pub fn one<'py>(x: &Bound<'py, PyAny>) -> [Bound<'py, PyAny>; 1] {
    [x.clone()]
}

pub fn readonly<'py, E: Element>(arrays: &[Bound<'py, PyAny>], arg: &str, dtype: &str) -> PyResult<Vec<PyReadonlyArray1<'py, E>>> {
    arrays
        .iter()
        .map(|a| {
            a.extract::<PyReadonlyArray1<'py, E>>().map_err(|_| {
                PyTypeError::new_err(format!("{arg}: expected contiguous 1-D numpy arrays holding {dtype} data"))
            })
        })
        .collect()
}

pub fn readwrite<'py, E: Element>(arrays: &[Bound<'py, PyAny>], arg: &str) -> PyResult<Vec<PyReadwriteArray1<'py, E>>> {
    arrays
        .iter()
        .map(|a| {
            a.extract::<PyReadwriteArray1<'py, E>>()
                .map_err(|_| PyTypeError::new_err(format!("{arg}: expected writable contiguous 1-D numpy arrays")))
        })
        .collect()
}

pub fn slices<'a, E: Element + bytemuck::Pod, T: bytemuck::Pod>(guards: &'a [PyReadonlyArray1<'_, E>], arg: &str) -> PyResult<Vec<&'a [T]>> {
    guards
        .iter()
        .map(|g| {
            let s = g.as_slice().map_err(|_| PyValueError::new_err(format!("{arg}: arrays must be contiguous")))?;
            Ok(bytemuck::cast_slice::<E, T>(s))
        })
        .collect()
}

pub fn slices_mut<'a, E: Element>(guards: &'a mut [PyReadwriteArray1<'_, E>], arg: &str) -> PyResult<Vec<&'a mut [E]>> {
    guards
        .iter_mut()
        .map(|g| {
            if !g.is_contiguous() {
                return Err(PyValueError::new_err(format!("{arg}: arrays must be contiguous")));
            }
            g.as_slice_mut().map_err(|_| PyValueError::new_err(format!("{arg}: arrays must be contiguous")))
        })
        .collect()
}

/// Run `$body` with `$T` bound to the Rust score type and `$E` to the numpy element type of `$dtype`.
#[macro_export]
macro_rules! with_dtype {
    ($dtype:expr, |$T:ident, $E:ident| $body:block) => {
        match $dtype {
            "float32" => {
                type $T = f32;
                type $E = f32;
                $body
            }
            "float64" => {
                type $T = f64;
                type $E = f64;
                $body
            }
            "float16" => {
                type $T = half::f16;
                type $E = i16;
                $body
            }
            "bfloat16" => {
                type $T = half::bf16;
                type $E = i16;
                $body
            }
            other => Err(pyo3::exceptions::PyTypeError::new_err(format!(
                "unsupported dtype {other}; expected float32, float64, float16 or bfloat16"
            ))),
        }
    };
}
