//! The fast path of exact selection: bracket the k-th largest key with a deterministic sample, then
//! one pass counts the keys above the bracket and gathers the few inside it.
//!
//! The sample only decides how fast the answer comes, never what it is: if the k-th key falls outside
//! the bracket, or the bracket holds too many keys (heavy ties), the caller falls back to radix
//! passes. The sample is taken at fixed positions, so the same input always takes the same path.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rayon::prelude::*;

use super::key::{with_key_fn, KeyFn, Order, RadixKey, Score};
use super::pieces::Piece;
use super::radix::{select_in_memory, Threshold};

/// Sample runs: contiguous (cache-line friendly) runs spread evenly over the global index space.
const SAMPLE_RUNS: usize = 4096;
const RUN_LEN: usize = 64;
/// Half-width of the bracket in standard deviations of the sampled rank.
const SIGMAS: f64 = 4.5;

/// Keys inside `[lo, hi]` and the count of keys above `hi`, from one pass that also looked for NaN.
pub struct Bracket<K> {
    pub above: u64,
    pub inside: Vec<K>,
    pub nan: bool,
}

impl<K: RadixKey> Bracket<K> {
    /// The threshold of the `rank`-th largest key, if the bracket holds it.
    pub fn threshold(&self, rank: u64) -> Option<Threshold<K>> {
        if rank <= self.above || rank > self.above + self.inside.len() as u64 {
            return None;
        }
        Some(select_in_memory(self.inside.clone(), rank - self.above, self.above))
    }
}

fn sample_keys<T: Score>(pieces: &[Piece<'_, T>], n: u64, order: Order) -> Vec<T::Key> {
    // Positions are global indices; walk pieces once in order.
    let step = n / SAMPLE_RUNS as u64;
    let mut keys = Vec::with_capacity(SAMPLE_RUNS * RUN_LEN);
    let mut piece_start = 0u64;
    let mut pieces = pieces.iter().peekable();
    for run in 0..SAMPLE_RUNS as u64 {
        let pos = run * step;
        while let Some(p) = pieces.peek() {
            if pos < piece_start + p.data.len() as u64 {
                break;
            }
            piece_start += p.data.len() as u64;
            pieces.next();
        }
        let Some(p) = pieces.peek() else { break };
        let offset = (pos - piece_start) as usize;
        let end = (offset + RUN_LEN).min(p.data.len());
        keys.extend(p.data[offset..end].iter().map(|x| x.key(order)));
    }
    keys
}

/// Over one small block: keys above `hi`, keys inside `[lo, hi]`, and whether a NaN was seen.
/// Branch-free, so the compiler vectorises it.
#[inline(always)]
pub(crate) fn count_block<T: Score, F: KeyFn<T>>(block: &[T], lo: T::Key, hi: T::Key) -> (u32, u32, bool) {
    let (mut above, mut inside, mut nan) = (0u32, 0u32, false);
    for &x in block {
        let key = F::key(x);
        above += (key > hi) as u32;
        inside += ((key >= lo) & (key <= hi)) as u32;
        nan |= x.is_nan();
    }
    (above, inside, nan)
}

/// Keys of one piece inside `[lo, hi]`, the count above `hi`, and whether a NaN was seen.
fn scan_piece<T: Score, F: KeyFn<T>>(data: &[T], lo: T::Key, hi: T::Key, inside: &mut Vec<T::Key>) -> (u64, bool) {
    const BLOCK: usize = 64;
    let (mut above, mut nan) = (0u64, false);
    for block in data.chunks(BLOCK) {
        // Branch-free counting the compiler vectorises; a block with candidates is compacted again
        // while it is still in L1.
        let (a, hits, n) = count_block::<T, F>(block, lo, hi);
        above += u64::from(a);
        nan |= n;
        if hits > 0 {
            // Branch-free compaction (store every key, advance only past the ones in range), stopping
            // once all `hits` are found: on average half a block.
            let mut buf = [T::Key::MIN; BLOCK];
            let mut len = 0usize;
            for &x in block {
                let key = F::key(x);
                buf[len] = key;
                len += ((key >= lo) & (key <= hi)) as usize;
                if len == hits as usize {
                    break;
                }
            }
            inside.extend_from_slice(&buf[..len]);
        }
    }
    (above, nan)
}

fn scan_all<T: Score, F: KeyFn<T>>(
    pieces: &[Piece<'_, T>],
    lo: T::Key,
    hi: T::Key,
    max_inside: u64,
) -> Option<Bracket<T::Key>> {
    let inside_total = AtomicU64::new(0);
    let overflow = AtomicBool::new(false);
    let parts: Vec<(u64, Vec<T::Key>, bool)> = pieces
        .par_iter()
        .map(|piece| {
            let mut inside = Vec::new();
            if overflow.load(Ordering::Relaxed) {
                return (0, inside, false);
            }
            let (above, nan) = scan_piece::<T, F>(piece.data, lo, hi, &mut inside);
            let total = inside_total.fetch_add(inside.len() as u64, Ordering::Relaxed) + inside.len() as u64;
            if total > max_inside {
                overflow.store(true, Ordering::Relaxed);
            }
            (above, inside, nan)
        })
        .collect();
    if overflow.load(Ordering::Relaxed) {
        return None;
    }
    let above = parts.iter().map(|(a, _, _)| a).sum();
    let nan = parts.iter().any(|(_, _, nan)| *nan);
    let mut inside = Vec::with_capacity(inside_total.load(Ordering::Relaxed) as usize);
    for (_, part, _) in parts {
        inside.extend(part);
    }
    Some(Bracket { above, inside, nan })
}

/// How many in-bracket keys a pass may gather before it gives up: their scratch (a key and a 2-byte
/// position each, as the one-pass path stores them) stays within a quarter of the mask bytes. The
/// bracket pass and the one-pass path share this bound, so when one gives up the other would too.
pub fn max_candidates<K>(n: u64) -> u64 {
    (n / 4) / (std::mem::size_of::<K>() + std::mem::size_of::<u16>()) as u64
}

/// The sampled bracket `[lo, hi]` around the `rank`-th largest key; `None` when the input is too small
/// for a useful sample. An end beyond the sample leaves that side open (`MIN` / `MAX`).
pub fn bracket_bounds<T: Score>(pieces: &[Piece<'_, T>], n: u64, rank: u64, order: Order) -> Option<(T::Key, T::Key)> {
    let mut sample = sample_keys(pieces, n, order);
    let s = sample.len();
    if s < SAMPLE_RUNS * RUN_LEN / 2 {
        return None;
    }
    let p = rank as f64 / n as f64;
    let center = p * s as f64;
    let half = SIGMAS * (s as f64 * p * (1.0 - p)).sqrt() + 2.0;
    let (hi_idx, lo_idx) = ((center - half).floor(), (center + half).ceil());
    // Positions in descending order.
    let mut nth_largest = |i: f64| -> Option<T::Key> {
        if i < 0.0 || i >= s as f64 {
            return None;
        }
        let (_, &mut key, _) = sample.select_nth_unstable_by(i as usize, |a, b| b.cmp(a));
        Some(key)
    };
    let hi = nth_largest(hi_idx).unwrap_or(T::Key::MAX);
    let lo = nth_largest(lo_idx).unwrap_or(T::Key::MIN);
    Some((lo, hi))
}

/// Sample, bracket `rank`, and run the counting/gathering pass. `None` when the sample is too small
/// to help or the bracket would hold more than `max_inside` keys.
pub fn bracket_pass<T: Score>(
    pieces: &[Piece<'_, T>],
    n: u64,
    rank: u64,
    order: Order,
    max_inside: u64,
) -> Option<Bracket<T::Key>> {
    let (lo, hi) = bracket_bounds(pieces, n, rank, order)?;
    with_key_fn!(order, scan_all::<T>(pieces, lo, hi, max_inside))
}
