//! Dispatch and combine kernels over a routing plan: row gathers in both directions, so forward and
//! backward are deterministic (every output row is written by one task, sums run in slot order
//! `j = 0..k`; no atomics). Rows are `d` contiguous elements; slot `s = t*k + j` of token `t`,
//! `order[p]` the slot at grouped position `p`, `inverse[s]` its position.
//!
//! - [`permute`]: `out[p] = x[order[p] / k]`.
//! - [`gather_sum`] (permute's backward): `gx[t] = sum_j g[inverse[t*k + j]]`.
//! - [`unpermute`]: `out[t] = sum_j w[s] * y[inverse[s]]`.
//! - [`unpermute_backward`]: `gy[inverse[s]] = w[s] * g[t]`, `gw[s] = <y[inverse[s]], g[t]>`.
//!
//! Half-precision rows are accumulated in float32 and rounded once.

use half::{bf16, f16};
use rayon::prelude::*;

use super::SendPtr;
use crate::error::CoreError;
use crate::pool;

/// Element types of the rows, with the accumulator they sum in.
pub trait Elem: Copy + Send + Sync + 'static {
    type Acc: Copy + Send + Sync + std::ops::Add<Output = Self::Acc> + std::ops::Mul<Output = Self::Acc>;
    const ZERO: Self::Acc;
    fn load(self) -> Self::Acc;
    fn store(a: Self::Acc) -> Self;
}

impl Elem for f32 {
    type Acc = f32;
    const ZERO: f32 = 0.0;
    #[inline(always)]
    fn load(self) -> f32 {
        self
    }
    #[inline(always)]
    fn store(a: f32) -> f32 {
        a
    }
}

impl Elem for f64 {
    type Acc = f64;
    const ZERO: f64 = 0.0;
    #[inline(always)]
    fn load(self) -> f64 {
        self
    }
    #[inline(always)]
    fn store(a: f64) -> f64 {
        a
    }
}

impl Elem for f16 {
    type Acc = f32;
    const ZERO: f32 = 0.0;
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(a: f32) -> f16 {
        f16::from_f32(a)
    }
}

impl Elem for bf16 {
    type Acc = f32;
    const ZERO: f32 = 0.0;
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(a: f32) -> bf16 {
        bf16::from_f32(a)
    }
}

/// Rows per parallel task: about 64 KiB of output each.
fn rows_per_task(d: usize, elem: usize) -> usize {
    (65_536 / (d * elem).max(1)).clamp(1, 4096)
}

/// `n = tokens * k` positions, each in `[0, n)`.
fn check_perm(order: &[i64], inverse: &[i64], tokens: usize, k: usize) -> Result<usize, CoreError> {
    if k == 0 {
        return Err(CoreError::Invalid { arg: "k", why: "must be >= 1".into() });
    }
    let n = tokens * k;
    for (arg, v) in [("order", order), ("inverse", inverse)] {
        if v.len() != n {
            return Err(CoreError::LengthMismatch { arg, expected: n, got: v.len() });
        }
        if v.par_iter().any(|&p| p < 0 || p as u64 >= n as u64) {
            return Err(CoreError::Invalid { arg, why: format!("positions must be in [0, {n})") });
        }
    }
    Ok(n)
}

fn check_len(arg: &'static str, got: usize, expected: usize) -> Result<(), CoreError> {
    if got != expected {
        return Err(CoreError::LengthMismatch { arg, expected, got });
    }
    Ok(())
}

/// `out[p*d..][..d] = x[(order[p] / k)*d..][..d]` for `p < tokens*k`.
pub fn permute<T: Elem>(x: &[T], d: usize, order: &[i64], inverse: &[i64], k: usize, out: &mut [T]) -> Result<(), CoreError> {
    let tokens = x.len().checked_div(d).unwrap_or(inverse.len() / k.max(1));
    let n = check_perm(order, inverse, tokens, k)?;
    check_len("x", x.len(), tokens * d)?;
    check_len("out", out.len(), n * d)?;
    if d == 0 {
        return Ok(());
    }
    let rpt = rows_per_task(d, std::mem::size_of::<T>());
    pool::run(|| {
        out.par_chunks_mut(rpt * d).enumerate().for_each(|(c, o)| {
            for (r, row) in o.chunks_exact_mut(d).enumerate() {
                let t = order[c * rpt + r] as usize / k;
                row.copy_from_slice(&x[t * d..(t + 1) * d]);
            }
        });
        Ok(())
    })
}

/// `gx[t] = sum_{j<k} g[inverse[t*k + j]]` (rows of `d`), summed in slot order.
pub fn gather_sum<T: Elem>(g: &[T], d: usize, order: &[i64], inverse: &[i64], k: usize, gx: &mut [T]) -> Result<(), CoreError> {
    let tokens = inverse.len() / k.max(1);
    let n = check_perm(order, inverse, tokens, k)?;
    check_len("grad", g.len(), n * d)?;
    check_len("grad_x", gx.len(), tokens * d)?;
    if d == 0 {
        return Ok(());
    }
    let rpt = rows_per_task(d, std::mem::size_of::<T>());
    pool::run(|| {
        gx.par_chunks_mut(rpt * d).enumerate().for_each(|(c, o)| {
            let mut acc = vec![T::ZERO; d];
            for (r, row) in o.chunks_exact_mut(d).enumerate() {
                let t = c * rpt + r;
                acc.iter_mut().for_each(|a| *a = T::ZERO);
                for &p in &inverse[t * k..(t + 1) * k] {
                    let src = &g[p as usize * d..(p as usize + 1) * d];
                    for (a, &v) in acc.iter_mut().zip(src) {
                        *a = *a + v.load();
                    }
                }
                for (dst, &a) in row.iter_mut().zip(&acc) {
                    *dst = T::store(a);
                }
            }
        });
        Ok(())
    })
}

/// `out[t] = sum_{j<k} w[t*k + j] * y[inverse[t*k + j]]` (rows of `d`), summed in slot order.
pub fn unpermute<T: Elem>(y: &[T], d: usize, w: &[T], order: &[i64], inverse: &[i64], k: usize, out: &mut [T]) -> Result<(), CoreError> {
    let tokens = w.len() / k.max(1);
    let n = check_perm(order, inverse, tokens, k)?;
    check_len("weights", w.len(), n)?;
    check_len("y", y.len(), n * d)?;
    check_len("out", out.len(), tokens * d)?;
    if d == 0 {
        return Ok(());
    }
    let rpt = rows_per_task(d, std::mem::size_of::<T>());
    pool::run(|| {
        out.par_chunks_mut(rpt * d).enumerate().for_each(|(c, o)| {
            let mut acc = vec![T::ZERO; d];
            for (r, row) in o.chunks_exact_mut(d).enumerate() {
                let t = c * rpt + r;
                acc.iter_mut().for_each(|a| *a = T::ZERO);
                for s in t * k..(t + 1) * k {
                    let p = inverse[s] as usize;
                    let ws = w[s].load();
                    for (a, &v) in acc.iter_mut().zip(&y[p * d..(p + 1) * d]) {
                        *a = *a + ws * v.load();
                    }
                }
                for (dst, &a) in row.iter_mut().zip(&acc) {
                    *dst = T::store(a);
                }
            }
        });
        Ok(())
    })
}

/// Backward of [`unpermute`] for its output gradient `g [tokens, d]`: `gy[inverse[s]] = w[s] * g[t]`
/// (each position written once: `inverse` is a permutation) and `gw[s] = <y[inverse[s]], g[t]>`.
#[allow(clippy::too_many_arguments)]
pub fn unpermute_backward<T: Elem>(
    g: &[T],
    y: &[T],
    d: usize,
    w: &[T],
    order: &[i64],
    inverse: &[i64],
    k: usize,
    gy: &mut [T],
    gw: &mut [T],
) -> Result<(), CoreError> {
    let tokens = w.len() / k.max(1);
    let n = check_perm(order, inverse, tokens, k)?;
    check_len("weights", w.len(), n)?;
    check_len("y", y.len(), n * d)?;
    check_len("grad", g.len(), tokens * d)?;
    check_len("grad_y", gy.len(), n * d)?;
    check_len("grad_weights", gw.len(), n)?;
    // `inverse` must be a permutation for the rows of gy to be written exactly once
    let mut seen = vec![false; n];
    for &p in inverse {
        if std::mem::replace(&mut seen[p as usize], true) {
            return Err(CoreError::Invalid { arg: "inverse", why: "must be a permutation".into() });
        }
    }
    drop(seen);
    let rpt = rows_per_task(d.max(1) * k, std::mem::size_of::<T>());
    let gyp = SendPtr(gy.as_mut_ptr());
    pool::run(|| {
        gw.par_chunks_mut(rpt * k).enumerate().for_each(|(c, gwc)| {
            for (r, gwt) in gwc.chunks_exact_mut(k).enumerate() {
                let t = c * rpt + r;
                let gt = &g[t * d..(t + 1) * d];
                for (j, gws) in gwt.iter_mut().enumerate() {
                    let s = t * k + j;
                    let p = inverse[s] as usize;
                    let ws = w[s].load();
                    let mut dot = T::ZERO;
                    for (i, (&yv, &gv)) in y[p * d..(p + 1) * d].iter().zip(gt).enumerate() {
                        dot = dot + yv.load() * gv.load();
                        // SAFETY: p*d + i < n*d, and row p belongs to slot s alone (inverse is a permutation)
                        unsafe { gyp.write(p * d + i, T::store(ws * gv.load())) };
                    }
                    *gws = T::store(dot);
                }
            }
        });
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_match_direct_loops() {
        let (tokens, k, d) = (7usize, 3usize, 5usize);
        let n = tokens * k;
        // a permutation of the slots and its inverse
        let order: Vec<i64> = (0..n as i64).map(|p| (p * 5 + 2) % n as i64).collect();
        let mut inverse = vec![0i64; n];
        for (p, &s) in order.iter().enumerate() {
            inverse[s as usize] = p as i64;
        }
        let x: Vec<f64> = (0..tokens * d).map(|i| i as f64 * 0.5 - 3.0).collect();
        let y: Vec<f64> = (0..n * d).map(|i| (i % 7) as f64 - 2.5).collect();
        let w: Vec<f64> = (0..n).map(|i| 0.1 * i as f64).collect();
        let g: Vec<f64> = (0..tokens * d).map(|i| (i % 3) as f64 + 0.25).collect();
        let mut out = vec![0.0; n * d];
        permute(&x, d, &order, &inverse, k, &mut out).unwrap();
        for p in 0..n {
            let t = order[p] as usize / k;
            assert_eq!(&out[p * d..(p + 1) * d], &x[t * d..(t + 1) * d]);
        }
        let mut gx = vec![0.0; tokens * d];
        gather_sum(&y, d, &order, &inverse, k, &mut gx).unwrap();
        let mut un = vec![0.0; tokens * d];
        unpermute(&y, d, &w, &order, &inverse, k, &mut un).unwrap();
        let (mut gy, mut gw) = (vec![0.0; n * d], vec![0.0; n]);
        unpermute_backward(&g, &y, d, &w, &order, &inverse, k, &mut gy, &mut gw).unwrap();
        for t in 0..tokens {
            for i in 0..d {
                let mut a = 0.0;
                let mut b = 0.0;
                for j in 0..k {
                    let p = inverse[t * k + j] as usize;
                    a += y[p * d + i];
                    b += w[t * k + j] * y[p * d + i];
                    assert_eq!(gy[p * d + i], w[t * k + j] * g[t * d + i]);
                }
                assert_eq!(gx[t * d + i], a);
                assert!((un[t * d + i] - b).abs() < 1e-12);
            }
            for j in 0..k {
                let p = inverse[t * k + j] as usize;
                let dot: f64 = (0..d).map(|i| y[p * d + i] * g[t * d + i]).sum();
                assert!((gw[t * k + j] - dot).abs() < 1e-12);
            }
        }
        let bad: Vec<i64> = inverse.iter().map(|&p| p.min(3)).collect();
        assert!(unpermute_backward(&g, &y, d, &w, &order, &bad, k, &mut gy, &mut gw).is_err());
        let oob: Vec<i64> = order.iter().map(|&p| p + 1).collect();
        assert!(permute(&x, d, &oob, &inverse, k, &mut out).is_err());
    }
}
