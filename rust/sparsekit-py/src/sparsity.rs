//! Dynamic sparse training helpers: mask updates (drop/grow) over many tensors at once.
//! Bindings of `sparsekit_core::sparsity`. Buffers are borrowed (zero-copy) and the GIL is released;
//! the Python controller (`sparsekit/sparsity/controller.py`) checks arguments first.

use bytemuck::Pod;
use numpy::{Element, PyReadonlyArray1, PyReadwriteArray1};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use sparsekit_core::select::Score;
use sparsekit_core::sparsity::{self, Counts, Layer};

use crate::arrays::{readonly, readwrite, slices, slices_mut};
use crate::error::detach;
use crate::with_dtype;

fn bool_slices<'a>(guards: &'a [PyReadonlyArray1<'_, bool>]) -> PyResult<Vec<&'a [bool]>> {
    guards.iter().map(|g| g.as_slice().map_err(|_| PyValueError::new_err("masks: arrays must be contiguous"))).collect()
}

fn cast_mut<E: Pod, T: Pod>(xs: Vec<&mut [E]>) -> Vec<&mut [T]> {
    xs.into_iter().map(bytemuck::cast_slice_mut::<E, T>).collect()
}

#[allow(clippy::too_many_arguments)]
fn run<T: Score + Pod, E: Element + Pod, G: Score + Pod, GE: Element + Pod>(
    py: Python<'_>,
    weights: &[Bound<'_, PyAny>],
    masks: &[Bound<'_, PyAny>],
    grows: &[Bound<'_, PyAny>],
    states: &[Bound<'_, PyAny>],
    state_layers: &[usize],
    counts: Counts,
) -> PyResult<Vec<(u64, u64, u64)>> {
    let n = weights.len();
    if masks.len() != n || !(grows.is_empty() || grows.len() == n) || states.len() != state_layers.len() {
        return Err(PyValueError::new_err("sparsity_update: one mask (and grow score) per weight, one layer index per state"));
    }
    if state_layers.iter().any(|&l| l >= n) {
        return Err(PyValueError::new_err("state_layers: index out of range"));
    }
    let mut w_guards: Vec<PyReadwriteArray1<E>> = readwrite(weights, "weights")?;
    let mut m_guards: Vec<PyReadwriteArray1<bool>> = readwrite(masks, "masks")?;
    let mut s_guards: Vec<PyReadwriteArray1<E>> = readwrite(states, "states")?;
    let g_guards: Vec<PyReadonlyArray1<GE>> = readonly(grows, "grows", "the grow-score dtype's")?;
    let ws: Vec<&mut [T]> = cast_mut(slices_mut(&mut w_guards, "weights")?);
    let ms = slices_mut(&mut m_guards, "masks")?;
    let ss: Vec<&mut [T]> = cast_mut(slices_mut(&mut s_guards, "states")?);
    let gs: Vec<&[G]> = slices(&g_guards, "grows")?;
    let mut per_layer: Vec<Vec<&mut [T]>> = (0..n).map(|_| Vec::new()).collect();
    for (s, &l) in ss.into_iter().zip(state_layers) {
        per_layer[l].push(s);
    }
    let mut layers: Vec<Layer<'_, T, G>> = ws
        .into_iter()
        .zip(ms)
        .zip(per_layer)
        .enumerate()
        .map(|(i, ((weight, mask), states))| Layer { weight, mask, grow: gs.get(i).copied(), states })
        .collect();
    let stats = detach(py, || sparsity::update(&mut layers, &counts))?;
    Ok(stats.into_iter().map(|s| (s.kept, s.grown, s.dropped)).collect())
}

/// One fused mask update (see `sparsekit_core::sparsity::update`): masks, weights and states are
/// written in place. `keep`/`grow`: one count each (`global_`) or one per layer. `grow_dtype` is
/// `dtype` or "float32". Returns (kept, grown, dropped) per layer.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn sparsity_update(
    py: Python<'_>,
    weights: Vec<Bound<'_, PyAny>>,
    masks: Vec<Bound<'_, PyAny>>,
    grows: Vec<Bound<'_, PyAny>>,
    states: Vec<Bound<'_, PyAny>>,
    state_layers: Vec<usize>,
    dtype: &str,
    grow_dtype: &str,
    keep: Vec<u64>,
    grow: Vec<u64>,
    global_: bool,
) -> PyResult<Vec<(u64, u64, u64)>> {
    if keep.len() != grow.len() || (global_ && keep.len() != 1) {
        return Err(PyValueError::new_err("keep and grow: one count each (global) or one per layer"));
    }
    let counts = if global_ {
        Counts::Global { keep: keep[0], grow: grow[0] }
    } else {
        Counts::PerLayer(keep.into_iter().zip(grow).collect())
    };
    with_dtype!(dtype, |T, E| {
        if grow_dtype == dtype {
            run::<T, E, T, E>(py, &weights, &masks, &grows, &states, &state_layers, counts)
        } else if grow_dtype == "float32" {
            run::<T, E, f32, f32>(py, &weights, &masks, &grows, &states, &state_layers, counts)
        } else {
            Err(PyTypeError::new_err(format!("grow_dtype must be {dtype} or float32, got {grow_dtype}")))
        }
    })
}

/// Number of true entries of each bool mask.
#[pyfunction]
pub fn sparsity_count(py: Python<'_>, masks: Vec<Bound<'_, PyAny>>) -> PyResult<Vec<u64>> {
    let guards: Vec<PyReadonlyArray1<bool>> = readonly(&masks, "masks", "bool")?;
    let ms = bool_slices(&guards)?;
    detach(py, || sparsity::count_masks(&ms))
}

/// `x[i] = 0` where `mask[i]` is false, for each pair (in place).
#[pyfunction]
pub fn sparsity_zero_off(py: Python<'_>, xs: Vec<Bound<'_, PyAny>>, masks: Vec<Bound<'_, PyAny>>, dtype: &str) -> PyResult<()> {
    let m_guards: Vec<PyReadonlyArray1<bool>> = readonly(&masks, "masks", "bool")?;
    let ms = bool_slices(&m_guards)?;
    with_dtype!(dtype, |T, E| {
        let mut guards: Vec<PyReadwriteArray1<E>> = readwrite(&xs, "xs")?;
        let mut x: Vec<&mut [T]> = cast_mut(slices_mut(&mut guards, "xs")?);
        detach(py, || sparsity::zero_off(&mut x, &ms))
    })
}

/// Adds this module's functions to `sparsekit._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(sparsity_update, m)?)?;
    m.add_function(wrap_pyfunction!(sparsity_count, m)?)?;
    m.add_function(wrap_pyfunction!(sparsity_zero_off, m)?)?;
    Ok(())
}
