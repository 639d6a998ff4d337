//! Bindings of `sparsekit_core::select`. Each function borrows its buffers, releases the GIL for the
//! whole computation (`error::detach`: core errors mapped, panics caught). Argument checking with friendly
//! messages happens first in Python (`sparsekit/select.py`); the core re-checks everything.

use bytemuck::Pod;
use numpy::{PyReadonlyArray1, PyReadwriteArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use sparsekit_core::select::{self, BlockGrid, BlockNorm, Order, Score};

use crate::arrays::{one, readonly, readwrite, slices, slices_mut};
use crate::error::detach;
use crate::with_dtype;

fn parse_order(by: &str) -> PyResult<Order> {
    match by {
        "abs" => Ok(Order::Abs),
        "value" => Ok(Order::Value),
        other => Err(PyValueError::new_err(format!("by must be 'abs' or 'value', got {other:?}"))),
    }
}

fn parse_norm(norm: &str) -> PyResult<BlockNorm> {
    match norm {
        "l1" => Ok(BlockNorm::L1),
        "l2" => Ok(BlockNorm::L2),
        "max" => Ok(BlockNorm::Max),
        other => Err(PyValueError::new_err(format!("norm must be 'l1', 'l2' or 'max', got {other:?}"))),
    }
}

/// Top-k masks over all `sources` together, written into `masks` (bool arrays of the same lengths).
#[pyfunction]
pub fn topk_masks(
    py: Python<'_>,
    sources: Vec<Bound<'_, PyAny>>,
    masks: Vec<Bound<'_, PyAny>>,
    dtype: &str,
    k: u64,
    by: &str,
) -> PyResult<()> {
    let order = parse_order(by)?;
    with_dtype!(dtype, |T, E| {
        let guards: Vec<PyReadonlyArray1<E>> = readonly(&sources, "sources", dtype)?;
        let xs: Vec<&[T]> = slices(&guards, "sources")?;
        let mut out_guards: Vec<PyReadwriteArray1<bool>> = readwrite(&masks, "masks")?;
        let mut outs = slices_mut(&mut out_guards, "masks")?;
        detach(py, || select::topk_masks(&xs, &mut outs, k, order))
    })
}

fn values_as_f64<T: Score>(values: Vec<T>) -> Vec<f64> {
    values.into_iter().map(Score::to_f64).collect()
}

/// The `rank`-th largest score (1-based) over all sources, for each rank, as floats.
#[pyfunction]
pub fn kth_values(py: Python<'_>, sources: Vec<Bound<'_, PyAny>>, dtype: &str, ranks: Vec<u64>, by: &str) -> PyResult<Vec<f64>> {
    let order = parse_order(by)?;
    with_dtype!(dtype, |T, E| {
        let guards: Vec<PyReadonlyArray1<E>> = readonly(&sources, "sources", dtype)?;
        let xs: Vec<&[T]> = slices(&guards, "sources")?;
        detach(py, || select::kth_values(&xs, &ranks, order)).map(values_as_f64)
    })
}

fn single<T: Pod>(xs: Vec<&[T]>) -> &[T] {
    xs[0]
}

/// N:M mask of `x` viewed as (outer, length, inner), groups of `m` along `length`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn nm_mask(
    py: Python<'_>,
    x: Bound<'_, PyAny>,
    out: Bound<'_, PyAny>,
    dtype: &str,
    length: usize,
    inner: usize,
    n: usize,
    m: usize,
    by: &str,
) -> PyResult<()> {
    let order = parse_order(by)?;
    with_dtype!(dtype, |T, E| {
        let guards: Vec<PyReadonlyArray1<E>> = readonly(&one(&x), "x", dtype)?;
        let xs: &[T] = single(slices(&guards, "x")?);
        let mut out_guards: Vec<PyReadwriteArray1<bool>> = readwrite(&one(&out), "out")?;
        let mut outs = slices_mut(&mut out_guards, "out")?;
        let o: &mut [bool] = outs[0];
        detach(py, || select::nm_mask(xs, o, length, inner, n, m, order))
    })
}

/// Keep the `k` blocks of highest norm; fills the element mask and the block mask.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn block_topk_mask(
    py: Python<'_>,
    x: Bound<'_, PyAny>,
    mask: Bound<'_, PyAny>,
    block_mask: Bound<'_, PyAny>,
    dtype: &str,
    shape: (usize, usize),
    block: (usize, usize),
    k: u64,
    norm: &str,
) -> PyResult<()> {
    let norm = parse_norm(norm)?;
    let grid = BlockGrid { rows: shape.0, cols: shape.1, bh: block.0, bw: block.1 };
    with_dtype!(dtype, |T, E| {
        let guards: Vec<PyReadonlyArray1<E>> = readonly(&one(&x), "x", dtype)?;
        let xs: &[T] = single(slices(&guards, "x")?);
        let mut out_guards: Vec<PyReadwriteArray1<bool>> = readwrite(&[mask.clone(), block_mask.clone()], "mask")?;
        let mut outs = slices_mut(&mut out_guards, "mask")?;
        let (elem, blocks) = outs.split_at_mut(1);
        let (elem, blocks): (&mut [bool], &mut [bool]) = (&mut elem[0], &mut blocks[0]);
        detach(py, || select::block_topk_mask(xs, grid, k, norm, elem, blocks))
    })
}
