//! The fast path of [`update`](super::update): both selections (keep by |w| among the active, grow by
//! |grow score| among the rest) from ONE read of the weights, masks and grow scores.
//!
//! A strided sample brackets both thresholds before the pass: `[klo, khi]` around the keep threshold,
//! `[glo, ghi]` around the grow threshold (the grow sample's eligibility uses the sample's own keep
//! estimate). The pass then sorts every connection into one of three cases:
//! - active with |w| above `khi`: kept for sure, so not eligible to grow;
//! - inactive, or active with |w| below `klo`: not kept for sure, so eligible to grow; its grow key is
//!   counted when above `ghi` and gathered when inside `[glo, ghi]`;
//! - active with |w| inside `[klo, khi]`: undecided; its |w| key and grow key are gathered (a few
//!   percent of the active).
//!
//! The exact keep threshold comes from the gathered |w| keys (ties: the first ones in global order,
//! counted per piece from the gathered keys, which are in index order). The undecided connections are
//! then settled in index order, and those not kept join the grow counts. The grow threshold comes the
//! same way. Counts are exact integers and the sample sits at fixed positions, so the answer (and the
//! path taken) is the same on any thread count. The brackets only decide how fast: when one misses,
//! holds too many keys, or an input holds NaN, [`cuts`] returns `None` and the caller runs the general
//! passes of [`super::cut`], which give the same cuts or the error.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;

use super::cut::Cut;
use super::simd;
use super::{Counts, View};
use crate::select::key::{RadixKey, Score};
use crate::select::radix::select_in_memory;

/// Elements per sample run (cache-line friendly), and the sample size per selection group.
const RUN: usize = 64;
const SAMPLE_MIN: u64 = 1 << 14;
const SAMPLE_MAX: u64 = 1 << 18;
/// A group this small may gather all its keys (an open-ended bracket is still served).
const SMALL_GROUP: u64 = 1 << 16;
/// Bracket half-width: this many binomial standard deviations of the sampled rank, plus a relative
/// margin for samples of structured (not independent) data.
const SIGMAS: f64 = 4.5;
const MARGIN: f64 = 0.01;

/// One selection: all layers together (global) or one layer.
struct Group {
    spans: Range<usize>,
    keep: u64,
    grow: u64,
    /// Whether grow scores are ranked in this group (their NaN checked) at all.
    grows: bool,
}

/// A bracket `[lo, hi]`; `gather` is false when its low end is open (the k-th key may be anywhere
/// below `hi`): then the keys below `hi` are not gathered and only the trivial counts (none, all)
/// can be served.
#[derive(Clone, Copy, Debug)]
pub(super) struct Bracket<K> {
    pub lo: K,
    pub hi: K,
    pub gather: bool,
}

impl<K: RadixKey> Bracket<K> {
    /// Nothing is ever inside or above it (abs keys never reach `MAX`: the sign bit is clear).
    fn empty() -> Self {
        Bracket { lo: K::MAX, hi: K::MAX, gather: false }
    }
    /// Everything is inside it, nothing gathered.
    fn open() -> Self {
        Bracket { lo: K::MIN, hi: K::MAX, gather: false }
    }
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Bounds<K, GK> {
    pub keep: Bracket<K>,
    pub grow: Bracket<GK>,
}

/// What the pass found in one piece.
pub(super) struct Part<K, GK> {
    pub active: u64,
    pub keep_above: u64,
    /// Undecided connections (active, |w| key inside the keep bracket): |w| keys and grow keys, in
    /// index order.
    pub open_w: Vec<K>,
    pub open_g: Vec<GK>,
    pub open_hits: u64,
    /// Connections eligible to grow for sure, their grow keys above the grow bracket, and those inside.
    pub eligible: u64,
    pub grow_above: u64,
    pub grow_in: Vec<GK>,
    pub grow_hits: u64,
    /// Keys this piece was to gather (counted even when the cap stopped it).
    pub gathered: u64,
    /// A NaN weight among the active or grow score among the eligible (the general passes name it).
    pub nan: bool,
}

impl<K, GK> Part<K, GK> {
    fn new() -> Self {
        Part {
            active: 0,
            keep_above: 0,
            open_w: Vec::new(),
            open_g: Vec::new(),
            open_hits: 0,
            eligible: 0,
            grow_above: 0,
            grow_in: Vec::new(),
            grow_hits: 0,
            gathered: 0,
            nan: false,
        }
    }
}

/// The pass over elements `from..` of one piece, generic code (`g` is `None` when the piece's group
/// grows nothing). Branch-free counts; the gathering branch is taken for a few percent of elements.
fn pass_generic<T: Score, G: Score>(
    w: &[T],
    m: &[bool],
    g: Option<&[G]>,
    b: &Bounds<T::Key, G::Key>,
    (take_open, take_grow): (bool, bool),
    out: &mut Part<T::Key, G::Key>,
    from: usize,
) {
    let (mut act, mut k_above, mut open_n, mut elig, mut g_above, mut g_in_n, mut nan) = (0u64, 0u64, 0u64, 0u64, 0u64, 0u64, false);
    for i in from..w.len() {
        let (on, wk) = (m[i], w[i].abs_key());
        let open = on & (wk >= b.keep.lo) & (wk <= b.keep.hi);
        act += on as u64;
        k_above += (on & (wk > b.keep.hi)) as u64;
        open_n += open as u64;
        nan |= on & w[i].is_nan();
        let gk = match g {
            Some(g) => {
                let gk = g[i].abs_key();
                let e = !on | (wk < b.keep.lo);
                let gi = e & (gk >= b.grow.lo) & (gk <= b.grow.hi);
                elig += e as u64;
                g_above += (e & (gk > b.grow.hi)) as u64;
                g_in_n += gi as u64;
                nan |= e & g[i].is_nan();
                if gi & take_grow {
                    out.grow_in.push(gk);
                }
                gk
            }
            None => G::Key::MIN,
        };
        if open & take_open {
            out.open_w.push(wk);
            out.open_g.push(gk);
        }
    }
    out.active += act;
    out.keep_above += k_above;
    out.open_hits += open_n;
    out.eligible += elig;
    out.grow_above += g_above;
    out.grow_hits += g_in_n;
    out.nan |= nan;
}

/// `x` as `&[U]` when `T` is `U` (selects the float32 builds at run time).
pub(super) fn same_type<T: 'static, U: 'static>(x: &[T]) -> Option<&[U]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<U>())
        // SAFETY: T and U are the same type.
        .then(|| unsafe { std::slice::from_raw_parts(x.as_ptr() as *const U, x.len()) })
}

/// `x` as `&mut [U]` when `T` is `U`.
pub(super) fn same_type_mut<T: 'static, U: 'static>(x: &mut [T]) -> Option<&mut [U]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<U>())
        // SAFETY: T and U are the same type; the borrow is moved into the result.
        .then(|| unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut U, x.len()) })
}

/// The pass over one piece: the AVX-512 float32 build where it applies, generic code otherwise.
fn pass_piece<T: Score, G: Score>(
    w: &[T],
    m: &[bool],
    g: Option<&[G]>,
    b: &Bounds<T::Key, G::Key>,
    gather: bool,
) -> Part<T::Key, G::Key> {
    let take = (gather & b.keep.gather, gather & b.grow.gather);
    let mut out = Part::new();
    #[cfg(target_arch = "x86_64")]
    if simd::level() >= 2 {
        if let (Some(w32), Some(g32)) = (same_type::<T, f32>(w), g.map_or(Some(None), |g| same_type::<G, f32>(g).map(Some))) {
            let key = |k: u64| k as u32;
            let b32 = Bounds {
                keep: Bracket { lo: key(b.keep.lo.to_u64()), hi: key(b.keep.hi.to_u64()), gather: b.keep.gather },
                grow: Bracket { lo: key(b.grow.lo.to_u64()), hi: key(b.grow.hi.to_u64()), gather: b.grow.gather },
            };
            let mut o32 = Part::new();
            // SAFETY: level 2 means this CPU runs AVX-512 (F, VL, BW, DQ).
            let done = unsafe { super::avx512::pass_f32(w32, m, g32, &b32, take.0, take.1, &mut o32) };
            let back = |v: Vec<u32>| -> Vec<T::Key> { v.into_iter().map(|x| T::Key::from_u64(x as u64)).collect() };
            let back_g = |v: Vec<u32>| -> Vec<G::Key> { v.into_iter().map(|x| G::Key::from_u64(x as u64)).collect() };
            out = Part {
                active: o32.active,
                keep_above: o32.keep_above,
                open_w: back(o32.open_w),
                open_g: back_g(o32.open_g),
                open_hits: o32.open_hits,
                eligible: o32.eligible,
                grow_above: o32.grow_above,
                grow_in: back_g(o32.grow_in),
                grow_hits: o32.grow_hits,
                gathered: 0,
                nan: o32.nan,
            };
            pass_generic(w, m, g, b, take, &mut out, done);
            return finish(out, b);
        }
    }
    pass_generic(w, m, g, b, take, &mut out, 0);
    finish(out, b)
}

fn finish<K, GK>(mut out: Part<K, GK>, b: &Bounds<K, GK>) -> Part<K, GK> {
    // What counts against the scratch cap: the keys this pass was to gather.
    out.gathered = if b.keep.gather { out.open_hits } else { 0 } + if b.grow.gather { out.grow_hits } else { 0 };
    out
}

/// What [`sample`] returns: the samples, how many elements they cover, and the group's element count.
type Samples<T, G> = (Vec<(bool, <T as Score>::Key, <G as Score>::Key)>, u64, u64);

/// Sampled (active, |w| key, grow key) of one group: runs of `RUN` elements at a fixed stride over the
/// group's elements in order.
fn sample<T: Score, G: Score>(view: &View<'_, T, G>, spans: Range<usize>, grows: bool) -> Samples<T, G> {
    let lens: Vec<usize> = spans.clone().map(|p| view.spans[p].end - view.spans[p].start).collect();
    let n: u64 = lens.iter().map(|&l| l as u64).sum();
    let target = (n / 32).clamp(SAMPLE_MIN, SAMPLE_MAX);
    let runs = n.div_ceil(RUN as u64);
    let stride = (runs / target.div_ceil(RUN as u64)).max(1);
    let mut out = Vec::with_capacity((runs.div_ceil(stride) as usize) * RUN);
    let mut sampled = 0u64;
    let (mut piece, mut piece_start) = (0usize, 0u64);
    let mut r = 0u64;
    while r < runs {
        let pos = r * RUN as u64;
        while piece < lens.len() && pos >= piece_start + lens[piece] as u64 {
            piece_start += lens[piece] as u64;
            piece += 1;
        }
        if piece == lens.len() {
            break;
        }
        let s = view.spans[spans.start + piece];
        let off = s.start + (pos - piece_start) as usize;
        let end = (off + RUN).min(s.end);
        let (w, m) = (&view.weights[s.layer][off..end], &view.masks[s.layer][off..end]);
        let g = view.grows[s.layer].filter(|_| grows);
        for i in 0..w.len() {
            let gk = g.map_or(G::Key::MIN, |g| g[off + i].abs_key());
            out.push((m[i], w[i].abs_key(), gk));
        }
        sampled += w.len() as u64;
        r += stride;
    }
    (out, sampled, n)
}

/// The bracket of the `k`-th largest of a population estimated at `est` keys, from a sample of its
/// keys; also the sample's estimate of the k-th key itself.
/// `small`: the population is small enough to gather whole, so an open low end is still gathered.
fn bracket_of<K: RadixKey>(keys: &mut [K], k: u64, est: f64, small: bool) -> (Bracket<K>, K) {
    let s = keys.len();
    if s == 0 {
        return (Bracket { gather: small, ..Bracket::open() }, K::MIN);
    }
    let p = (k as f64 / est).min(1.0);
    let center = p * s as f64;
    let half = SIGMAS * (s as f64 * p * (1.0 - p)).sqrt() + 2.0 + MARGIN * center;
    let mut nth = |i: f64| -> Option<K> {
        if i < 0.0 || i >= s as f64 {
            return None;
        }
        let (_, &mut key, _) = keys.select_nth_unstable_by(i as usize, |a, b| b.cmp(a));
        Some(key)
    };
    let hi = nth((center - half).floor()).unwrap_or(K::MAX);
    let est_key = nth(center.floor().min(s as f64 - 1.0)).unwrap_or(K::MIN);
    match nth((center + half).ceil()) {
        // An exact zero at the low end (newly grown weights start at zero, so ties at 0 are common)
        // is left out: the bracket becomes (0, hi], and a threshold of 0 falls back to the general passes.
        Some(lo) => (Bracket { lo: if lo == K::MIN { K::from_u64(1) } else { lo }, hi, gather: true }, est_key),
        None => (Bracket { lo: K::MIN, hi, gather: small }, est_key),
    }
}

fn bounds_of<T: Score, G: Score>(view: &View<'_, T, G>, g: &Group) -> Bounds<T::Key, G::Key> {
    let (items, sampled, n) = sample(view, g.spans.clone(), g.grows && g.grow > 0);
    let scale = n as f64 / sampled.max(1) as f64;
    let small = n <= SMALL_GROUP;
    let (keep, est) = if g.keep == 0 {
        (Bracket::empty(), T::Key::MAX)
    } else {
        let mut keys: Vec<T::Key> = items.iter().filter(|x| x.0).map(|x| x.1).collect();
        let est_total = keys.len() as f64 * scale;
        bracket_of(&mut keys, g.keep, est_total, small)
    };
    let grow = if g.grows && g.grow > 0 {
        let mut keys: Vec<G::Key> = items.iter().filter(|x| !(x.0 && x.1 >= est)).map(|x| x.2).collect();
        let est_total = keys.len() as f64 * scale;
        bracket_of(&mut keys, g.grow, est_total, small).0
    } else {
        Bracket::empty()
    };
    Bounds { keep, grow }
}

/// Exact cuts of one side of one group from its counts and gathered keys; `None` when the bracket
/// missed or was not gathered. `keys_of`: the gathered keys of each of the group's pieces, in index order
/// (the order matters only for the keep side's ties, which the undecided connections are settled by).
fn side_cuts<K: RadixKey>(k: u64, total: u64, above: u64, gathered: bool, keys_of: &[impl AsRef<[K]>]) -> Option<Vec<Cut<K>>> {
    let n = keys_of.len();
    if k == 0 {
        return Some(vec![Cut::none(); n]);
    }
    if k == total {
        return Some(vec![Cut { key: K::MIN, quota: u64::MAX }; n]);
    }
    let inside: u64 = keys_of.iter().map(|k| k.as_ref().len() as u64).sum();
    if !gathered || k <= above || k > above + inside {
        return None;
    }
    let all: Vec<K> = keys_of.iter().flat_map(|k| k.as_ref().iter().copied()).collect();
    let t = select_in_memory(all, k - above, above);
    let mut take = t.take_equal(k);
    if take == t.equal {
        return Some(vec![Cut { key: t.key, quota: u64::MAX }; n]);
    }
    Some(
        keys_of
            .iter()
            .map(|ks| {
                let equal = ks.as_ref().iter().filter(|&&x| x == t.key).count() as u64;
                let q = take.min(equal);
                take -= q;
                Cut::normalized(t.key, q, equal)
            })
            .collect(),
    )
}

type Cuts<K, GK> = (Vec<Cut<K>>, Vec<Cut<GK>>);

/// Keep and grow cuts for every span from one pass, or `None` (then the general passes decide, and
/// report any error). Assumes `super::check` passed.
pub(super) fn cuts<T: Score, G: Score>(
    view: &View<'_, T, G>,
    n_layers: usize,
    counts: &Counts,
    grows_any: bool,
) -> Option<Cuts<T::Key, G::Key>> {
    let all = view.spans;
    let groups: Vec<Group> = match counts {
        Counts::Global { keep, grow } => {
            vec![Group { spans: 0..all.len(), keep: *keep, grow: *grow, grows: *grow > 0 }]
        }
        Counts::PerLayer(c) => {
            let mut out = Vec::with_capacity(n_layers);
            let mut start = 0;
            for (layer, &(keep, grow)) in c.iter().enumerate() {
                let mut end = start;
                while end < all.len() && all[end].layer == layer {
                    end += 1;
                }
                out.push(Group { spans: start..end, keep, grow, grows: grows_any && view.grows[layer].is_some() });
                start = end;
            }
            out
        }
    };
    let bounds: Vec<Bounds<T::Key, G::Key>> = groups.par_iter().map(|g| bounds_of(view, g)).collect();
    let mut group_of = vec![0usize; all.len()];
    for (gi, g) in groups.iter().enumerate() {
        group_of[g.spans.clone()].fill(gi);
    }
    // At most this many gathered keys (the scratch stays a small fraction of the inputs); the decision
    // to give up is taken on the exact total, so it does not depend on thread timing.
    let total_len: u64 = all.iter().map(|s| (s.end - s.start) as u64).sum();
    let cap = (total_len / 32).max(1 << 22);
    let gathered = AtomicU64::new(0);
    let mut parts: Vec<Part<T::Key, G::Key>> = (0..all.len())
        .into_par_iter()
        .map(|p| {
            let s = all[p];
            let g = &groups[group_of[p]];
            let b = &bounds[group_of[p]];
            let gather = gathered.load(Ordering::Relaxed) <= cap;
            let (w, m) = (&view.weights[s.layer][s.start..s.end], &view.masks[s.layer][s.start..s.end]);
            let part = match view.grows[s.layer].filter(|_| g.grows) {
                Some(gr) => pass_piece(w, m, Some(&gr[s.start..s.end]), b, gather),
                None => pass_piece::<T, G>(w, m, None, b, gather),
            };
            gathered.fetch_add(part.gathered, Ordering::Relaxed);
            part
        })
        .collect();
    if parts.iter().any(|p| p.nan) || parts.iter().map(|p| p.gathered).sum::<u64>() > cap {
        return None;
    }
    let mut keep_cuts = vec![Cut::none(); all.len()];
    let mut grow_cuts = vec![Cut::none(); all.len()];
    for (g, b) in groups.iter().zip(&bounds) {
        let ps = &mut parts[g.spans.clone()];
        let active: u64 = ps.iter().map(|p| p.active).sum();
        let above: u64 = ps.iter().map(|p| p.keep_above).sum();
        if g.keep > active {
            return None;
        }
        let keys: Vec<&[T::Key]> = ps.iter().map(|p| &p.open_w[..]).collect();
        let kc = side_cuts(g.keep, active, above, b.keep.gather, &keys)?;
        if g.grows {
            // Settle the undecided in index order: those not kept are eligible to grow.
            let (mut eligible, mut g_above) = (0u64, 0u64);
            let mut g_keys: Vec<Vec<G::Key>> = Vec::with_capacity(ps.len());
            for (p, cut) in ps.iter_mut().zip(&kc) {
                let mut st = cut.state();
                let mut ks = std::mem::take(&mut p.grow_in);
                eligible += p.eligible;
                g_above += p.grow_above;
                if !b.keep.gather && p.open_hits > 0 && cut.key != T::Key::MIN {
                    return None; // undecided connections not gathered, and not all kept
                }
                for (&wk, &gk) in p.open_w.iter().zip(&p.open_g) {
                    if !st.take(wk) {
                        if G::from_abs_key(gk).is_nan() {
                            return None;
                        }
                        eligible += 1;
                        g_above += (gk > b.grow.hi) as u64;
                        if (gk >= b.grow.lo) & (gk <= b.grow.hi) {
                            ks.push(gk);
                        }
                    }
                }
                g_keys.push(ks);
            }
            if g.grow > eligible {
                return None;
            }
            grow_cuts[g.spans.clone()].copy_from_slice(&side_cuts(g.grow, eligible, g_above, b.grow.gather, &g_keys)?);
        }
        keep_cuts[g.spans.clone()].copy_from_slice(&kc);
    }
    Some((keep_cuts, grow_cuts))
}
