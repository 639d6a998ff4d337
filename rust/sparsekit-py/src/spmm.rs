//! Bindings of `sparsekit_core::spmm`. Zero-copy: every array is borrowed; float16 / bfloat16 cross as
//! int16 views of their bits with a dtype tag and are reinterpreted in place (`half` types), the GIL is
//! released for the whole kernel (`error::detach`).

use numpy::{Element, PyArrayDescrMethods, PyReadonlyArray1, PyReadwriteArray1, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use sparsekit_core::spmm::{self, Elem, Layout};

use crate::arrays::{one, readonly, readwrite, slices, slices_mut};
use crate::error::detach;

/// `x` must be a numpy array of element type `E` (f32 for "float32", int16 bits for the half dtypes):
/// a different dtype is a `ValueError` naming the argument (mixed dtypes are a caller's mistake, not a
/// type the kernel lacks).
fn check_dtype<E: Element>(x: &Bound<'_, PyAny>, arg: &str, dtype: &str) -> PyResult<()> {
    let arr = x
        .cast::<PyUntypedArray>()
        .map_err(|_| PyTypeError::new_err(format!("{arg}: expected a contiguous 1-D numpy array")))?;
    let want = numpy::dtype::<E>(x.py());
    if !arr.dtype().is_equiv_to(&want) {
        let bits = if dtype == "float32" { "" } else { " (as int16 bits)" };
        return Err(PyValueError::new_err(format!(
            "{arg}: dtype {} does not match the kernel dtype {dtype}{bits}",
            arr.dtype()
        )));
    }
    Ok(())
}

/// The kernel `op` on element type `T` (numpy element `E`).
#[allow(clippy::too_many_arguments)]
fn run<T: Elem + bytemuck::Pod, E: Element + bytemuck::Pod>(
    py: Python<'_>,
    op: &str,
    l: &Layout<'_>,
    a: &Bound<'_, PyAny>,
    b: &Bound<'_, PyAny>,
    m: usize,
    out: &Bound<'_, PyAny>,
    dtype: &str,
) -> PyResult<()> {
    for (x, arg) in [(a, "a"), (b, "b"), (out, "out")] {
        check_dtype::<E>(x, arg, dtype)?;
    }
    let ag: Vec<PyReadonlyArray1<E>> = readonly(&one(a), "a", dtype)?;
    let av: &[T] = slices(&ag, "a")?[0];
    let bg: Vec<PyReadonlyArray1<E>> = readonly(&one(b), "b", dtype)?;
    let bv: &[T] = slices(&bg, "b")?[0];
    let mut og: Vec<PyReadwriteArray1<E>> = readwrite(&one(out), "out")?;
    let mut outs = slices_mut(&mut og, "out")?;
    let o: &mut [T] = bytemuck::cast_slice_mut(&mut *outs[0]);
    match op {
        "linear" => detach(py, || spmm::linear(l, bv, av, m, o)),
        "linear_grad_input" => detach(py, || spmm::linear_grad_input(l, bv, av, m, o)),
        "sdd" => detach(py, || spmm::sdd(l, av, bv, m, o)),
        other => Err(PyValueError::new_err(format!("op: unknown kernel {other:?}"))),
    }
}

/// Runs one spmm kernel: `op` is "linear" (`a` = x, `b` = values), "linear_grad_input" (`a` = dy,
/// `b` = values) or "sdd" (`a`, `b` the dense operands). `layout` holds the five int64 arrays
/// (row_offsets, col_indices, t_offsets, t_perm, t_row_indices); all arrays are flat and contiguous.
/// `dtype` is "float32" (float32 arrays) or "float16" / "bfloat16" (int16 arrays of the raw bits; the
/// kernel accumulates in f32 and rounds `out` once, to nearest even).
#[pyfunction]
#[pyo3(signature = (op, shape, block, layout, a, b, m, out, dtype = "float32"))]
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
    dtype: &str,
) -> PyResult<()> {
    if layout.len() != 5 {
        return Err(PyValueError::new_err("layout: expected 5 int64 arrays"));
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
    match dtype {
        "float32" => run::<f32, f32>(py, op, &l, &a, &b, m, &out, dtype),
        "float16" => run::<half::f16, i16>(py, op, &l, &a, &b, m, &out, dtype),
        "bfloat16" => run::<half::bf16, i16>(py, op, &l, &a, &b, m, &out, dtype),
        other => Err(PyValueError::new_err(format!(
            "dtype: unsupported {other:?}; expected 'float32', 'float16' or 'bfloat16'"
        ))),
    }
}

/// Adds this module's functions to `sparsekit._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(bsr_kernel, m)?)?;
    Ok(())
}
