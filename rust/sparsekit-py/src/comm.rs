//! Bindings of `sparsekit_core::comm`. `comm_read_specs` is the fast path for "plan from tensors":
//! it reads each tensor's byte size, dtype and device with as few attribute reads as torch allows
//! (dtype objects compared by identity, `is_cpu` instead of building a `torch.device`), so the
//! per-tensor cost is a handful of C getters and no Python bytecode. Argument checks with friendly
//! messages happen in `sparsekit/comm/_plan.py`; the core re-checks everything.

use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};
use sparsekit_core::comm::{self, BucketArgs, Buckets};

use crate::arrays::{one, readonly, slices};
use crate::error::detach;

type Arr<'py> = Bound<'py, PyArray1<i64>>;

fn to_u64(v: &[i64], arg: &str) -> PyResult<Vec<u64>> {
    v.iter()
        .map(|&x| u64::try_from(x).map_err(|_| PyValueError::new_err(format!("{arg}: nbytes must be >= 0, got {x}"))))
        .collect()
}

fn i64_slice<'a>(g: &'a [PyReadonlyArray1<'_, i64>], arg: &str) -> PyResult<&'a [i64]> {
    Ok(slices::<i64, i64>(g, arg)?[0])
}

/// One distinct (dtype, device) seen so far; the dtype object is kept alive for identity checks.
struct Key {
    dtype: Py<PyAny>,
    cpu: bool,
    device: String,
    name: String,
}

/// Read `(nbytes, key id, sparse)` for each item of `items` (a list of tensors and/or
/// `(nbytes, dtype_key)` pairs). Returns int64 arrays `nbytes`, `keys`, `sparse` (0/1) and the key
/// names (`"torch.float32@cpu"`), in first-seen order.
#[pyfunction]
pub fn comm_read_specs<'py>(
    py: Python<'py>,
    items: &Bound<'py, PyList>,
    tensor_type: &Bound<'py, PyAny>,
    parameter_type: &Bound<'py, PyAny>,
) -> PyResult<(Arr<'py>, Arr<'py>, Arr<'py>, Vec<String>)> {
    let n = items.len();
    let (mut nbytes, mut keys, mut sparse) = (Vec::with_capacity(n), Vec::with_capacity(n), vec![0i64; n]);
    let mut tkeys: Vec<Key> = Vec::new();
    let mut names: Vec<String> = Vec::new(); // all key names, tensor keys and pair keys alike
    let mut last: Option<(*mut pyo3::ffi::PyObject, bool, i64)> = None;
    let (t_ptr, p_ptr) = (tensor_type.as_ptr(), parameter_type.as_ptr());
    for (i, item) in items.iter().enumerate() {
        let ty = item.get_type();
        let is_tensor = ty.as_ptr() == t_ptr || ty.as_ptr() == p_ptr || item.is_instance(tensor_type)?;
        if !is_tensor {
            let pair = item.cast::<PyTuple>().ok().filter(|t| t.len() == 2);
            let Some(pair) = pair else {
                return Err(PyTypeError::new_err(format!(
                    "params_or_specs[{i}] must be a tensor or a (nbytes, dtype_key) pair, got {}",
                    ty.name()?
                )));
            };
            let nb: i64 = pair.get_item(0)?.extract().map_err(|_| {
                PyTypeError::new_err(format!("params_or_specs[{i}]: nbytes must be an int"))
            })?;
            if nb < 0 {
                return Err(PyValueError::new_err(format!("params_or_specs[{i}]: nbytes must be >= 0, got {nb}")));
            }
            let key = pair.get_item(1)?.str()?.to_string();
            let id = match names.iter().position(|k| *k == key) {
                Some(id) => id,
                None => {
                    names.push(key);
                    names.len() - 1
                }
            };
            nbytes.push(nb);
            keys.push(id as i64);
            continue;
        }
        let nb = match item.getattr(intern!(py, "nbytes")).and_then(|v| v.extract::<i64>()) {
            Ok(v) => v,
            Err(e) => {
                // sparse tensors refuse `nbytes`: size them as their dense equivalent, own bucket
                if !item.getattr(intern!(py, "is_sparse"))?.is_truthy()? {
                    return Err(PyTypeError::new_err(format!("params_or_specs[{i}]: cannot read nbytes: {e}")));
                }
                sparse[i] = 1;
                let numel: i64 = item.call_method0(intern!(py, "numel"))?.extract()?;
                let es: i64 = item.call_method0(intern!(py, "element_size"))?.extract()?;
                numel * es
            }
        };
        let dtype = item.getattr(intern!(py, "dtype"))?;
        let cpu = item.getattr(intern!(py, "is_cpu"))?.is_truthy()?;
        // common case: same dtype object and a CPU tensor again, no device object built
        let id = match last {
            Some((d, c, id)) if d == dtype.as_ptr() && c && cpu => id,
            _ => {
                let device = if cpu { "cpu".to_string() } else { item.getattr(intern!(py, "device"))?.str()?.to_string() };
                let found = tkeys.iter().find(|k| k.dtype.as_ptr() == dtype.as_ptr() && k.cpu == cpu && k.device == device);
                let name = match found {
                    Some(k) => k.name.clone(),
                    None => {
                        let name = format!("{}@{}", dtype.str()?, device);
                        tkeys.push(Key { dtype: dtype.clone().unbind(), cpu, device, name: name.clone() });
                        name
                    }
                };
                let id = match names.iter().position(|k| *k == name) {
                    Some(id) => id,
                    None => {
                        names.push(name);
                        names.len() - 1
                    }
                } as i64;
                last = Some((dtype.as_ptr(), cpu, id));
                id
            }
        };
        nbytes.push(nb);
        keys.push(id);
    }
    Ok((PyArray1::from_vec(py, nbytes), PyArray1::from_vec(py, keys), PyArray1::from_vec(py, sparse), names))
}

fn buckets_out<'py>(py: Python<'py>, b: Buckets) -> (Arr<'py>, Arr<'py>, Arr<'py>, Arr<'py>, Arr<'py>) {
    let prio: Vec<i64> = comm::priorities(&b).into_iter().map(i64::from).collect();
    let limits: Vec<i64> = b.limits.iter().map(|&l| l as i64).collect();
    let classes: Vec<i64> = b.classes.iter().map(|&c| c as i64).collect();
    (
        PyArray1::from_vec(py, b.indices),
        PyArray1::from_vec(py, b.offsets),
        PyArray1::from_vec(py, limits),
        PyArray1::from_vec(py, classes),
        PyArray1::from_vec(py, prio),
    )
}

/// Bucket assignment (see `sparsekit_core::comm::assign_buckets`). Inputs are int64 arrays; `order`
/// None means natural order. Returns `(indices, offsets, limits, classes, priorities)` int64 arrays.
#[pyfunction]
#[pyo3(signature = (nbytes, keys, sparse, order, positional, limits, sort_by_min, classes))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn comm_plan<'py>(
    py: Python<'py>,
    nbytes: &Bound<'py, PyAny>,
    keys: &Bound<'py, PyAny>,
    sparse: &Bound<'py, PyAny>,
    order: Option<&Bound<'py, PyAny>>,
    positional: bool,
    limits: Vec<u64>,
    sort_by_min: bool,
    classes: Option<Vec<u64>>,
) -> PyResult<(Arr<'py>, Arr<'py>, Arr<'py>, Arr<'py>, Arr<'py>)> {
    let ng = readonly::<i64>(&one(nbytes), "nbytes", "int64")?;
    let kg = readonly::<i64>(&one(keys), "keys", "int64")?;
    let sg = readonly::<i64>(&one(sparse), "sparse", "int64")?;
    let og = match order {
        Some(o) => readonly::<i64>(&one(o), "ready_order", "int64")?,
        None => Vec::new(),
    };
    let nb = to_u64(i64_slice(&ng, "nbytes")?, "params_or_specs")?;
    let kv: Vec<u32> = i64_slice(&kg, "keys")?
        .iter()
        .map(|&k| u32::try_from(k).map_err(|_| PyValueError::new_err(format!("keys: bad key id {k}"))))
        .collect::<PyResult<_>>()?;
    let sv: Vec<bool> = i64_slice(&sg, "sparse")?.iter().map(|&s| s != 0).collect();
    let natural: Vec<i64>;
    let ov: &[i64] = match og.first() {
        Some(_) => i64_slice(&og, "ready_order")?,
        None => {
            natural = (0..nb.len() as i64).collect();
            &natural
        }
    };
    let b = detach(py, || {
        comm::assign_buckets(&BucketArgs {
            nbytes: &nb,
            keys: &kv,
            sparse: &sv,
            order: ov,
            positional,
            limits: &limits,
            sort_by_min,
            classes: classes.as_deref(),
        })
    })?;
    Ok(buckets_out(py, b))
}

/// Plan fingerprint (FNV-1a 64 over buckets, sizes and rank-independent key names), as an int.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn comm_fingerprint(
    py: Python<'_>,
    indices: &Bound<'_, PyAny>,
    offsets: &Bound<'_, PyAny>,
    limits: &Bound<'_, PyAny>,
    classes: &Bound<'_, PyAny>,
    nbytes: &Bound<'_, PyAny>,
    keys: &Bound<'_, PyAny>,
    key_names: Vec<String>,
) -> PyResult<u64> {
    let g: Vec<PyReadonlyArray1<i64>> =
        readonly(&[indices.clone(), offsets.clone(), limits.clone(), classes.clone(), nbytes.clone(), keys.clone()], "plan", "int64")?;
    let s = slices::<i64, i64>(&g, "plan")?;
    let offs = s[1];
    if offs.first() != Some(&0)
        || offs.windows(2).any(|w| w[0] > w[1])
        || *offs.last().unwrap() as usize != s[0].len()
        || s[2].len() + 1 != offs.len()
        || s[3].len() + 1 != offs.len()
    {
        return Err(PyValueError::new_err("plan: inconsistent bucket arrays"));
    }
    let b = Buckets {
        indices: s[0].to_vec(),
        offsets: offs.to_vec(),
        limits: s[2].iter().map(|&x| x as u64).collect(),
        classes: s[3].iter().map(|&x| x as u8).collect(),
    };
    let nb = to_u64(s[4], "nbytes")?;
    let kv: Vec<u32> = s[5].iter().map(|&k| k as u32).collect();
    let names: Vec<&str> = key_names.iter().map(String::as_str).collect();
    detach(py, || comm::fingerprint(&b, &nb, &kv, &names))
}

/// ZeRO-style shard owners (LPT) and per-rank loads, as int64 arrays.
#[pyfunction]
pub fn comm_assign_shards<'py>(py: Python<'py>, nbytes: &Bound<'py, PyAny>, world_size: usize) -> PyResult<(Arr<'py>, Arr<'py>)> {
    let g = readonly::<i64>(&one(nbytes), "nbytes", "int64")?;
    let nb = to_u64(i64_slice(&g, "nbytes")?, "nbytes")?;
    let (owner, load) = detach(py, || comm::assign_shards(&nb, world_size))?;
    Ok((
        PyArray1::from_vec(py, owner.into_iter().map(i64::from).collect()),
        PyArray1::from_vec(py, load.into_iter().map(|l| l as i64).collect()),
    ))
}

/// Element offsets of the chunks a large parameter is split into (len = chunks + 1).
#[pyfunction]
pub fn comm_chunk_bounds(numel: u64, nbytes: u64, chunk_bytes: u64) -> Vec<u64> {
    comm::chunk_bounds(numel, nbytes, chunk_bytes)
}

/// Adds this module's functions to `sparsekit._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(comm_read_specs, m)?)?;
    m.add_function(wrap_pyfunction!(comm_plan, m)?)?;
    m.add_function(wrap_pyfunction!(comm_fingerprint, m)?)?;
    m.add_function(wrap_pyfunction!(comm_assign_shards, m)?)?;
    m.add_function(wrap_pyfunction!(comm_chunk_bounds, m)?)?;
    Ok(())
}
