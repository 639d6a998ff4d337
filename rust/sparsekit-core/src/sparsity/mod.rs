//! Dynamic sparse training: one fused mask update over many layers at once.
//!
//! [`update`] does, for every layer, what the torch way does in a dozen passes: keep the largest |w|
//! among the active connections, grow the largest grow scores (|∇L|, or SET's randoms) among the
//! connections not kept, write the new mask in place, zero the weights and optimizer state of the
//! dropped and of the newly grown connections, and count what changed. Selection is exact (ties to
//! the lower index, earlier layer first for a global selection) and never builds a score tensor:
//! the passes of [`cut`] read the weights, masks and grow scores where they are.

#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod cut;
mod fast;
mod simd;

use rayon::prelude::*;

use crate::error::CoreError;
use crate::pool;
use crate::select::key::{RadixKey, Score};
use crate::select::pieces::PIECE_LEN;
use cut::{topk_cut, Cut, Scan};

/// One sparsified parameter, borrowed.
pub struct Layer<'a, T, G> {
    pub weight: &'a mut [T],
    /// The current mask; overwritten with the new one.
    pub mask: &'a mut [bool],
    /// Grow scores ranked by magnitude (|∇L| for RigL / gradient top-k, uniform randoms for SET);
    /// `None` when nothing is grown.
    pub grow: Option<&'a [G]>,
    /// Optimizer state shaped like the weight (momentum, Adam moments): zeroed where the weight is.
    pub states: Vec<&'a mut [T]>,
}

/// How many connections each selection keeps: one count for all layers together, or one per layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Counts {
    /// `keep` largest |w| among all active connections, then `grow` among all the others.
    Global { keep: u64, grow: u64 },
    /// `(keep, grow)` per layer.
    PerLayer(Vec<(u64, u64)>),
}

/// What an update did to one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LayerStats {
    /// Connections in the new mask.
    pub kept: u64,
    /// New connections (in the new mask, not in the old).
    pub grown: u64,
    /// Removed connections (in the old mask, not in the new).
    pub dropped: u64,
}

/// A piece: `PIECE_LEN` consecutive elements of one layer.
#[derive(Clone, Copy)]
struct Span {
    layer: usize,
    start: usize,
    end: usize,
}

fn spans(lens: &[usize]) -> Vec<Span> {
    let mut out = Vec::new();
    for (layer, &n) in lens.iter().enumerate() {
        let mut start = 0;
        while start < n {
            let end = (start + PIECE_LEN).min(n);
            out.push(Span { layer, start, end });
            start = end;
        }
    }
    out
}

/// Read-only views of the layers for the selection passes.
struct View<'a, T, G> {
    spans: &'a [Span],
    weights: Vec<&'a [T]>,
    masks: Vec<&'a [bool]>,
    grows: Vec<Option<&'a [G]>>,
}

/// Eligible for keeping: active; key |w|.
struct KeepScan<'v, 'a, T, G>(&'v View<'a, T, G>);

impl<T: Score, G: Score> Scan<T::Key> for KeepScan<'_, '_, T, G> {
    fn scan<F: FnMut(T::Key)>(&self, piece: usize, mut f: F) -> bool {
        let s = self.0.spans[piece];
        let (w, m) = (&self.0.weights[s.layer][s.start..s.end], &self.0.masks[s.layer][s.start..s.end]);
        let mut nan = false;
        for (&x, &on) in w.iter().zip(m) {
            if on {
                nan |= x.is_nan();
                f(x.abs_key());
            }
        }
        nan
    }
}

/// Eligible for growing: not kept by `keep`; key |grow score|.
struct GrowScan<'v, 'a, T: Score, G> {
    view: &'v View<'a, T, G>,
    keep: &'v [Cut<T::Key>],
}

impl<T: Score, G: Score> Scan<G::Key> for GrowScan<'_, '_, T, G> {
    fn scan<F: FnMut(G::Key)>(&self, piece: usize, mut f: F) -> bool {
        let s = self.view.spans[piece];
        let Some(g) = self.view.grows[s.layer] else { return false };
        let (w, m, g) = (
            &self.view.weights[s.layer][s.start..s.end],
            &self.view.masks[s.layer][s.start..s.end],
            &g[s.start..s.end],
        );
        let mut nan = false;
        if let Some(k) = Simple::of(&self.keep[piece]) {
            for ((&x, &on), &y) in w.iter().zip(m).zip(g) {
                if !(on & k.any & (x.abs_key() >= k.min)) {
                    nan |= y.is_nan();
                    f(y.abs_key());
                }
            }
            return nan;
        }
        let mut kc = self.keep[piece].state();
        for ((&x, &on), &y) in w.iter().zip(m).zip(g) {
            if !(on && kc.take(x.abs_key())) {
                nan |= y.is_nan();
                f(y.abs_key());
            }
        }
        nan
    }
}

fn check<T, G>(layers: &[Layer<'_, T, G>], counts: &Counts) -> Result<(), CoreError> {
    for (i, l) in layers.iter().enumerate() {
        let n = l.weight.len();
        if l.mask.len() != n {
            return Err(CoreError::LengthMismatch { arg: "masks", expected: n, got: l.mask.len() });
        }
        if let Some(g) = l.grow {
            if g.len() != n {
                return Err(CoreError::LengthMismatch { arg: "grow scores", expected: n, got: g.len() });
            }
        }
        if let Some(s) = l.states.iter().find(|s| s.len() != n) {
            return Err(CoreError::LengthMismatch { arg: "optimizer states", expected: n, got: s.len() });
        }
        if let Counts::PerLayer(c) = counts {
            if c.get(i).is_some_and(|&(_, grow)| grow > 0) && l.grow.is_none() {
                return Err(CoreError::Invalid { arg: "grow scores", why: format!("layer {i} grows but has none") });
            }
        }
    }
    match counts {
        Counts::PerLayer(c) if c.len() != layers.len() => {
            Err(CoreError::LengthMismatch { arg: "counts", expected: layers.len(), got: c.len() })
        }
        Counts::Global { grow, .. } if *grow > 0 && layers.iter().any(|l| l.grow.is_none()) => {
            Err(CoreError::Invalid { arg: "grow scores", why: "a global grow needs scores for every layer".into() })
        }
        _ => Ok(()),
    }
}

/// Cuts for every span: one selection over all spans (global) or one per layer.
fn cuts_for<K: RadixKey, S: Scan<K>>(
    scan: &S,
    spans: &[Span],
    n_layers: usize,
    counts: &Counts,
    which: impl Fn((u64, u64)) -> u64,
    arg: &'static str,
) -> Result<Vec<Cut<K>>, CoreError> {
    match counts {
        Counts::Global { keep, grow } => {
            let ids: Vec<usize> = (0..spans.len()).collect();
            topk_cut(scan, &ids, which((*keep, *grow)), arg)
        }
        Counts::PerLayer(c) => {
            let mut out = vec![Cut::none(); spans.len()];
            for (layer, &count) in c.iter().enumerate().take(n_layers) {
                let ids: Vec<usize> = (0..spans.len()).filter(|&p| spans[p].layer == layer).collect();
                if ids.is_empty() {
                    continue;
                }
                for (&p, cut) in ids.iter().zip(topk_cut(scan, &ids, which(count), arg)?) {
                    out[p] = cut;
                }
            }
            Ok(out)
        }
    }
}

/// The fused mask update (see the module docs). `counts` must not ask for more than is eligible:
/// `keep` at most the active connections, `grow` at most the rest. Errors (nothing written) on NaN
/// weights or grow scores among the eligible, mismatched lengths, or counts out of range.
pub fn update<T: Score, G: Score>(layers: &mut [Layer<'_, T, G>], counts: &Counts) -> Result<Vec<LayerStats>, CoreError> {
    update_with(layers, counts, true).map(|(stats, _)| stats)
}

/// [`update`], and whether the one-pass selection of [`fast`] served it (`allow_fast = false` runs
/// the general passes only: tests compare the two).
fn update_with<T: Score, G: Score>(
    layers: &mut [Layer<'_, T, G>],
    counts: &Counts,
    allow_fast: bool,
) -> Result<(Vec<LayerStats>, bool), CoreError> {
    check(layers, counts)?;
    let lens: Vec<usize> = layers.iter().map(|l| l.weight.len()).collect();
    let all = spans(&lens);
    pool::run(|| {
        let keep_cuts = {
            let view = View {
                spans: &all,
                weights: layers.iter().map(|l| &*l.weight).collect(),
                masks: layers.iter().map(|l| &*l.mask).collect(),
                grows: layers.iter().map(|l| l.grow).collect(),
            };
            let grows_any = match counts {
                Counts::Global { grow, .. } => *grow > 0,
                Counts::PerLayer(c) => c.iter().any(|x| x.1 > 0),
            };
            let fc = allow_fast.then(|| fast::cuts(&view, layers.len(), counts, grows_any)).flatten();
            if let Some(cuts) = fc {
                (cuts, true)
            } else {
                let keep = cuts_for(&KeepScan(&view), &all, layers.len(), counts, |c| c.0, "weights")?;
                let grow = if grows_any {
                    cuts_for(&GrowScan { view: &view, keep: &keep }, &all, layers.len(), counts, |c| c.1, "grow scores")?
                } else {
                    vec![Cut::none(); all.len()]
                };
                ((keep, grow), false)
            }
        };
        let ((keep_cuts, grow_cuts), fast) = keep_cuts;
        let st = write(layers, &all, &keep_cuts, &grow_cuts);
        Ok((st, fast))
    })
}

struct SpanMut<'a, T, G> {
    layer: usize,
    weight: &'a mut [T],
    mask: &'a mut [bool],
    grow: Option<&'a [G]>,
    states: Vec<&'a mut [T]>,
}

fn split_mut<'a, T, G>(layers: &'a mut [Layer<'_, T, G>]) -> Vec<SpanMut<'a, T, G>> {
    let mut out = Vec::new();
    for (i, l) in layers.iter_mut().enumerate() {
        let mut states: Vec<std::slice::ChunksMut<'_, T>> = l.states.iter_mut().map(|s| s.chunks_mut(PIECE_LEN)).collect();
        let grows = l.grow.map(|g| g.chunks(PIECE_LEN));
        let mut grows = grows.into_iter().flatten();
        for (w, m) in l.weight.chunks_mut(PIECE_LEN).zip(l.mask.chunks_mut(PIECE_LEN)) {
            out.push(SpanMut {
                layer: i,
                weight: w,
                mask: m,
                grow: grows.next(),
                states: states.iter_mut().filter_map(|s| s.next()).collect(),
            });
        }
    }
    out
}

/// The one writing pass: new mask, zeroed weights and state, per-layer counts.
fn write<T: Score, G: Score>(
    layers: &mut [Layer<'_, T, G>],
    all: &[Span],
    keep: &[Cut<T::Key>],
    grow: &[Cut<G::Key>],
) -> Vec<LayerStats> {
    let n_layers = layers.len();
    let zero = T::from_abs_key(T::Key::from_u64(0));
    let mut pieces = split_mut(layers);
    debug_assert_eq!(pieces.len(), all.len());
    let per_piece: Vec<(usize, LayerStats)> = pieces
        .par_iter_mut()
        .enumerate()
        .map(|(p, s)| {
            let st = match (Simple::of(&keep[p]), Simple::of(&grow[p])) {
                (Some(k), Some(g)) => write_simple(s, k, g, zero),
                _ => write_general(s, &keep[p], &grow[p], zero),
            };
            (s.layer, st)
        })
        .collect();
    let mut out = vec![LayerStats::default(); n_layers];
    for (layer, st) in per_piece {
        let o = &mut out[layer];
        o.kept += st.kept;
        o.grown += st.grown;
        o.dropped += st.dropped;
    }
    out
}

/// A cut without a partial tie: "key >= min" (or nothing), which a branch-free loop can apply.
#[derive(Clone, Copy)]
struct Simple<K> {
    min: K,
    any: bool,
}

impl<K: RadixKey> Simple<K> {
    fn of(cut: &Cut<K>) -> Option<Self> {
        if cut.quota == u64::MAX {
            Some(Simple { min: cut.key, any: true })
        } else if cut.quota == 0 && cut.key == K::MAX {
            Some(Simple { min: K::MAX, any: false })
        } else {
            None
        }
    }
}

fn write_simple<T: Score, G: Score>(s: &mut SpanMut<'_, T, G>, keep: Simple<T::Key>, grow: Simple<G::Key>, zero: T) -> LayerStats {
    let mut out = LayerStats::default();
    let mut start = 0;
    #[cfg(target_arch = "x86_64")]
    if simd::level() >= 2 {
        let g = s.grow.map_or(Some(None), |g| fast::same_type::<G, f32>(g).map(Some));
        if let (Some(w), Some(g)) = (fast::same_type_mut::<T, f32>(s.weight), g) {
            let mut states: Vec<&mut [f32]> = s.states.iter_mut().filter_map(|x| fast::same_type_mut::<T, f32>(x)).collect();
            let k = Simple { min: keep.min.to_u64() as u32, any: keep.any };
            let gr = Simple { min: grow.min.to_u64() as u32, any: grow.any };
            // SAFETY: level 2 means this CPU runs AVX-512 (F, VL, BW, DQ).
            start = unsafe { avx512::write_f32(w, s.mask, g, &mut states, k, gr, &mut out) };
        }
    }
    let st = write_simple_from(s, keep, grow, zero, start);
    LayerStats { kept: out.kept + st.kept, grown: out.grown + st.grown, dropped: out.dropped + st.dropped }
}

/// The generic writing pass over elements `start..` of a piece.
fn write_simple_from<T: Score, G: Score>(
    s: &mut SpanMut<'_, T, G>,
    keep: Simple<T::Key>,
    grow: Simple<G::Key>,
    zero: T,
    mut start: usize,
) -> LayerStats {
    const CHUNK: usize = 256;
    let (mut kept, mut grown, mut dropped) = (0u64, 0u64, 0u64);
    let mut stay = [false; CHUNK];
    let n = s.weight.len();
    while start < n {
        let end = (start + CHUNK).min(n);
        let (w, m) = (&mut s.weight[start..end], &mut s.mask[start..end]);
        // Branch-free loops so they vectorise: the new mask first, then weights and each state
        // selected against zero where the connection did not stay (dropped, new, or off).
        match s.grow {
            Some(g) if grow.any => {
                for (((o, &x), &y), st) in m.iter_mut().zip(w.iter()).zip(&g[start..end]).zip(stay.iter_mut()) {
                    let old = *o;
                    let k = old & keep.any & (x.abs_key() >= keep.min);
                    let new = k | (!k & (y.abs_key() >= grow.min));
                    *o = new;
                    *st = new & old;
                    kept += new as u64;
                    grown += (new & !old) as u64;
                    dropped += (old & !new) as u64;
                }
            }
            _ => {
                for ((o, &x), st) in m.iter_mut().zip(w.iter()).zip(stay.iter_mut()) {
                    let old = *o;
                    let new = old & keep.any & (x.abs_key() >= keep.min);
                    *o = new;
                    *st = new;
                    kept += new as u64;
                    dropped += (old & !new) as u64;
                }
            }
        }
        let stay = &stay[..end - start];
        for (x, &k) in w.iter_mut().zip(stay) {
            *x = if k { *x } else { zero };
        }
        for state in s.states.iter_mut() {
            for (x, &k) in state[start..end].iter_mut().zip(stay) {
                *x = if k { *x } else { zero };
            }
        }
        start = end;
    }
    LayerStats { kept, grown, dropped }
}

fn write_general<T: Score, G: Score>(s: &mut SpanMut<'_, T, G>, keep: &Cut<T::Key>, grow: &Cut<G::Key>, zero: T) -> LayerStats {
    let (mut kc, mut gc) = (keep.state(), grow.state());
    let mut st = LayerStats::default();
    for i in 0..s.weight.len() {
        let old = s.mask[i];
        let kept = old && kc.take(s.weight[i].abs_key());
        let grown = !kept && s.grow.is_some_and(|g| gc.take(g[i].abs_key()));
        let new = kept | grown;
        s.mask[i] = new;
        if !(new && old) {
            // Dropped, newly grown or still off: the weight and its state are (re)set to zero.
            s.weight[i] = zero;
            for state in s.states.iter_mut() {
                state[i] = zero;
            }
        }
        st.kept += new as u64;
        st.grown += (new && !old) as u64;
        st.dropped += (old && !new) as u64;
    }
    st
}

/// Number of true entries of each mask.
pub fn count_masks(masks: &[&[bool]]) -> Result<Vec<u64>, CoreError> {
    pool::run(|| {
        Ok(masks
            .par_iter()
            .map(|m| m.par_chunks(PIECE_LEN).map(|c| c.iter().map(|&b| b as u64).sum::<u64>()).sum())
            .collect())
    })
}

/// `x[i] = 0` wherever `mask[i]` is false, for each (tensor, mask) pair: re-zeroing masked weights, or
/// masking gradients before the optimizer step (zero, not `x * 0`: an inf there cannot become NaN).
pub fn zero_off<T: Score>(xs: &mut [&mut [T]], masks: &[&[bool]]) -> Result<(), CoreError> {
    if xs.len() != masks.len() {
        return Err(CoreError::LengthMismatch { arg: "masks", expected: xs.len(), got: masks.len() });
    }
    for (x, m) in xs.iter().zip(masks) {
        if x.len() != m.len() {
            return Err(CoreError::LengthMismatch { arg: "mask", expected: x.len(), got: m.len() });
        }
    }
    let zero = T::from_abs_key(T::Key::from_u64(0));
    pool::run(|| {
        let mut pairs: Vec<(&mut [T], &[bool])> = Vec::new();
        for (x, m) in xs.iter_mut().zip(masks) {
            for (a, b) in x.chunks_mut(PIECE_LEN).zip(m.chunks(PIECE_LEN)) {
                pairs.push((a, b));
            }
        }
        pairs.par_iter_mut().for_each(|(x, m)| {
            let mut done = 0;
            #[cfg(target_arch = "x86_64")]
            if simd::level() >= 2 {
                if let Some(x32) = fast::same_type_mut::<T, f32>(x) {
                    // SAFETY: level 2 means this CPU runs AVX-512 (F, VL, BW, DQ).
                    done = unsafe { avx512::zero_off_f32(x32, m) };
                }
            }
            // Branch-free (a select the compiler vectorises): masks are random, a branch would mispredict.
            for (v, &on) in x[done..].iter_mut().zip(&m[done..]) {
                *v = if on { *v } else { zero };
            }
        });
        Ok(())
    })
}

#[cfg(test)]
mod tests;
