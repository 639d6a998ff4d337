//! Bindings of `sparsekit_core::spmm`.

use numpy::{PyReadonlyArray1, PyReadwriteArray1};
use pyo3::prelude::*;
use sparsekit_core::spmm::{self, Layout};

use crate::arrays::{readonly, readwrite, slices, slices_mut};
use crate::error::detach;

fn one<'py>(x: &Bound<'py, PyAny>) -> [Bound<'py, PyAny>; 1] {
    [x.clone()]
}

/// Runs one spmm kernel: `op` is "linear", "linear_grad_input" or "sdd". `layout` holds the five int64
/// arrays (row_offsets, col_indices, t_offsets, t_perm, t_row_indices); all arrays are flat, contiguous.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn bsr_kernel(
    py: Python<'_>,
    op: &str,
    shape: (usize, usize),
    block: (usize, usize),
    layout: Vec<Bound<'_, PyAny>>,
    a: Bound<'_, PyAny>,
    b: Bound<'_, PyAny>,
    m: usize,
    out: Bound<'_, PyAny>,
) -> PyResult<()> {
    if layout.len() != 5 {
        return Err(pyo3::exceptions::PyValueError::new_err("layout: expected 5 int64 arrays"));
    }
    let lg: Vec<PyReadonlyArray1<i64>> = readonly(&layout, "layout", "int64")?;
    let ls: Vec<&[i64]> = slices(&lg, "layout")?;
    let l = Layout {
        n: shape.0,
        k: shape.1,
        bh: block.0,
        bw: block.1,
        row_offsets: ls[0],
        col_indices: ls[1],
        t_offsets: ls[2],
        t_perm: ls[3],
        t_row_indices: ls[4],
    };
    let ag: Vec<PyReadonlyArray1<f32>> = readonly(&one(&a), "a", "float32")?;
    let av: &[f32] = slices(&ag, "a")?[0];
    let bg: Vec<PyReadonlyArray1<f32>> = readonly(&one(&b), "b", "float32")?;
    let bv: &[f32] = slices(&bg, "b")?[0];
    let mut og: Vec<PyReadwriteArray1<f32>> = readwrite(&one(&out), "out")?;
    let mut outs = slices_mut(&mut og, "out")?;
    let o: &mut [f32] = &mut outs[0];
    match op {
        "linear" => detach(py, || spmm::linear(&l, bv, av, m, o)),
        "linear_grad_input" => detach(py, || spmm::linear_grad_input(&l, bv, av, m, o)),
        "sdd" => detach(py, || spmm::sdd(&l, av, bv, m, o)),
        other => Err(pyo3::exceptions::PyValueError::new_err(format!("op: unknown kernel {other:?}"))),
    }
}

/// Adds this module's functions to `sparsekit._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(bsr_kernel, m)?)?;
    Ok(())
}
