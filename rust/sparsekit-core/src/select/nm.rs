//! N:M semi-structured masks: in every group of `m` consecutive elements along one axis keep the `n`
//! largest scores, ties to the lower position.
//!
//! The tensor is viewed as `(outer, len, inner)` with groups running along `len`. A group's `m` rows of
//! `inner` elements are contiguous in memory (a "slab"), so slabs are processed independently in
//! parallel with no transpose copy, whichever axis the groups run along.

use rayon::prelude::*;

use super::key::{with_key_fn, KeyFn, Order, RadixKey, Score};
use crate::error::CoreError;

/// Groups up to this size are ranked with fixed-size arrays on the stack.
const STACK_GROUP: usize = 32;

fn check<T>(x: &[T], out: &[bool], len: usize, inner: usize, n: usize, m: usize) -> Result<(), CoreError> {
    if m == 0 {
        return Err(CoreError::Invalid { arg: "m", why: "m must be at least 1".into() });
    }
    if n > m {
        return Err(CoreError::Invalid { arg: "n", why: format!("n must be in [0, m={m}], got {n}") });
    }
    if !len.is_multiple_of(m) {
        return Err(CoreError::Invalid { arg: "m", why: format!("m={m} does not divide the group axis of length {len}") });
    }
    if out.len() != x.len() {
        return Err(CoreError::LengthMismatch { arg: "out", expected: x.len(), got: out.len() });
    }
    let row = len.checked_mul(inner).ok_or_else(|| CoreError::Invalid {
        arg: "shape",
        why: format!("a row of {len}x{inner} elements overflows the address space"),
    })?;
    if (row == 0 && !x.is_empty()) || (row > 0 && !x.len().is_multiple_of(row)) {
        return Err(CoreError::Invalid { arg: "shape", why: format!("{} elements do not split into rows of {len}x{inner}", x.len()) });
    }
    Ok(())
}

/// Elements per parallel task: whole groups, enough work to amortise scheduling.
const TASK_LEN: usize = 1 << 14;

fn nm_task<T: Score, F: KeyFn<T>>(xs: &[T], os: &mut [bool], inner: usize, n: usize, m: usize) -> Result<(), CoreError> {
    if xs.iter().any(|v| v.is_nan()) {
        return Err(CoreError::NanInput { arg: "x" });
    }
    let slab = m * inner;
    let mut keys = [T::Key::MIN; STACK_GROUP];
    let mut order: Vec<usize> = Vec::new();
    for (xg, og) in xs.chunks_exact(slab).zip(os.chunks_exact_mut(slab)) {
        for i in 0..inner {
            if m <= STACK_GROUP {
                for j in 0..m {
                    keys[j] = F::key(xg[j * inner + i]);
                }
                // Rank = number of keys that beat this one (larger, or equal at a lower position).
                for j in 0..m {
                    let kj = keys[j];
                    let mut rank = 0usize;
                    for (l, &kl) in keys[..m].iter().enumerate() {
                        rank += ((kl > kj) | ((kl == kj) & (l < j))) as usize;
                    }
                    og[j * inner + i] = rank < n;
                }
            } else {
                order.clear();
                order.extend(0..m);
                order.sort_by(|&a, &b| F::key(xg[b * inner + i]).cmp(&F::key(xg[a * inner + i])).then(a.cmp(&b)));
                for j in 0..m {
                    og[j * inner + i] = false;
                }
                for &j in &order[..n] {
                    og[j * inner + i] = true;
                }
            }
        }
    }
    Ok(())
}

/// Contiguous groups (`inner == 1`) of a compile-time size `M`: the rank loops unroll fully.
fn nm_task_fixed<T: Score, F: KeyFn<T>, const M: usize>(xs: &[T], os: &mut [bool], n: usize) -> Result<(), CoreError> {
    if xs.iter().any(|v| v.is_nan()) {
        return Err(CoreError::NanInput { arg: "x" });
    }
    for (xg, og) in xs.chunks_exact(M).zip(os.chunks_exact_mut(M)) {
        let keys: [T::Key; M] = std::array::from_fn(|j| F::key(xg[j]));
        for j in 0..M {
            let mut rank = 0usize;
            for l in 0..M {
                rank += ((keys[l] > keys[j]) | ((keys[l] == keys[j]) & (l < j))) as usize;
            }
            og[j] = rank < n;
        }
    }
    Ok(())
}

fn nm_dispatch<T: Score, F: KeyFn<T>>(xs: &[T], os: &mut [bool], inner: usize, n: usize, m: usize) -> Result<(), CoreError> {
    match (inner, m) {
        (1, 4) => nm_task_fixed::<T, F, 4>(xs, os, n),
        (1, 8) => nm_task_fixed::<T, F, 8>(xs, os, n),
        _ => nm_task::<T, F>(xs, os, inner, n, m),
    }
}

pub fn nm_mask<T: Score>(
    x: &[T],
    out: &mut [bool],
    len: usize,
    inner: usize,
    n: usize,
    m: usize,
    order: Order,
) -> Result<(), CoreError> {
    check(x, out, len, inner, n, m)?;
    if x.is_empty() {
        return Ok(());
    }
    let slab = m * inner; // <= len * inner, which `check` bounded by x.len()
    if slab == 0 {
        return Ok(());
    }
    let task = slab * (TASK_LEN / slab).max(1);
    x.par_chunks(task).zip(out.par_chunks_mut(task)).try_for_each(|(xs, os)| {
        with_key_fn!(order, nm_dispatch::<T>(xs, os, inner, n, m))
    })
}
