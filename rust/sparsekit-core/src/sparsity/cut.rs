//! Exact top-k among the *eligible* elements of many slices, without materialising a score tensor.
//!
//! A mask update asks for "the `k` largest |w| among the active weights" and then "the `k'` largest
//! |g| among the connections not kept". Instead of writing `where(eligible, score, -inf)` into a new
//! buffer, every pass here walks the pieces and asks a [`Scan`] for the eligible keys in index order.
//! The result is a per-piece [`Cut`]: keep keys above `key`, and of the keys equal to it the first
//! `quota` in global order (pieces in order, then index). Counts are exact integers, so the answer
//! does not depend on the thread count.

use rayon::prelude::*;

use crate::error::CoreError;
use crate::select::key::RadixKey;
use crate::select::radix::select_in_memory;

const DIGIT_BITS: u32 = 16;
/// A bin with at most this many eligible keys is finished in memory instead of another histogram.
const GATHER_MAX: u64 = 1 << 21;

/// Which elements of a piece a cut keeps. Evaluate with [`CutState`] in index order over eligible elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut<K> {
    pub key: K,
    /// Keys equal to `key` kept in this piece (u64::MAX: all of them).
    pub quota: u64,
}

impl<K: RadixKey> Cut<K> {
    /// Keeps nothing (k = 0).
    pub fn none() -> Self {
        Cut { key: K::MAX, quota: 0 }
    }
    /// The cut of one piece that holds `equal` keys equal to `key` and takes `quota` of them. A piece
    /// that takes all or none of its tied keys gets a cut without a tie quota ("keys >= key", or
    /// "keys > key" written as ">= key + 1"), which the writing pass applies branch-free; only the
    /// one piece where the tie splits keeps its quota.
    pub fn normalized(key: K, quota: u64, equal: u64) -> Self {
        if quota == equal {
            Cut { key, quota: u64::MAX }
        } else if quota == 0 && key < K::MAX {
            Cut { key: K::from_u64(key.to_u64() + 1), quota: u64::MAX }
        } else {
            Cut { key, quota }
        }
    }
    pub fn state(&self) -> CutState<K> {
        CutState { key: self.key, left: self.quota }
    }
}

/// A cut being applied along one piece (consumes the tie quota).
pub struct CutState<K> {
    key: K,
    left: u64,
}

impl<K: RadixKey> CutState<K> {
    /// Whether the next eligible element, of key `key`, is taken.
    #[inline(always)]
    pub fn take(&mut self, key: K) -> bool {
        if key > self.key {
            return true;
        }
        if key == self.key && self.left > 0 {
            self.left -= 1;
            return true;
        }
        false
    }
}

/// The eligible keys of a piece, in index order.
pub trait Scan<K>: Sync {
    /// Call `f(key)` for each eligible element of piece `piece`; return whether a NaN score was seen
    /// among them.
    fn scan<F: FnMut(K)>(&self, piece: usize, f: F) -> bool;
}

#[inline(always)]
fn high(key: u64, shift: u32) -> u64 {
    key.checked_shr(shift).unwrap_or(0)
}

/// Histogram of the digit below `shift_hi` (keys whose bits above it equal `prefix`), over `pieces`.
fn histogram<K: RadixKey, S: Scan<K>>(scan: &S, pieces: &[usize], prefix: u64, shift_hi: u32) -> (Vec<u64>, bool) {
    let bits = DIGIT_BITS.min(shift_hi);
    let shift = shift_hi - bits;
    let digit = (1u64 << bits) - 1;
    let bins = 1usize << bits;
    let everything = shift_hi >= K::BITS;
    // One histogram per run of pieces (a few runs per thread), not per rayon split: a 64K-bin
    // histogram costs as much to zero and merge as a few pieces cost to count.
    let runs = (rayon::current_num_threads() * 4).max(1);
    let per_run = pieces.len().div_ceil(runs).max(1);
    pieces
        .par_chunks(per_run)
        .map(|run| {
            let mut hist = vec![0u64; bins];
            let mut nan = false;
            for &p in run {
                nan |= scan.scan(p, |key: K| {
                    let key = key.to_u64();
                    if everything || high(key, shift_hi) == prefix {
                        hist[((key >> shift) & digit) as usize] += 1;
                    }
                });
            }
            (hist, nan)
        })
        .reduce_with(|(mut a, na), (b, nb)| {
            a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
            (a, na | nb)
        })
        .unwrap_or_else(|| (vec![0u64; bins], false))
}

fn gather<K: RadixKey, S: Scan<K>>(scan: &S, pieces: &[usize], prefix: u64, shift: u32) -> Vec<K> {
    let parts: Vec<Vec<K>> = pieces
        .par_iter()
        .map(|&p| {
            let mut out = Vec::new();
            scan.scan(p, |key: K| {
                if high(key.to_u64(), shift) == prefix {
                    out.push(key);
                }
            });
            out
        })
        .collect();
    parts.concat()
}

/// The cut of an exact top-`k` among the eligible keys of `pieces` (one cut per piece, in order).
/// Errors when a NaN score is eligible (`arg` names the scores) or when fewer than `k` are eligible.
pub fn topk_cut<K: RadixKey, S: Scan<K>>(scan: &S, pieces: &[usize], k: u64, arg: &'static str) -> Result<Vec<Cut<K>>, CoreError> {
    if k > 0 {
        if let Some(found) = bracketed(scan, pieces, k) {
            let (above, inside, nan, eligible) = found;
            if nan {
                return Err(CoreError::NanInput { arg });
            }
            if k > eligible {
                return Err(CoreError::Invalid { arg: "counts", why: format!("{k} to select but only {eligible} eligible") });
            }
            if let Some(inside) = inside.filter(|v| above < k && k <= above + v.len() as u64) {
                let t = select_in_memory(inside, k - above, above);
                return Ok(cuts_from(scan, pieces, k, t.key, t.greater, t.equal));
            }
        }
    }
    let (mut hist, nan) = histogram(scan, pieces, 0, K::BITS);
    if nan {
        return Err(CoreError::NanInput { arg });
    }
    let total: u64 = hist.iter().sum();
    if k > total {
        return Err(CoreError::Invalid { arg: "counts", why: format!("{k} to select but only {total} eligible") });
    }
    if k == 0 {
        return Ok(vec![Cut::none(); pieces.len()]);
    }
    let (mut prefix, mut shift, mut rank, mut above_all) = (0u64, K::BITS, k, 0u64);
    let (key, equal, greater) = loop {
        let bits = DIGIT_BITS.min(shift);
        let mut above = 0u64;
        let mut bin = hist.len();
        while bin > 0 {
            bin -= 1;
            if above + hist[bin] >= rank {
                break;
            }
            above += hist[bin];
        }
        let count = hist[bin];
        prefix = (prefix << bits) | bin as u64;
        shift -= bits;
        rank -= above;
        above_all += above;
        if shift == 0 {
            break (K::from_u64(prefix), count, above_all);
        }
        if count <= GATHER_MAX {
            let t = select_in_memory(gather(scan, pieces, prefix, shift), rank, above_all);
            break (t.key, t.equal, t.greater);
        }
        hist = histogram(scan, pieces, prefix, shift).0;
    };
    Ok(cuts_from(scan, pieces, k, key, greater, equal))
}

/// Per-piece cuts from the exact threshold (`greater` keys above it, `equal` at it).
fn cuts_from<K: RadixKey, S: Scan<K>>(scan: &S, pieces: &[usize], k: u64, key: K, greater: u64, equal: u64) -> Vec<Cut<K>> {
    let take = k - greater;
    if take == equal {
        return vec![Cut { key, quota: u64::MAX }; pieces.len()];
    }
    // Partial tie: the first `take` equal keys in global order, so count them per piece.
    let equal_per_piece: Vec<u64> = pieces
        .par_iter()
        .map(|&p| {
            let mut c = 0u64;
            scan.scan(p, |x: K| c += (x == key) as u64);
            c
        })
        .collect();
    let mut left = take;
    equal_per_piece
        .iter()
        .map(|&c| {
            let q = left.min(c);
            left -= q;
            Cut::normalized(key, q, c)
        })
        .collect()
}

/// Below this many elements the histogram passes are cheap enough on their own.
const BRACKET_MIN_PIECES: usize = 4;
/// Pieces sampled (whole, evenly spaced, so the same input always takes the same path).
const SAMPLE_PIECES: usize = 32;
const SIGMAS: f64 = 4.5;

/// The fast path: bracket the k-th key with a deterministic sample of whole pieces, then one pass
/// counts the eligible keys above the bracket and gathers those inside it. Returns (above, inside,
/// nan, eligible); `inside` is `None` when it grew too large. The sample decides only how fast, never
/// what: the caller checks that the bracket holds rank `k` and otherwise takes the histogram path.
fn bracketed<K: RadixKey, S: Scan<K>>(scan: &S, pieces: &[usize], k: u64) -> Option<(u64, Option<Vec<K>>, bool, u64)> {
    if pieces.len() < BRACKET_MIN_PIECES {
        return None;
    }
    let stride = pieces.len().div_ceil(SAMPLE_PIECES);
    let sampled: Vec<usize> = pieces.iter().step_by(stride).copied().collect();
    let mut sample: Vec<K> = sampled
        .par_iter()
        .map(|&p| {
            let mut out = Vec::new();
            scan.scan(p, |key: K| out.push(key));
            out
        })
        .collect::<Vec<_>>()
        .concat();
    let s = sample.len();
    if s < 1024 {
        return None;
    }
    // Eligible total estimated from the sampled share of pieces (all but the last piece of a layer are full).
    let est_total = (s as f64) * (pieces.len() as f64 / sampled.len() as f64);
    let p = (k as f64 / est_total).min(1.0);
    let center = p * s as f64;
    let half = SIGMAS * (s as f64 * p * (1.0 - p)).sqrt() + 2.0 + 0.02 * s as f64 * p;
    let mut nth = |i: f64| -> Option<K> {
        if i < 0.0 || i >= s as f64 {
            return None;
        }
        let (_, &mut key, _) = sample.select_nth_unstable_by(i as usize, |a, b| b.cmp(a));
        Some(key)
    };
    let hi = nth((center - half).floor()).unwrap_or(K::MAX);
    let lo = nth((center + half).ceil()).unwrap_or(K::MIN);
    let max_inside = (GATHER_MAX * 4).max((4.0 * half * est_total / s as f64) as u64);
    let parts: Vec<(u64, u64, Vec<K>, bool)> = pieces
        .par_iter()
        .map(|&p| {
            let (mut above, mut all, mut inside) = (0u64, 0u64, Vec::new());
            let nan = scan.scan(p, |key: K| {
                all += 1;
                above += (key > hi) as u64;
                if key >= lo && key <= hi {
                    inside.push(key);
                }
            });
            (above, all, inside, nan)
        })
        .collect();
    let above = parts.iter().map(|x| x.0).sum();
    let eligible = parts.iter().map(|x| x.1).sum();
    let nan = parts.iter().any(|x| x.3);
    let n_inside: u64 = parts.iter().map(|x| x.2.len() as u64).sum();
    let inside = (n_inside <= max_inside).then(|| parts.into_iter().flat_map(|x| x.2).collect());
    Some((above, inside, nan, eligible))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Masked<'a> {
        keys: &'a [Vec<u32>],
        elig: &'a [Vec<bool>],
    }

    impl Scan<u32> for Masked<'_> {
        fn scan<F: FnMut(u32)>(&self, piece: usize, mut f: F) -> bool {
            for (&k, &e) in self.keys[piece].iter().zip(&self.elig[piece]) {
                if e {
                    f(k);
                }
            }
            false
        }
    }

    fn reference(keys: &[Vec<u32>], elig: &[Vec<bool>], k: usize) -> Vec<Vec<bool>> {
        let mut all: Vec<(u32, usize, usize)> = Vec::new();
        for (p, (ks, es)) in keys.iter().zip(elig).enumerate() {
            for (i, (&key, &e)) in ks.iter().zip(es).enumerate() {
                if e {
                    all.push((key, p, i));
                }
            }
        }
        all.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let mut out: Vec<Vec<bool>> = keys.iter().map(|k| vec![false; k.len()]).collect();
        for &(_, p, i) in &all[..k] {
            out[p][i] = true;
        }
        out
    }

    fn apply(keys: &[Vec<u32>], elig: &[Vec<bool>], cuts: &[Cut<u32>]) -> Vec<Vec<bool>> {
        keys.iter()
            .zip(elig)
            .zip(cuts)
            .map(|((ks, es), c)| {
                let mut st = c.state();
                ks.iter().zip(es).map(|(&k, &e)| e && st.take(k)).collect()
            })
            .collect()
    }

    #[test]
    fn matches_a_stable_sort_with_ties_and_ineligible() {
        let mut seed = 12345u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as u32
        };
        for case in 0..40 {
            let pieces = 1 + case % 5;
            let spread = [3u32, 50, 1 << 20, u32::MAX][case % 4];
            let keys: Vec<Vec<u32>> = (0..pieces).map(|_| (0..(next() % 300) as usize).map(|_| next() % spread).collect()).collect();
            let elig: Vec<Vec<bool>> = keys.iter().map(|k| k.iter().map(|_| next() % 3 != 0).collect()).collect();
            let n: usize = elig.iter().map(|e| e.iter().filter(|&&x| x).count()).sum();
            let scan = Masked { keys: &keys, elig: &elig };
            let ids: Vec<usize> = (0..pieces).collect();
            for k in [0, 1, n / 3, n / 2, n] {
                let cuts = topk_cut(&scan, &ids, k as u64, "x").unwrap();
                assert_eq!(apply(&keys, &elig, &cuts), reference(&keys, &elig, k), "case {case} k {k}");
            }
            assert!(topk_cut(&scan, &ids, n as u64 + 1, "x").is_err());
        }
    }

    #[test]
    fn large_bins_take_a_second_histogram() {
        // 3M keys in one top-16-bit bin: forces the second digit.
        let keys: Vec<Vec<u32>> = (0..48).map(|p| (0..65536u32).map(|i| 0x4000_0000 | ((i * 7 + p) & 0xFFFF)).collect()).collect();
        let elig: Vec<Vec<bool>> = keys.iter().map(|k| k.iter().enumerate().map(|(i, _)| i % 5 != 0).collect()).collect();
        let scan = Masked { keys: &keys, elig: &elig };
        let ids: Vec<usize> = (0..keys.len()).collect();
        let k = 1_000_003u64;
        let cuts = topk_cut(&scan, &ids, k, "x").unwrap();
        assert_eq!(apply(&keys, &elig, &cuts), reference(&keys, &elig, k as usize));
    }
}
