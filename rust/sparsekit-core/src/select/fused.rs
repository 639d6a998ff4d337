//! Top-k masks of large inputs in one pass over the data.
//!
//! With the sampled bracket `[lo, hi]` known before the pass (see `bracket`), the mask can be written
//! as `key > hi` while the pass counts the keys above the bracket and gathers the few inside it
//! together with their positions. Once the exact threshold is found among those, only the gathered
//! positions need fixing. When the bracket misses (or holds too many keys) the caller takes the
//! radix path, which rewrites every mask: the bracket pass would fail the same way (same sample,
//! same bounds, same `max_candidates`), so it is not tried again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rayon::prelude::*;

use super::bracket::{bracket_bounds, count_block, max_candidates};
use super::key::{with_key_fn, KeyFn, Order, Score};
use super::pieces::{split, split_with_out, total_len, PIECE_LEN};
use super::radix::{select_in_memory, BRACKET_MIN_LEN};
use crate::error::CoreError;

const BLOCK: usize = 64;

/// Position of a gathered key inside its piece (pieces hold at most 2**16 elements); the key itself
/// is read again from the input when needed, which keeps the scratch memory at 2 bytes a candidate.
type Position = u16;
const _: () = assert!(PIECE_LEN <= 1 << 16);

/// Write `key > hi` over one piece; return the count above `hi`, the positions of the in-bracket keys
/// in index order, and whether a NaN was seen.
fn pass_piece<T: Score, F: KeyFn<T>>(src: &[T], out: &mut [bool], lo: T::Key, hi: T::Key) -> (u64, Vec<Position>, bool) {
    debug_assert!(src.len() <= PIECE_LEN);
    let (mut above, mut nan) = (0u64, false);
    let mut candidates = Vec::new();
    for (b, (xs, os)) in src.chunks(BLOCK).zip(out.chunks_mut(BLOCK)).enumerate() {
        // Separate simple loops vectorise; the block is in L1 for the second one.
        for (o, &x) in os.iter_mut().zip(xs) {
            *o = F::key(x) > hi;
        }
        let (a, hits, n) = count_block::<T, F>(xs, lo, hi);
        above += u64::from(a);
        nan |= n;
        if hits > 0 {
            let base = b * BLOCK;
            let mut left = hits;
            for (j, &x) in xs.iter().enumerate() {
                let key = F::key(x);
                if key >= lo && key <= hi {
                    candidates.push((base + j) as Position);
                    left -= 1;
                    if left == 0 {
                        break;
                    }
                }
            }
        }
    }
    (above, candidates, nan)
}

fn fused_with<T: Score, F: KeyFn<T>>(
    pairs: &mut [(&[T], &mut [bool])],
    k: u64,
    lo: T::Key,
    hi: T::Key,
    max_inside: u64,
) -> Result<bool, CoreError> {
    let gathered = AtomicU64::new(0);
    let overflow = AtomicBool::new(false);
    let parts: Vec<(u64, Vec<Position>, bool)> = pairs
        .par_iter_mut()
        .map(|(src, out)| {
            if overflow.load(Ordering::Relaxed) {
                return (0, Vec::new(), false);
            }
            let part = pass_piece::<T, F>(src, out, lo, hi);
            if gathered.fetch_add(part.1.len() as u64, Ordering::Relaxed) + part.1.len() as u64 > max_inside {
                overflow.store(true, Ordering::Relaxed);
            }
            part
        })
        .collect();
    if overflow.load(Ordering::Relaxed) {
        return Ok(false);
    }
    if parts.iter().any(|p| p.2) {
        return Err(CoreError::NanInput { arg: "x" });
    }
    let above: u64 = parts.iter().map(|p| p.0).sum();
    let inside: u64 = parts.iter().map(|p| p.1.len() as u64).sum();
    if k <= above || k > above + inside {
        return Ok(false);
    }
    let keys: Vec<T::Key> = pairs
        .iter()
        .zip(&parts)
        .flat_map(|((src, _), part)| part.1.iter().map(|&i| F::key(src[i as usize])))
        .collect();
    let t = select_in_memory(keys, k - above, above);
    // Of the keys equal to the threshold keep the first `take` in global order: pieces in order, and
    // candidates in index order within a piece.
    let mut take_left = t.take_equal(k);
    let quotas: Vec<u64> = pairs
        .iter()
        .zip(&parts)
        .map(|((src, _), part)| {
            let equal = part.1.iter().filter(|&&i| F::key(src[i as usize]) == t.key).count() as u64;
            let quota = take_left.min(equal);
            take_left -= quota;
            quota
        })
        .collect();
    pairs.par_iter_mut().zip(parts.par_iter()).zip(quotas.par_iter()).for_each(|(((src, out), part), &quota)| {
        let mut left = quota;
        for &i in &part.1 {
            let key = F::key(src[i as usize]);
            if key > t.key || (key == t.key && left > 0) {
                left -= (key == t.key) as u64;
                out[i as usize] = true;
            }
        }
    });
    Ok(true)
}

/// Try the one-pass path; `Ok(false)` means "not taken" and the masks must be rewritten by the caller.
pub fn topk_masks_one_pass<T: Score>(
    sources: &[&[T]],
    masks: &mut [&mut [bool]],
    k: u64,
    order: Order,
) -> Result<bool, CoreError> {
    let n = total_len(sources);
    if n < BRACKET_MIN_LEN || k == 0 || k > n {
        return Ok(false);
    }
    let Some((lo, hi)) = bracket_bounds(&split(sources), n, k, order) else {
        return Ok(false);
    };
    let max_inside = max_candidates::<T::Key>(n);
    let mut pairs = split_with_out(sources, masks);
    with_key_fn!(order, fused_with::<T>(&mut pairs, k, lo, hi, max_inside))
}
