//! Writing selection masks from an exact threshold.
//!
//! Keys above the threshold are kept; of the keys equal to it, exactly `take_equal` are kept, the
//! ones with the lowest global index (source order, then position). When every equal key is kept
//! (the common case) one parallel pass writes `key >= T`; otherwise that pass also counts the equal
//! keys per piece, a prefix sum in piece order says how many each piece must drop, and only those
//! pieces are visited again, from their end.

use rayon::prelude::*;

use super::key::{with_key_fn, KeyFn, Order, Score};
use super::pieces::split_with_out;
use super::radix::Threshold;
use crate::error::CoreError;

pub fn check_outputs<T>(sources: &[&[T]], masks: &[&mut [bool]]) -> Result<(), CoreError> {
    if sources.len() != masks.len() {
        return Err(CoreError::LengthMismatch { arg: "masks", expected: sources.len(), got: masks.len() });
    }
    for (s, m) in sources.iter().zip(masks) {
        if s.len() != m.len() {
            return Err(CoreError::LengthMismatch { arg: "mask", expected: s.len(), got: m.len() });
        }
    }
    Ok(())
}

fn write_at_least<T: Score, F: KeyFn<T>>(pairs: &mut [(&[T], &mut [bool])], threshold: T::Key) {
    pairs.par_iter_mut().for_each(|(s, m)| {
        for (o, &x) in m.iter_mut().zip(s.iter()) {
            *o = F::key(x) >= threshold;
        }
    });
}

fn write_at_least_counting_equal<T: Score, F: KeyFn<T>>(pairs: &mut [(&[T], &mut [bool])], threshold: T::Key) -> Vec<u64> {
    pairs
        .par_iter_mut()
        .map(|(s, m)| {
            // Two simple loops vectorise where one fused loop (byte stores + u32 counts) does not; the
            // piece is still in cache for the second.
            for (o, &x) in m.iter_mut().zip(s.iter()) {
                *o = F::key(x) >= threshold;
            }
            s.iter().map(|&x| (F::key(x) == threshold) as u32).sum::<u32>() as u64
        })
        .collect()
}

fn clear_surplus_equal<T: Score, F: KeyFn<T>>(pairs: &mut [(&[T], &mut [bool])], surplus: &[u64], threshold: T::Key) {
    pairs.par_iter_mut().zip(surplus.par_iter()).filter(|(_, &extra)| extra > 0).for_each(|((s, m), &extra)| {
        let mut left = extra;
        for (o, &x) in m.iter_mut().zip(s.iter()).rev() {
            if F::key(x) == threshold {
                *o = false;
                left -= 1;
                if left == 0 {
                    break;
                }
            }
        }
    });
}

/// Fill `masks` with a top-`k` selection whose threshold is `threshold` (`None`: select nothing).
pub fn write_masks<T: Score>(
    sources: &[&[T]],
    masks: &mut [&mut [bool]],
    threshold: Option<Threshold<T::Key>>,
    k: u64,
    order: Order,
) -> Result<(), CoreError> {
    check_outputs(sources, masks)?;
    let mut pairs = split_with_out(sources, masks);
    let Some(t) = threshold else {
        pairs.par_iter_mut().for_each(|(_, m)| m.fill(false));
        return Ok(());
    };
    let take = t.take_equal(k);
    if take == t.equal {
        with_key_fn!(order, write_at_least::<T>(&mut pairs, t.key));
        return Ok(());
    }
    // Partial tie: keep everything >= T and count the equal keys per piece in one vectorised pass,
    // then drop the surplus equal keys (the highest-index ones) in the few pieces that hold them.
    let equal_counts: Vec<u64> = with_key_fn!(order, write_at_least_counting_equal::<T>(&mut pairs, t.key));
    let mut before = 0u64;
    let surplus: Vec<u64> = equal_counts
        .iter()
        .map(|&c| {
            let keep = take.saturating_sub(before).min(c);
            before += c;
            c - keep
        })
        .collect();
    with_key_fn!(order, clear_surplus_equal::<T>(&mut pairs, &surplus, t.key));
    Ok(())
}
