//! Bindings of `sparsekit_core::balance`: the per-expert counters as a Python class, the imbalance
//! statistics and the aux-loss-free bias update.

use numpy::{PyReadonlyArray1, PyReadwriteArray1};
use pyo3::prelude::*;
use sparsekit_core::balance;

use crate::arrays::{readonly, readwrite, slices, slices_mut};
use crate::error::to_py;

/// Per-expert load counters (last step and EMA) kept in Rust.
#[pyclass(module = "sparsekit._core")]
pub struct BalanceCounters {
    inner: balance::Counters,
}

#[pymethods]
impl BalanceCounters {
    #[new]
    fn new(n_experts: usize, ema: f64) -> PyResult<Self> {
        Ok(BalanceCounters { inner: balance::Counters::new(n_experts, ema).map_err(to_py)? })
    }

    /// Record one step's kept counts per expert and dropped slots.
    fn update(&mut self, counts: Vec<i64>, dropped: u64) -> PyResult<()> {
        self.inner.update(&counts, dropped).map_err(to_py)
    }

    /// Last step's counts per expert.
    fn step_counts(&self) -> Vec<f64> {
        self.inner.step.clone()
    }

    /// EMA of the counts per expert.
    fn ema_counts(&self) -> Vec<f64> {
        self.inner.ema.clone()
    }

    /// Steps recorded.
    #[getter]
    fn steps(&self) -> u64 {
        self.inner.steps
    }

    /// Dropped fraction of the last step.
    fn dropped_fraction(&self) -> f64 {
        self.inner.dropped_fraction()
    }

    /// Slots routed and dropped over all steps.
    fn totals(&self) -> (u64, u64) {
        (self.inner.routed, self.inner.dropped)
    }
}

/// (max/mean, coefficient of variation, entropy, unused experts) of a count vector.
#[pyfunction]
pub fn balance_stats(counts: Vec<f64>) -> (f64, f64, f64, u64) {
    let s = balance::stats(&counts);
    (s.max_over_mean, s.cv, s.entropy, s.unused)
}

/// In place: `bias[i] += rate * sign(mean(counts) - counts[i])` (bias: float32 numpy array).
#[pyfunction]
pub fn aux_free_update(bias: Bound<'_, PyAny>, counts: Bound<'_, PyAny>, rate: f32) -> PyResult<()> {
    let cg: Vec<PyReadonlyArray1<f64>> = readonly(&[counts], "counts", "float64")?;
    let c: Vec<&[f64]> = slices(&cg, "counts")?;
    let mut bg: Vec<PyReadwriteArray1<f32>> = readwrite(&[bias], "bias")?;
    let mut b = slices_mut(&mut bg, "bias")?;
    balance::aux_free_update(b[0], c[0], rate).map_err(to_py)
}

/// Adds this module's functions to `sparsekit._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<BalanceCounters>()?;
    m.add_function(wrap_pyfunction!(balance_stats, m)?)?;
    m.add_function(wrap_pyfunction!(aux_free_update, m)?)?;
    Ok(())
}
