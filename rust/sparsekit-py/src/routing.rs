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

#[allow(clippy::too_many_arguments)] // the binding's arguments, passed through
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
    let i: &mut [i64] = ids_s[0];
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
    let k: &mut [bool] = ks[0];
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
    let kp: &mut [bool] = ks[0];
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

/// Borrow `a` as a read-only slice of `T` (numpy element `E`; half precision arrives as int16 bits).
fn ro<'a, E: numpy::Element + bytemuck::Pod, T: bytemuck::Pod>(g: &'a [PyReadonlyArray1<'_, E>], arg: &str) -> PyResult<&'a [T]> {
    Ok(slices::<E, T>(g, arg)?[0])
}

fn rw<'a, E: numpy::Element + bytemuck::Pod, T: bytemuck::Pod>(g: &'a mut [PyReadwriteArray1<'_, E>], arg: &str) -> PyResult<&'a mut [T]> {
    let s = slices_mut(g, arg)?.into_iter().next().expect("one array");
    Ok(bytemuck::cast_slice_mut::<E, T>(s))
}

/// `out[p] = x[order[p] // k]`, rows of `d` (flat arrays; dtype float32/float64/float16/bfloat16).
#[pyfunction]
#[pyo3(signature = (x, d, order, inverse, k, out, dtype))]
#[allow(clippy::too_many_arguments)]
pub fn moe_permute(py: Python<'_>, x: Bound<'_, PyAny>, d: usize, order: Bound<'_, PyAny>, inverse: Bound<'_, PyAny>, k: usize,
                   out: Bound<'_, PyAny>, dtype: &str) -> PyResult<()> {
    let pg: Vec<PyReadonlyArray1<i64>> = readonly(&[order, inverse], "order", "int64")?;
    let (o, inv) = (slices::<i64, i64>(&pg, "order")?[0], slices::<i64, i64>(&pg, "order")?[1]);
    crate::with_dtype!(dtype, |T, E| {
        let xg: Vec<PyReadonlyArray1<E>> = readonly(&one(&x), "x", dtype)?;
        let mut og: Vec<PyReadwriteArray1<E>> = readwrite(&one(&out), "out")?;
        let (xs, os) = (ro::<E, T>(&xg, "x")?, rw::<E, T>(&mut og, "out")?);
        detach(py, || routing::dispatch::permute(xs, d, o, inv, k, os))
    })
}

/// `gx[t] = sum_j g[inverse[t*k + j]]` (the backward of `moe_permute`).
#[pyfunction]
#[pyo3(signature = (g, d, order, inverse, k, gx, dtype))]
#[allow(clippy::too_many_arguments)]
pub fn moe_gather_sum(py: Python<'_>, g: Bound<'_, PyAny>, d: usize, order: Bound<'_, PyAny>, inverse: Bound<'_, PyAny>, k: usize,
                      gx: Bound<'_, PyAny>, dtype: &str) -> PyResult<()> {
    let pg: Vec<PyReadonlyArray1<i64>> = readonly(&[order, inverse], "order", "int64")?;
    let (o, inv) = (slices::<i64, i64>(&pg, "order")?[0], slices::<i64, i64>(&pg, "order")?[1]);
    crate::with_dtype!(dtype, |T, E| {
        let gg: Vec<PyReadonlyArray1<E>> = readonly(&one(&g), "grad", dtype)?;
        let mut og: Vec<PyReadwriteArray1<E>> = readwrite(&one(&gx), "grad_x")?;
        let (gs, os) = (ro::<E, T>(&gg, "grad")?, rw::<E, T>(&mut og, "grad_x")?);
        detach(py, || routing::dispatch::gather_sum(gs, d, o, inv, k, os))
    })
}

/// `out[t] = sum_j w[t*k + j] * y[inverse[t*k + j]]`.
#[pyfunction]
#[pyo3(signature = (y, d, w, order, inverse, k, out, dtype))]
#[allow(clippy::too_many_arguments)]
pub fn moe_unpermute(py: Python<'_>, y: Bound<'_, PyAny>, d: usize, w: Bound<'_, PyAny>, order: Bound<'_, PyAny>,
                     inverse: Bound<'_, PyAny>, k: usize, out: Bound<'_, PyAny>, dtype: &str) -> PyResult<()> {
    let pg: Vec<PyReadonlyArray1<i64>> = readonly(&[order, inverse], "order", "int64")?;
    let (o, inv) = (slices::<i64, i64>(&pg, "order")?[0], slices::<i64, i64>(&pg, "order")?[1]);
    crate::with_dtype!(dtype, |T, E| {
        let yg: Vec<PyReadonlyArray1<E>> = readonly(&[y.clone(), w.clone()], "y", dtype)?;
        let mut og: Vec<PyReadwriteArray1<E>> = readwrite(&one(&out), "out")?;
        let ys = slices::<E, T>(&yg, "y")?;
        let os = rw::<E, T>(&mut og, "out")?;
        let (yv, wv) = (ys[0], ys[1]);
        detach(py, || routing::dispatch::unpermute(yv, d, wv, o, inv, k, os))
    })
}

/// Backward of `moe_unpermute`: `gy[inverse[s]] = w[s] * g[t]`, `gw[s] = <y[inverse[s]], g[t]>`.
#[pyfunction]
#[pyo3(signature = (g, y, d, w, order, inverse, k, gy, gw, dtype))]
#[allow(clippy::too_many_arguments)]
pub fn moe_unpermute_backward(py: Python<'_>, g: Bound<'_, PyAny>, y: Bound<'_, PyAny>, d: usize, w: Bound<'_, PyAny>,
                              order: Bound<'_, PyAny>, inverse: Bound<'_, PyAny>, k: usize, gy: Bound<'_, PyAny>,
                              gw: Bound<'_, PyAny>, dtype: &str) -> PyResult<()> {
    let pg: Vec<PyReadonlyArray1<i64>> = readonly(&[order, inverse], "order", "int64")?;
    let (o, inv) = (slices::<i64, i64>(&pg, "order")?[0], slices::<i64, i64>(&pg, "order")?[1]);
    crate::with_dtype!(dtype, |T, E| {
        let ig: Vec<PyReadonlyArray1<E>> = readonly(&[g.clone(), y.clone(), w.clone()], "grad", dtype)?;
        let mut og: Vec<PyReadwriteArray1<E>> = readwrite(&[gy.clone(), gw.clone()], "grad_y")?;
        let is = slices::<E, T>(&ig, "grad")?;
        let (gv, yv, wv) = (is[0], is[1], is[2]);
        let mut os = slices_mut(&mut og, "grad_y")?;
        let (a, b) = os.split_at_mut(1);
        let gys: &mut [T] = bytemuck::cast_slice_mut(&mut *a[0]);
        let gws: &mut [T] = bytemuck::cast_slice_mut(&mut *b[0]);
        detach(py, || routing::dispatch::unpermute_backward(gv, yv, d, wv, o, inv, k, gys, gws))
    })
}

/// Adds this module's functions to `sparsekit._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(route_topk, m)?)?;
    m.add_function(wrap_pyfunction!(route_tables, m)?)?;
    m.add_function(wrap_pyfunction!(route_plan, m)?)?;
    m.add_function(wrap_pyfunction!(moe_permute, m)?)?;
    m.add_function(wrap_pyfunction!(moe_gather_sum, m)?)?;
    m.add_function(wrap_pyfunction!(moe_unpermute, m)?)?;
    m.add_function(wrap_pyfunction!(moe_unpermute_backward, m)?)?;
    Ok(())
}
