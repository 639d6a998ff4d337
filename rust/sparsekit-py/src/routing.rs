//! Bindings of `sparsekit_core::routing`. Argument checks with friendly messages happen first in Python
//! (`sparsekit/moe/_routing.py`); the core re-checks everything. Buffers are borrowed zero-copy and the
//! work runs without the GIL (`error::detach`).

use numpy::{PyReadonlyArray1, PyReadwriteArray1};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use sparsekit_core::routing::{self, DropPolicy, Gate, GroupMode, ScoreFn};

use crate::arrays::{one, readonly, readwrite, slices, slices_mut};
use crate::error::detach;

fn parse_score(s: &str) -> PyResult<ScoreFn> {
    match s {
        "softmax" => Ok(ScoreFn::Softmax),
        "sigmoid" => Ok(ScoreFn::Sigmoid),
        "identity" => Ok(ScoreFn::Identity),
        o => Err(PyValueError::new_err(format!("score must be 'softmax', 'sigmoid' or 'identity', got {o:?}"))),
    }
}

fn parse_mode(s: &str) -> PyResult<GroupMode> {
    match s {
        "max" => Ok(GroupMode::Max),
        "top2" => Ok(GroupMode::Top2),
        o => Err(PyValueError::new_err(format!("group_mode must be 'max' or 'top2', got {o:?}"))),
    }
}

fn parse_policy(s: &str) -> PyResult<DropPolicy> {
    match s {
        "probs" => Ok(DropPolicy::Probs),
        "position" => Ok(DropPolicy::Position),
        o => Err(PyValueError::new_err(format!("drop_policy must be 'probs' or 'position', got {o:?}"))),
    }
}

fn topk_typed<T: routing::Real + numpy::Element + bytemuck::Pod>(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    bias: Option<&Bound<'_, PyAny>>,
    gate: Gate,
    ids: &Bound<'_, PyAny>,
    sel: &Bound<'_, PyAny>,
    weights: &Bound<'_, PyAny>,
    dtype: &str,
) -> PyResult<()> {
    let lg: Vec<PyReadonlyArray1<T>> = readonly(&one(logits), "logits", dtype)?;
    let x: Vec<&[T]> = slices(&lg, "logits")?;
    let bg: Vec<PyReadonlyArray1<T>> = match bias {
        Some(b) => readonly(&one(b), "bias", dtype)?,
        None => Vec::new(),
    };
    let b: Vec<&[T]> = slices(&bg, "bias")?;
    let mut ig: Vec<PyReadwriteArray1<i64>> = readwrite(&one(ids), "expert_ids")?;
    let mut ids_s = slices_mut(&mut ig, "expert_ids")?;
    let mut sg: Vec<PyReadwriteArray1<T>> = readwrite(&[sel.clone(), weights.clone()], "weights")?;
    let mut outs = slices_mut(&mut sg, "weights")?;
    let (s, w) = outs.split_at_mut(1);
    let (s, w): (&mut [T], &mut [T]) = (&mut s[0], &mut w[0]);
    let i: &mut [i64] = &mut ids_s[0];
    let xb = x[0];
    let bb = b.first().copied();
    detach(py, || routing::route_topk(xb, bb, &gate, i, s, w))
}

/// Fused gate over `logits` (flat [T*E], float32 or float64): top-k ids, chosen scores, weights.
#[pyfunction]
#[pyo3(signature = (logits, bias, dtype, n_experts, k, score, n_groups, topk_groups, group_mode, normalize, scale, ids, sel, weights))]
#[allow(clippy::too_many_arguments)]
pub fn route_topk(
    py: Python<'_>,
    logits: Bound<'_, PyAny>,
    bias: Option<Bound<'_, PyAny>>,
    dtype: &str,
    n_experts: usize,
    k: usize,
    score: &str,
    n_groups: usize,
    topk_groups: usize,
    group_mode: &str,
    normalize: bool,
    scale: f64,
    ids: Bound<'_, PyAny>,
    sel: Bound<'_, PyAny>,
    weights: Bound<'_, PyAny>,
) -> PyResult<()> {
    let gate = Gate {
        n_experts,
        k,
        score: parse_score(score)?,
        n_groups,
        topk_groups,
        group_mode: parse_mode(group_mode)?,
        normalize,
        scale,
    };
    match dtype {
        "float32" => topk_typed::<f32>(py, &logits, bias.as_ref(), gate, &ids, &sel, &weights, dtype),
        "float64" => topk_typed::<f64>(py, &logits, bias.as_ref(), gate, &ids, &sel, &weights, dtype),
        o => Err(PyTypeError::new_err(format!("unsupported dtype {o}; expected float32 or float64"))),
    }
}

/// Routing tables of `ids` (flat int64 [T*k]) written into order / inverse / counts / offsets / kept.
#[pyfunction]
#[pyo3(signature = (ids, n_experts, capacity, drop_policy, priority, order, inverse, counts, offsets, kept))]
#[allow(clippy::too_many_arguments)]
pub fn route_tables(
    py: Python<'_>,
    ids: Bound<'_, PyAny>,
    n_experts: usize,
    capacity: Option<usize>,
    drop_policy: &str,
    priority: Option<Bound<'_, PyAny>>,
    order: Bound<'_, PyAny>,
    inverse: Bound<'_, PyAny>,
    counts: Bound<'_, PyAny>,
    offsets: Bound<'_, PyAny>,
    kept: Bound<'_, PyAny>,
) -> PyResult<()> {
    let policy = parse_policy(drop_policy)?;
    let ig: Vec<PyReadonlyArray1<i64>> = readonly(&one(&ids), "expert_ids", "int64")?;
    let idv: Vec<&[i64]> = slices(&ig, "expert_ids")?;
    let pg: Vec<PyReadonlyArray1<f32>> = match &priority {
        Some(p) => readonly(&one(p), "priority", "float32")?,
        None => Vec::new(),
    };
    let pv: Vec<&[f32]> = slices(&pg, "priority")?;
    let mut og: Vec<PyReadwriteArray1<i64>> = readwrite(&[order, inverse, counts, offsets], "order")?;
    let mut outs = slices_mut(&mut og, "order")?;
    let mut kg: Vec<PyReadwriteArray1<bool>> = readwrite(&one(&kept), "kept")?;
    let mut ks = slices_mut(&mut kg, "kept")?;
    let k: &mut [bool] = &mut ks[0];
    let [o, inv, c, off] = &mut outs[..] else { unreachable!() };
    let idv0 = idv[0];
    let p0 = pv.first().copied();
    detach(py, || routing::route_tables(idv0, n_experts, capacity, policy, p0, o, inv, c, off, k))
}

#[allow(clippy::too_many_arguments)]
fn plan_typed<T: routing::Real + numpy::Element + bytemuck::Pod>(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    bias: Option<&Bound<'_, PyAny>>,
    gate: Gate,
    capacity: Option<usize>,
    policy: DropPolicy,
    outs: [&Bound<'_, PyAny>; 8],
    dtype: &str,
) -> PyResult<()> {
    let [ids, sel, weights, order, inverse, counts, offsets, kept] = outs;
    let lg: Vec<PyReadonlyArray1<T>> = readonly(&one(logits), "logits", dtype)?;
    let x: Vec<&[T]> = slices(&lg, "logits")?;
    let bg: Vec<PyReadonlyArray1<T>> = match bias {
        Some(b) => readonly(&one(b), "bias", dtype)?,
        None => Vec::new(),
    };
    let b: Vec<&[T]> = slices(&bg, "bias")?;
    let mut ig: Vec<PyReadwriteArray1<i64>> =
        readwrite(&[ids.clone(), order.clone(), inverse.clone(), counts.clone(), offsets.clone()], "expert_ids")?;
    let mut is = slices_mut(&mut ig, "expert_ids")?;
    let [i, o, inv, c, off] = &mut is[..] else { unreachable!() };
    let mut sg: Vec<PyReadwriteArray1<T>> = readwrite(&[sel.clone(), weights.clone()], "weights")?;
    let mut ss = slices_mut(&mut sg, "weights")?;
    let [s, w] = &mut ss[..] else { unreachable!() };
    let mut kg: Vec<PyReadwriteArray1<bool>> = readwrite(&one(kept), "kept")?;
    let mut ks = slices_mut(&mut kg, "kept")?;
    let kp: &mut [bool] = &mut ks[0];
    let xb = x[0];
    let bb = b.first().copied();
    detach(py, || routing::route_plan(xb, bb, &gate, capacity, policy, i, s, w, o, inv, c, off, kp))
}

/// The whole plan of `logits` (flat [T*E], float32 or float64) in one call: the gate's ids, chosen
/// scores and weights, and the tables (order, inverse, counts, offsets, kept), all written in place.
#[pyfunction]
#[pyo3(signature = (logits, bias, dtype, n_experts, k, score, n_groups, topk_groups, group_mode, normalize, scale,
    capacity, drop_policy, ids, sel, weights, order, inverse, counts, offsets, kept))]
#[allow(clippy::too_many_arguments)]
pub fn route_plan(
    py: Python<'_>,
    logits: Bound<'_, PyAny>,
    bias: Option<Bound<'_, PyAny>>,
    dtype: &str,
    n_experts: usize,
    k: usize,
    score: &str,
    n_groups: usize,
    topk_groups: usize,
    group_mode: &str,
    normalize: bool,
    scale: f64,
    capacity: Option<usize>,
    drop_policy: &str,
    ids: Bound<'_, PyAny>,
    sel: Bound<'_, PyAny>,
    weights: Bound<'_, PyAny>,
    order: Bound<'_, PyAny>,
    inverse: Bound<'_, PyAny>,
    counts: Bound<'_, PyAny>,
    offsets: Bound<'_, PyAny>,
    kept: Bound<'_, PyAny>,
) -> PyResult<()> {
    let gate = Gate {
        n_experts,
        k,
        score: parse_score(score)?,
        n_groups,
        topk_groups,
        group_mode: parse_mode(group_mode)?,
        normalize,
        scale,
    };
    let policy = parse_policy(drop_policy)?;
    let outs = [&ids, &sel, &weights, &order, &inverse, &counts, &offsets, &kept];
    match dtype {
        "float32" => plan_typed::<f32>(py, &logits, bias.as_ref(), gate, capacity, policy, outs, dtype),
        "float64" => plan_typed::<f64>(py, &logits, bias.as_ref(), gate, capacity, policy, outs, dtype),
        o => Err(PyTypeError::new_err(format!("unsupported dtype {o}; expected float32 or float64"))),
    }
}

/// Adds this module's functions to `sparsekit._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(route_topk, m)?)?;
    m.add_function(wrap_pyfunction!(route_tables, m)?)?;
    m.add_function(wrap_pyfunction!(route_plan, m)?)?;
    Ok(())
}
