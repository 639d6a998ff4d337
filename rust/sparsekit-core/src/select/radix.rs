//! Exact k-th largest key over many slices: radix selection on order-preserving keys.
//!
//! Pass 1 builds one histogram of the top 16 key bits over everything (and finds NaNs). The bin that
//! holds the k-th largest key becomes a prefix; elements under that prefix are then either gathered
//! (when few: a small in-memory select finishes) or histogrammed on the next 16 bits. For 16-bit
//! dtypes one pass is exact; float32 usually needs one pass plus a gather pass. Every count is exact
//! integer arithmetic, so the result does not depend on how work was split across threads.

use rayon::prelude::*;

use super::bracket::{bracket_pass, max_candidates, Bracket};
use super::key::{Order, RadixKey, Score};
use super::pieces::{split, total_len, Piece};
use crate::error::CoreError;

const DIGIT_BITS: u32 = 16;

/// Where the k-th largest key sits: its key, how many keys are strictly greater, how many equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threshold<K> {
    pub key: K,
    pub greater: u64,
    pub equal: u64,
}

impl<K> Threshold<K> {
    /// Of the elements equal to `key`, how many a top-`k` selection keeps.
    pub fn take_equal(&self, k: u64) -> u64 {
        k - self.greater
    }
}

#[inline(always)]
fn high(key: u64, shift: u32) -> u64 {
    key.checked_shr(shift).unwrap_or(0)
}

/// The keys below a prefix: `key >> shift == prefix` (shift = key bits means "everything").
#[derive(Clone, Copy)]
struct Prefix {
    value: u64,
    shift: u32,
}

/// Per-worker histogram: u32 counters stay cache-friendly and are flushed into u64 totals before
/// they could overflow.
struct Counts {
    small: Vec<u32>,
    small_total: u64,
    big: Vec<u64>,
    nan: bool,
}

impl Counts {
    fn new(bins: usize) -> Self {
        Counts { small: vec![0; bins], small_total: 0, big: vec![0; bins], nan: false }
    }
    fn flush(&mut self) {
        self.big.iter_mut().zip(self.small.iter_mut()).for_each(|(b, s)| {
            *b += u64::from(*s);
            *s = 0;
        });
        self.small_total = 0;
    }
}

fn histogram<T: Score>(pieces: &[Piece<'_, T>], order: Order, prefix: Prefix, check_nan: bool) -> (Vec<u64>, bool) {
    let digit_bits = DIGIT_BITS.min(prefix.shift);
    let shift = prefix.shift - digit_bits;
    let mask = (1u64 << digit_bits) - 1;
    let bins = 1usize << digit_bits;
    let merged = pieces
        .par_iter()
        .fold(
            || Counts::new(bins),
            |mut counts, piece| {
                if counts.small_total + piece.data.len() as u64 > u64::from(u32::MAX) {
                    counts.flush();
                }
                counts.small_total += piece.data.len() as u64;
                if check_nan {
                    counts.nan |= piece.data.iter().any(|x| x.is_nan());
                }
                let hist = &mut counts.small;
                if prefix.shift >= T::Key::BITS {
                    for &x in piece.data {
                        hist[((x.key(order).to_u64() >> shift) & mask) as usize] += 1;
                    }
                } else {
                    for &x in piece.data {
                        let key = x.key(order).to_u64();
                        if high(key, prefix.shift) == prefix.value {
                            hist[((key >> shift) & mask) as usize] += 1;
                        }
                    }
                }
                counts
            },
        )
        .map(|mut counts| {
            counts.flush();
            counts
        })
        .reduce_with(|mut a, b| {
            a.big.iter_mut().zip(&b.big).for_each(|(x, y)| *x += y);
            a.nan |= b.nan;
            a
        });
    match merged {
        Some(c) => (c.big, c.nan),
        None => (vec![0; bins], false),
    }
}

fn gather<T: Score>(pieces: &[Piece<'_, T>], order: Order, prefix: Prefix) -> Vec<T::Key> {
    let chunks: Vec<Vec<T::Key>> = pieces
        .par_iter()
        .map(|piece| {
            piece
                .data
                .iter()
                .map(|x| x.key(order))
                .filter(|k| high(k.to_u64(), prefix.shift) == prefix.value)
                .collect()
        })
        .collect();
    chunks.concat()
}

fn has_nan<T: Score>(pieces: &[Piece<'_, T>]) -> bool {
    pieces.par_iter().any(|p| p.data.iter().any(|x| x.is_nan()))
}

/// Walk bins from the top; return (bin, count strictly above it) for the `rank`-th largest.
fn find_bin(hist: &[u64], rank: u64) -> (usize, u64) {
    let mut above = 0u64;
    for bin in (0..hist.len()).rev() {
        if above + hist[bin] >= rank {
            return (bin, above);
        }
        above += hist[bin];
    }
    unreachable!("rank exceeds the histogram total")
}

/// Whether to finish a candidate set in memory rather than with another full histogram pass.
fn should_gather<K>(candidates: u64, n: u64) -> bool {
    let bytes = candidates.saturating_mul(std::mem::size_of::<K>() as u64);
    candidates <= (1 << 16) || bytes <= n / 4
}

/// The `rank`-th largest key (1-based) among `candidates`, which hold every key under the prefix.
pub(crate) fn select_in_memory<K: RadixKey>(mut candidates: Vec<K>, rank: u64, greater_before: u64) -> Threshold<K> {
    let idx = (rank - 1) as usize;
    let (_, &mut key, _) = candidates.select_nth_unstable_by(idx, |a, b| b.cmp(a));
    let (mut greater, mut equal) = (0u64, 0u64);
    for &c in &candidates {
        greater += (c > key) as u64;
        equal += (c == key) as u64;
    }
    Threshold { key, greater: greater_before + greater, equal }
}

/// Below this many elements the radix passes are cheap enough on their own.
pub(crate) const BRACKET_MIN_LEN: u64 = 1 << 18;

/// Exact thresholds for several 1-based ranks at once. Large inputs first try one sampled-bracket pass
/// (see `bracket`), which usually also serves neighbouring ranks; otherwise radix passes, which share
/// the first histogram. Errors on NaN and on ranks outside `1..=n`.
pub fn kth_keys<T: Score>(sources: &[&[T]], ranks: &[u64], order: Order) -> Result<Vec<Threshold<T::Key>>, CoreError> {
    kth_keys_with(sources, ranks, order, Strategy::Auto)
}

/// Which passes `kth_keys_with` may use; tests pin `RadixOnly` to cover the fallback on any input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    Auto,
    RadixOnly,
}

pub fn kth_keys_with<T: Score>(
    sources: &[&[T]],
    ranks: &[u64],
    order: Order,
    strategy: Strategy,
) -> Result<Vec<Threshold<T::Key>>, CoreError> {
    let n = total_len(sources);
    for &rank in ranks {
        if rank == 0 || rank > n {
            return Err(CoreError::RankOutOfRange { rank, n });
        }
    }
    let pieces = split(sources);
    let everything = Prefix { value: 0, shift: T::Key::BITS };
    if should_gather::<T::Key>(n, n) {
        if has_nan(&pieces) {
            return Err(CoreError::NanInput { arg: "x" });
        }
        let all = gather(&pieces, order, everything);
        return Ok(ranks.iter().map(|&r| select_in_memory(all.clone(), r, 0)).collect());
    }
    let max_inside = max_candidates::<T::Key>(n);
    let mut bracket: Option<Bracket<T::Key>> = None;
    let mut top_hist: Option<Vec<u64>> = None;
    let top_bits = DIGIT_BITS.min(T::Key::BITS);
    let mut out = Vec::with_capacity(ranks.len());
    for &rank in ranks {
        if let Some(t) = bracket.as_ref().and_then(|b| b.threshold(rank)) {
            out.push(t);
            continue;
        }
        if n >= BRACKET_MIN_LEN && strategy == Strategy::Auto {
            if let Some(b) = bracket_pass(&pieces, n, rank, order, max_inside) {
                if b.nan {
                    return Err(CoreError::NanInput { arg: "x" });
                }
                let found = b.threshold(rank);
                bracket = Some(b);
                if let Some(t) = found {
                    out.push(t);
                    continue;
                }
            }
        }
        if top_hist.is_none() {
            let (hist, nan) = histogram(&pieces, order, everything, true);
            if nan {
                return Err(CoreError::NanInput { arg: "x" });
            }
            top_hist = Some(hist);
        }
        let top_hist = top_hist.as_ref().expect("computed above");
        let (bin, above) = find_bin(top_hist, rank);
        let mut prefix = Prefix { value: bin as u64, shift: T::Key::BITS - top_bits };
        let (mut rank_in, mut greater, mut count) = (rank - above, above, top_hist[bin]);
        let threshold = loop {
            if prefix.shift == 0 {
                break Threshold { key: T::Key::from_u64(prefix.value), greater, equal: count };
            }
            if should_gather::<T::Key>(count, n) {
                break select_in_memory(gather(&pieces, order, prefix), rank_in, greater);
            }
            let (hist, _) = histogram(&pieces, order, prefix, false);
            let (bin, above) = find_bin(&hist, rank_in);
            let digit_bits = DIGIT_BITS.min(prefix.shift);
            prefix = Prefix { value: (prefix.value << digit_bits) | bin as u64, shift: prefix.shift - digit_bits };
            rank_in -= above;
            greater += above;
            count = hist[bin];
        };
        out.push(threshold);
    }
    Ok(out)
}

/// Exact threshold of a top-`k` selection; `None` when `k == 0`.
pub fn topk_threshold<T: Score>(sources: &[&[T]], k: u64, order: Order) -> Result<Option<Threshold<T::Key>>, CoreError> {
    topk_threshold_with(sources, k, order, Strategy::Auto)
}

/// `topk_threshold` restricted to the passes `strategy` allows.
pub fn topk_threshold_with<T: Score>(
    sources: &[&[T]],
    k: u64,
    order: Order,
    strategy: Strategy,
) -> Result<Option<Threshold<T::Key>>, CoreError> {
    let n = total_len(sources);
    if k > n {
        return Err(CoreError::KOutOfRange { k, n });
    }
    if k == 0 {
        // Still refuse NaN: the answer must not depend on k.
        if has_nan(&split(sources)) {
            return Err(CoreError::NanInput { arg: "x" });
        }
        return Ok(None);
    }
    Ok(Some(kth_keys_with(sources, &[k], order, strategy)?[0]))
}
