//! N:M semi-structured masks: in every group of `m` consecutive elements along one axis keep the `n`
//! largest scores, ties to the lower position.
//!
//! The tensor is viewed as `(outer, len, inner)` with groups running along `len`. A group's `m` rows of
//! `inner` elements are contiguous in memory (a "slab"), so slabs are processed independently in
//! parallel with no transpose copy, whichever axis the groups run along.

use rayon::prelude::*;

use super::key::{Order, Score};
use crate::error::SelectError;

/// Groups up to this size are ranked with fixed-size arrays on the stack.
const STACK_GROUP: usize = 32;

fn check<T>(x: &[T], out: &[bool], len: usize, inner: usize, n: usize, m: usize) -> Result<(), SelectError> {
    if m == 0 {
        return Err(SelectError::Invalid { arg: "m", why: "m must be at least 1".into() });
    }
    if n > m {
        return Err(SelectError::Invalid { arg: "n", why: format!("n must be in [0, m={m}], got {n}") });
    }
    if len % m != 0 {
        return Err(SelectError::Invalid { arg: "m", why: format!("m={m} does not divide the group axis of length {len}") });
    }
    if out.len() != x.len() {
        return Err(SelectError::LengthMismatch { arg: "out", expected: x.len(), got: out.len() });
    }
    let row = len * inner;
    if (row == 0 && !x.is_empty()) || (row > 0 && x.len() % row != 0) {
        return Err(SelectError::Invalid { arg: "shape", why: format!("{} elements do not split into rows of {len}x{inner}", x.len()) });
    }
    Ok(())
}

/// Rank of each key inside its group (0 = largest; equal keys ordered by position) and keep rank < n.
#[inline]
fn select_small<K: Ord + Copy>(keys: &[K], n: usize, keep: &mut [bool]) {
    for (j, &kj) in keys.iter().enumerate() {
        let mut rank = 0usize;
        for (l, &kl) in keys.iter().enumerate() {
            rank += (kl > kj || (kl == kj && l < j)) as usize;
        }
        keep[j] = rank < n;
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
) -> Result<(), SelectError> {
    check(x, out, len, inner, n, m)?;
    let slab = m * inner;
    if slab == 0 || x.is_empty() {
        return Ok(());
    }
    let min_slabs = (4096 / slab).max(1);
    x.par_chunks(slab).zip(out.par_chunks_mut(slab)).with_min_len(min_slabs).try_for_each(|(xs, os)| {
        if xs.iter().any(|v| v.is_nan()) {
            return Err(SelectError::NanInput { arg: "x" });
        }
        for i in 0..inner {
            if m <= STACK_GROUP {
                let mut keys = [xs[i].key(order); STACK_GROUP];
                let mut keep = [false; STACK_GROUP];
                for j in 0..m {
                    keys[j] = xs[j * inner + i].key(order);
                }
                select_small(&keys[..m], n, &mut keep[..m]);
                for j in 0..m {
                    os[j * inner + i] = keep[j];
                }
            } else {
                let mut idx: Vec<usize> = (0..m).collect();
                idx.sort_by(|&a, &b| xs[b * inner + i].key(order).cmp(&xs[a * inner + i].key(order)).then(a.cmp(&b)));
                for j in 0..m {
                    os[j * inner + i] = false;
                }
                for &j in &idx[..n] {
                    os[j * inner + i] = true;
                }
            }
        }
        Ok(())
    })
}
