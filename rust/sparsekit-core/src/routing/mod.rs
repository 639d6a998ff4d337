//! MoE routing tables: top-k gating, counting-sort dispatch, capacity and dropping, offsets.
//!
//! Two steps, both parallel over the sparsekit pool:
//! - [`route_topk`]: one fused pass per row of the logits: scores (softmax / sigmoid / identity), the
//!   expert bias for the choice only, DeepSeek-V3 group limiting, top-k with ties to the lower expert
//!   index, the chosen (unbiased) scores, normalised and scaled weights.
//! - [`route_tables`]: a stable counting sort of the token slots by expert (histogram per chunk, scan,
//!   scatter), O(T*k + E), int64 positions, with an optional capacity (drop by position or by priority).

use std::ops::{Add, Div, Mul, Sub};
use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

use crate::error::CoreError;
use crate::pages::prefer_huge_pages;
use crate::pool;

mod fast;
pub mod dispatch;

/// How a row of logits becomes scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoreFn {
    /// `exp(x - max) / sum` over the row.
    Softmax,
    /// `1 / (1 + exp(-x))` per element.
    Sigmoid,
    /// The input already holds scores.
    Identity,
}

/// Group score of DeepSeek-V3's group-limited routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupMode {
    /// The group's largest choice score (DeepSeek-V3 without a bias).
    Max,
    /// The sum of its two largest choice scores (with a bias); `+inf + -inf` counts as `+inf`.
    Top2,
}

/// Which slots an expert over capacity drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropPolicy {
    /// Keep the slots of highest priority (ties: lower slot index).
    Probs,
    /// Keep the first slots in token order.
    Position,
}

/// The gate: everything [`route_topk`] needs besides the data.
#[derive(Clone, Copy, Debug)]
pub struct Gate {
    pub n_experts: usize,
    pub k: usize,
    pub score: ScoreFn,
    pub n_groups: usize,
    pub topk_groups: usize,
    pub group_mode: GroupMode,
    pub normalize: bool,
    pub scale: f64,
}

impl Gate {
    /// Validate the configuration (each error names the argument).
    pub fn check(&self) -> Result<(), CoreError> {
        let e = self.n_experts;
        if e == 0 {
            return Err(CoreError::Invalid { arg: "logits", why: "needs at least one expert (E = 0)".into() });
        }
        if self.n_groups == 0 || !e.is_multiple_of(self.n_groups) {
            return Err(CoreError::Invalid {
                arg: "n_groups",
                why: format!("must be >= 1 and divide the number of experts E={e}, got {}", self.n_groups),
            });
        }
        if self.topk_groups == 0 || self.topk_groups > self.n_groups {
            return Err(CoreError::Invalid {
                arg: "topk_groups",
                why: format!("must be in [1, n_groups={}], got {}", self.n_groups, self.topk_groups),
            });
        }
        if self.n_groups > 1 && self.group_mode == GroupMode::Top2 && e / self.n_groups < 2 {
            return Err(CoreError::Invalid { arg: "n_groups", why: "top-2 group scores need >= 2 experts per group".into() });
        }
        let allowed = self.topk_groups * (e / self.n_groups);
        if self.k == 0 || self.k > allowed {
            return Err(CoreError::Invalid {
                arg: "k",
                why: format!("must be in [1, {allowed}] (experts in the topk_groups best groups), got {}", self.k),
            });
        }
        if !self.scale.is_finite() {
            return Err(CoreError::Invalid { arg: "scale", why: format!("must be finite, got {}", self.scale) });
        }
        Ok(())
    }
}

/// The float types the gate runs in (float32, and float64 for gradient checks).
pub trait Real:
    Copy + Send + Sync + PartialOrd + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + Div<Output = Self> + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn is_nan(self) -> bool;
    fn exp(self) -> Self;
    /// `dst[i] = exp(src[i] - shift)` for `src[i] - shift <= 0` (the softmax numerator).
    #[inline(always)]
    fn exp_shifted(src: &[Self], shift: Self, dst: &mut [Self]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = (s - shift).exp();
        }
    }
    /// Route the rows of `x` into `ids` / `sel` / `w`, adding the chosen experts to `hist` if given;
    /// false when a row's scores hold a NaN. float32 overrides this with the vectorised kernel.
    #[allow(clippy::too_many_arguments)]
    fn route_rows(x: &[Self], bias: Option<&[Self]>, g: &Gate, ids: &mut [i64], sel: &mut [Self], w: &mut [Self], hist: Option<&mut [usize]>) -> bool {
        rows_generic(x, bias, g, ids, sel, w, hist)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f64::NEG_INFINITY;
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
}

/// exp(x) for x <= 0 in float32, branch-free so the row loop vectorises (about 1 ulp; exact 0 below
/// about -103.97, gradual underflow through a split power of two).
#[inline(always)]
fn exp_nonpos_f32(x: f32) -> f32 {
    let x = if x < -104.0 { -104.0 } else { x }; // keeps NaN (f32::max would drop it)
    // n = rint(x log2 e) by the 1.5 * 2^23 trick (vectorises; f32::round is a libm call)
    let t = x * std::f32::consts::LOG2_E;
    let tc = t + 12_582_912.0;
    let n = tc - 12_582_912.0;
    // fused multiply-adds: one rounding each, so every build (FMA instructions in the SIMD ones, the
    // correctly rounded `fmaf` in the portable one) gives the same bits; `exp16` in `fast` is this
    let r = (-n).mul_add(1.428_606_8e-6, (-n).mul_add(0.693_145_75, x));
    // minimax-style polynomial for e^r on [-ln2/2, ln2/2], by Horner
    let mut p = r.mul_add(0.001_388_89, 0.008_333_99);
    p = r.mul_add(p, 0.041_666_52);
    p = r.mul_add(p, 0.166_666_57);
    p = r.mul_add(p, 0.5);
    p = r.mul_add(p, 1.0);
    p = r.mul_add(p, 1.0);
    // p * 2^n with one rounding: 2^n split in two normal halves (p * 2^n1 is exact, the second product
    // rounds once, into a subnormal if need be); n as an integer straight from tc's mantissa (`n as i32`
    // saturates, which does not vectorise)
    let ni = (tc.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let n1 = ni >> 1;
    let n2 = ni - n1;
    let s1 = f32::from_bits(((n1 + 127) as u32) << 23);
    let s2 = f32::from_bits(((n2 + 127) as u32) << 23);
    p * s1 * s2
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f32::NEG_INFINITY;
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f32::exp(self)
    }
    #[inline(always)]
    fn exp_shifted(src: &[Self], shift: Self, dst: &mut [Self]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = exp_nonpos_f32(s - shift);
        }
    }
    fn route_rows(x: &[Self], bias: Option<&[Self]>, g: &Gate, ids: &mut [i64], sel: &mut [Self], w: &mut [Self], hist: Option<&mut [usize]>) -> bool {
        let mut buf = fast::Bufs::new(g);
        fast::rows(x, bias, g, &mut buf, ids, sel, w, hist, fast::simd_level())
    }
}

/// Insert `(v, e)` into the descending top list `best[..*len]` of capacity `best.len()`; scanning experts
/// in ascending order with a strict comparison keeps ties at the lower expert index.
#[inline(always)]
#[allow(clippy::neg_cmp_op_on_partial_ord)] // `!(v > x)` on purpose: a NaN `v` never enters the list
fn push_top<T: Real>(best: &mut [(T, usize)], len: &mut usize, v: T, e: usize) {
    let cap = best.len();
    if *len == cap && !(v > best[cap - 1].0) {
        return;
    }
    let mut pos = if *len < cap { *len } else { cap - 1 };
    if *len < cap {
        *len += 1;
    }
    while pos > 0 && v > best[pos - 1].0 {
        best[pos] = best[pos - 1];
        pos -= 1;
    }
    best[pos] = (v, e);
}

struct RowBufs<T> {
    scores: Vec<T>,
    choice: Vec<T>,
    groups: Vec<(T, usize)>,
    best: Vec<(T, usize)>,
    allowed: Vec<bool>,
}

/// DeepSeek-V3 group limiting, then the top-k of the allowed experts into `best` (descending, ties to
/// the lower expert index).
#[inline(always)]
fn choose_groups<T: Real>(choice: &[T], g: &Gate, groups: &mut [(T, usize)], allowed: &mut [bool], best: &mut [(T, usize)]) {
    let size = g.n_experts / g.n_groups;
    let mut glen = 0usize;
    let gbest = &mut groups[..g.topk_groups];
    for gi in 0..g.n_groups {
        let member = &choice[gi * size..(gi + 1) * size];
        let score = match g.group_mode {
            GroupMode::Max => {
                let mut m = member[0];
                for &v in &member[1..] {
                    if v > m {
                        m = v;
                    }
                }
                m
            }
            GroupMode::Top2 => {
                let (mut a, mut b) = (T::NEG_INF, T::NEG_INF);
                for (n, &v) in member.iter().enumerate() {
                    if n == 0 || v > a {
                        b = a;
                        a = v;
                    } else if n == 1 || v > b {
                        b = v;
                    }
                }
                let t = a + b;
                if t.is_nan() {
                    a
                } else {
                    t
                }
            }
        };
        push_top(gbest, &mut glen, score, gi);
    }
    allowed.iter_mut().for_each(|a| *a = false);
    for &(_, gi) in gbest.iter() {
        allowed[gi] = true;
    }
    let mut len = 0usize;
    for gi in 0..g.n_groups {
        if allowed[gi] {
            for (j, &v) in choice[gi * size..(gi + 1) * size].iter().enumerate() {
                push_top(best, &mut len, v, gi * size + j);
            }
        }
    }
}

/// Route one row; false when a score is NaN.
fn route_row<T: Real>(x: &[T], bias: Option<&[T]>, g: &Gate, buf: &mut RowBufs<T>, ids: &mut [i64], sel: &mut [T], w: &mut [T]) -> bool {
    let s = &mut buf.scores;
    match g.score {
        ScoreFn::Softmax => {
            let mut m = T::NEG_INF;
            for &v in x {
                if v > m {
                    m = v;
                }
            }
            T::exp_shifted(x, m, s);
            let mut z = T::ZERO;
            for &v in s.iter() {
                z = z + v;
            }
            for v in s.iter_mut() {
                *v = *v / z;
            }
        }
        ScoreFn::Sigmoid => {
            for (d, &v) in s.iter_mut().zip(x) {
                *d = T::ONE / (T::ONE + (T::ZERO - v).exp());
            }
        }
        ScoreFn::Identity => s.copy_from_slice(x),
    }
    let mut nan = false;
    for &v in s.iter() {
        nan |= v.is_nan();
    }
    if nan {
        return false;
    }
    let choice: &[T] = match bias {
        Some(b) => {
            for ((c, &v), &bv) in buf.choice.iter_mut().zip(s.iter()).zip(b) {
                *c = v + bv;
            }
            &buf.choice
        }
        None => s,
    };
    let k = g.k;
    let best = &mut buf.best[..k];
    if g.n_groups > 1 {
        choose_groups(choice, g, &mut buf.groups, &mut buf.allowed, best);
    } else {
        // the k-th best so far kept in a register: most elements fail one compare
        let mut len = 0usize;
        let mut thr = T::NEG_INF;
        for (j, &v) in choice.iter().enumerate() {
            if len < k || v > thr {
                push_top(best, &mut len, v, j);
                if len == k {
                    thr = best[k - 1].0;
                }
            }
        }
    }
    let mut total = T::ZERO;
    for (j, &(_, ex)) in best.iter().enumerate() {
        ids[j] = ex as i64;
        sel[j] = s[ex];
        total = total + s[ex];
    }
    let scale = T::from_f64(g.scale);
    for j in 0..k {
        w[j] = if g.normalize { sel[j] / total } else { sel[j] } * scale;
    }
    true
}

/// The generic task body: route the rows of `x`, counting the chosen experts into `hist` if given.
#[allow(clippy::too_many_arguments)]
fn rows_generic<T: Real>(
    x: &[T],
    bias: Option<&[T]>,
    g: &Gate,
    ids: &mut [i64],
    sel: &mut [T],
    w: &mut [T],
    mut hist: Option<&mut [usize]>,
) -> bool {
    let (e, k) = (g.n_experts, g.k);
    let mut buf = RowBufs {
        scores: vec![T::ZERO; e],
        choice: vec![T::ZERO; if bias.is_some() { e } else { 0 }],
        groups: vec![(T::ZERO, 0); g.topk_groups],
        best: vec![(T::ZERO, 0); k],
        allowed: vec![false; g.n_groups],
    };
    for (r, xr) in x.chunks_exact(e).enumerate() {
        let o = r * k..(r + 1) * k;
        if !route_row(xr, bias, g, &mut buf, &mut ids[o.clone()], &mut sel[o.clone()], &mut w[o.clone()]) {
            return false;
        }
        if let Some(h) = hist.as_deref_mut() {
            for &ex in &ids[o] {
                h[ex as usize] += 1;
            }
        }
    }
    true
}

/// Validate the gate and the buffer lengths of [`route_topk`] / [`route_plan`]; returns the row count.
fn check_topk_io<T: Real>(logits: &[T], bias: Option<&[T]>, gate: &Gate, ids: usize, sel: usize, weights: usize) -> Result<usize, CoreError> {
    gate.check()?;
    let e = gate.n_experts;
    if !logits.len().is_multiple_of(e) {
        return Err(CoreError::Invalid { arg: "logits", why: format!("length {} is not a multiple of E={e}", logits.len()) });
    }
    let rows = logits.len() / e;
    let k = gate.k;
    for (arg, got) in [("expert_ids", ids), ("sel", sel), ("weights", weights)] {
        if got != rows * k {
            return Err(CoreError::LengthMismatch { arg, expected: rows * k, got });
        }
    }
    if let Some(b) = bias {
        if b.len() != e {
            return Err(CoreError::LengthMismatch { arg: "bias", expected: e, got: b.len() });
        }
        if b.iter().any(|v| !(v.to_f64().is_finite())) {
            return Err(CoreError::Invalid { arg: "bias", why: "must be finite".into() });
        }
    }
    Ok(rows)
}

/// The error of a gate pass that found NaN scores.
fn nan_error<T: Real>(logits: &[T]) -> CoreError {
    if logits.iter().any(|v| v.is_nan()) {
        return CoreError::NanInput { arg: "logits" };
    }
    CoreError::Invalid {
        arg: "logits",
        why: "a row's scores are NaN (+inf logits, or a row of only -inf logits, under softmax)".into(),
    }
}

const ROWS_PER_TASK: usize = 64;

/// Route `rows` rows of `logits [rows, E]` (row-major): `ids [rows, k]` (descending choice score, ties
/// to the lower expert), `sel [rows, k]` the chosen experts' unbiased scores, `weights [rows, k]` =
/// `sel` (divided by its row sum when `normalize`) times `scale`. `bias [E]` is added to the scores for
/// the choice only (and the group scores), never to `sel` / `weights`.
pub fn route_topk<T: Real>(
    logits: &[T],
    bias: Option<&[T]>,
    gate: &Gate,
    ids: &mut [i64],
    sel: &mut [T],
    weights: &mut [T],
) -> Result<(), CoreError> {
    let rows = check_topk_io(logits, bias, gate, ids.len(), sel.len(), weights.len())?;
    let (e, k) = (gate.n_experts, gate.k);
    if rows == 0 {
        return Ok(());
    }
    let bad = AtomicBool::new(false);
    pool::run(|| {
        ids.par_chunks_mut(ROWS_PER_TASK * k)
            .zip(sel.par_chunks_mut(ROWS_PER_TASK * k))
            .zip(weights.par_chunks_mut(ROWS_PER_TASK * k))
            .enumerate()
            .for_each(|(task, ((ids, sel), w))| {
                let r0 = task * ROWS_PER_TASK;
                let x = &logits[r0 * e..(r0 + ids.len() / k) * e];
                if !T::route_rows(x, bias, gate, ids, sel, w, None) {
                    bad.store(true, Ordering::Relaxed);
                }
            });
        Ok(())
    })?;
    if bad.load(Ordering::Relaxed) {
        return Err(nan_error(logits));
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    /// # Safety
    /// `i` in bounds, and no two threads write the same index.
    #[inline(always)]
    unsafe fn write(self, i: usize, v: T) {
        unsafe { *self.0.add(i) = v };
    }
    /// Ask for the line of element `i` in a writable state (a hint: `i` may be out of bounds). A
    /// counting sort's scatter writes one stream per bucket, more than the hardware prefetcher follows,
    /// so without this each new line of each stream stalls the store queue (measured at T=262144,
    /// E=256, k=8: the scatter took 10-16 ms, 3.5 ms with it).
    #[inline(always)]
    fn prefetch_write(self, i: usize) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch never faults; the address is not dereferenced
        unsafe {
            use std::arch::x86_64::*;
            _mm_prefetch::<_MM_HINT_ET0>(self.0.wrapping_add(i) as *const i8)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = i;
    }
}

const SORT_CHUNK: usize = 1 << 14;
/// How far ahead in its bucket's stream a scatter asks for the line it will write.
const SCATTER_AHEAD: usize = 32;

/// Stable counting sort of positions `0..n` by `key(s) < buckets`: `order` gets the positions grouped by
/// bucket (ascending position inside), `inverse` (if given) `order[inverse[s]] == s`. Returns the start of
/// each bucket (`buckets + 1` entries).
fn bucket_sort(n: usize, buckets: usize, key: impl Fn(usize) -> usize + Sync, order: &mut [i64], inverse: Option<&mut [i64]>) -> Vec<i64> {
    let threads = rayon::current_num_threads().max(1);
    let chunks = (n / SORT_CHUNK).clamp(1, 4 * threads);
    let chunk = n.div_ceil(chunks).max(1);
    let chunks = n.div_ceil(chunk).max(1);
    let hist: Vec<Vec<usize>> = (0..chunks)
        .into_par_iter()
        .map(|c| {
            let mut h = vec![0usize; buckets];
            for s in c * chunk..((c + 1) * chunk).min(n) {
                h[key(s)] += 1;
            }
            h
        })
        .collect();
    let mut cursors = hist;
    let mut starts = vec![0i64; buckets + 1];
    let mut acc = 0usize;
    for b in 0..buckets {
        starts[b] = acc as i64;
        for cur in cursors.iter_mut() {
            let c = cur[b];
            cur[b] = acc;
            acc += c;
        }
    }
    starts[buckets] = acc as i64;
    let optr = SendPtr(order.as_mut_ptr());
    let iptr = inverse.map(|inv| SendPtr(inv.as_mut_ptr()));
    cursors.into_par_iter().enumerate().for_each(|(c, mut cur)| {
        for s in c * chunk..((c + 1) * chunk).min(n) {
            let b = key(s);
            let p = cur[b];
            cur[b] += 1;
            // SAFETY: every (bucket, chunk) owns a disjoint range of positions; p < n; s is this chunk's.
            unsafe {
                optr.prefetch_write(p + SCATTER_AHEAD);
                optr.write(p, s as i64);
                if let Some(ip) = iptr {
                    ip.write(s, p as i64);
                }
            }
        }
    });
    starts
}

/// Routing tables of `ids [T*k]` over `n_experts` experts (every id must be in range).
///
/// `order [T*k]`: kept slots grouped by expert (ascending expert, ascending slot inside), then the
/// dropped slots in ascending slot order; `inverse`: its inverse; `counts [E]` kept slots per expert;
/// `offsets [E+1]` their exclusive scan; `kept [T*k]`. `capacity = None` is dropless; otherwise each
/// expert keeps `capacity` slots: its first ones (`Position`) or those of highest `priority` (`Probs`,
/// ties to the lower slot index, `-0.0 == +0.0`; NaN priorities are an error).
#[allow(clippy::too_many_arguments)]
pub fn route_tables(
    ids: &[i64],
    n_experts: usize,
    capacity: Option<usize>,
    policy: DropPolicy,
    priority: Option<&[f32]>,
    order: &mut [i64],
    inverse: &mut [i64],
    counts: &mut [i64],
    offsets: &mut [i64],
    kept: &mut [bool],
) -> Result<(), CoreError> {
    let n = ids.len();
    let e = n_experts;
    if e == 0 {
        return Err(CoreError::Invalid { arg: "n_experts", why: "must be >= 1".into() });
    }
    for (arg, got, want) in [
        ("order", order.len(), n),
        ("inverse", inverse.len(), n),
        ("counts", counts.len(), e),
        ("offsets", offsets.len(), e + 1),
        ("kept", kept.len(), n),
    ] {
        if got != want {
            return Err(CoreError::LengthMismatch { arg, expected: want, got });
        }
    }
    let by_priority = capacity.is_some() && policy == DropPolicy::Probs;
    if by_priority {
        match priority {
            None => return Err(CoreError::Invalid { arg: "priority", why: "required for drop_policy=\"probs\" with a capacity".into() }),
            Some(p) if p.len() != n => return Err(CoreError::LengthMismatch { arg: "priority", expected: n, got: p.len() }),
            Some(p) if p.iter().any(|v| v.is_nan()) => return Err(CoreError::NanInput { arg: "priority" }),
            _ => {}
        }
    }
    pool::run(|| {
        if ids.par_iter().any(|&x| x < 0 || x as u64 >= e as u64) {
            return Err(CoreError::Invalid { arg: "expert_ids", why: format!("ids must be in [0, {e})") });
        }
        let starts = match capacity {
            None => {
                kept.par_iter_mut().for_each(|k| *k = true);
                bucket_sort(n, e, |s| ids[s] as usize, order, Some(inverse))
            }
            Some(cap) => {
                let mut first = vec![0i64; n];
                let st = bucket_sort(n, e, |s| ids[s] as usize, &mut first, None);
                kept.par_iter_mut().for_each(|k| *k = false);
                let kptr = SendPtr(kept.as_mut_ptr());
                (0..e).into_par_iter().for_each(|ex| {
                    let seg = &first[st[ex] as usize..st[ex + 1] as usize];
                    if seg.len() <= cap || policy == DropPolicy::Position || cap == 0 {
                        for &s in &seg[..seg.len().min(cap)] {
                            // SAFETY: slots of different experts are disjoint
                            unsafe { kptr.write(s as usize, true) };
                        }
                    } else {
                        let p = priority.expect("checked above");
                        let mut v = seg.to_vec();
                        v.select_nth_unstable_by(cap - 1, |&a, &b| {
                            p[b as usize].partial_cmp(&p[a as usize]).expect("no NaN").then(a.cmp(&b))
                        });
                        for &s in &v[..cap] {
                            // SAFETY: as above
                            unsafe { kptr.write(s as usize, true) };
                        }
                    }
                });
                drop(first);
                let kept_ro: &[bool] = kept;
                bucket_sort(n, e + 1, |s| if kept_ro[s] { ids[s] as usize } else { e }, order, Some(inverse))
            }
        };
        for ex in 0..e {
            counts[ex] = starts[ex + 1] - starts[ex];
        }
        offsets.copy_from_slice(&starts[..e + 1]);
        Ok(())
    })
}

/// The whole plan in one call: the gate of [`route_topk`] fused with the dropless counting sort (each
/// task counts the experts it chose while routing its rows, so the tables cost one scan and one
/// scatter pass, no second histogram pass). With a capacity, [`route_tables`] runs on the ids.
/// Same outputs, contracts and errors as [`route_topk`] followed by [`route_tables`].
#[allow(clippy::too_many_arguments)]
pub fn route_plan<T: Real>(
    logits: &[T],
    bias: Option<&[T]>,
    gate: &Gate,
    capacity: Option<usize>,
    policy: DropPolicy,
    ids: &mut [i64],
    sel: &mut [T],
    weights: &mut [T],
    order: &mut [i64],
    inverse: &mut [i64],
    counts: &mut [i64],
    offsets: &mut [i64],
    kept: &mut [bool],
) -> Result<(), CoreError> {
    let rows = check_topk_io(logits, bias, gate, ids.len(), sel.len(), weights.len())?;
    let (e, k) = (gate.n_experts, gate.k);
    let n = rows * k;
    for (arg, got, want) in [
        ("order", order.len(), n),
        ("inverse", inverse.len(), n),
        ("counts", counts.len(), e),
        ("offsets", offsets.len(), e + 1),
        ("kept", kept.len(), n),
    ] {
        if got != want {
            return Err(CoreError::LengthMismatch { arg, expected: want, got });
        }
    }
    // fresh torch outputs (~33 bytes per slot) fault in page by page; measured at T=262144, E=256, k=8 on
    // never-touched memory: 216-228 ms in 4 KiB pages vs 121-139 ms with the advice (neutral once warm)
    prefer_huge_pages(ids);
    prefer_huge_pages(sel);
    prefer_huge_pages(weights);
    prefer_huge_pages(order);
    prefer_huge_pages(inverse);
    prefer_huge_pages(kept);
    if let Some(cap) = capacity {
        route_topk(logits, bias, gate, ids, sel, weights)?;
        let prio: Vec<f32> = if policy == DropPolicy::Probs { sel.iter().map(|v| v.to_f64() as f32).collect() } else { Vec::new() };
        let p = if policy == DropPolicy::Probs { Some(&prio[..]) } else { None };
        return route_tables(ids, e, Some(cap.min(n)), policy, p, order, inverse, counts, offsets, kept);
    }
    if rows == 0 {
        counts.fill(0);
        offsets.fill(0);
        return Ok(());
    }
    pool::run(|| {
        // a few tasks per thread: enough to balance a busy machine, few histograms to scan
        let rpt = rows.div_ceil(8 * rayon::current_num_threads().max(1)).max(ROWS_PER_TASK);
        let hists: Vec<Option<Vec<usize>>> = ids
            .par_chunks_mut(rpt * k)
            .zip(sel.par_chunks_mut(rpt * k))
            .zip(weights.par_chunks_mut(rpt * k))
            .enumerate()
            .map(|(task, ((ids, sel), w))| {
                let r0 = task * rpt;
                let x = &logits[r0 * e..(r0 + ids.len() / k) * e];
                let mut h = vec![0usize; e];
                T::route_rows(x, bias, gate, ids, sel, w, Some(&mut h)).then_some(h)
            })
            .collect();
        let Some(mut cursors) = hists.into_iter().collect::<Option<Vec<Vec<usize>>>>() else {
            return Err(nan_error(logits));
        };
        // exclusive scan in (expert, task) order: task t's slots of expert b start after the earlier tasks'
        let mut acc = 0usize;
        for b in 0..e {
            offsets[b] = acc as i64;
            for cur in cursors.iter_mut() {
                let c = cur[b];
                cur[b] = acc;
                acc += c;
            }
            counts[b] = acc as i64 - offsets[b];
        }
        offsets[e] = acc as i64;
        kept.par_iter_mut().for_each(|v| *v = true);
        let ids: &[i64] = ids;
        let optr = SendPtr(order.as_mut_ptr());
        let iptr = SendPtr(inverse.as_mut_ptr());
        cursors.into_par_iter().enumerate().for_each(|(task, mut cur)| {
            let (o, inv) = (optr, iptr); // copies in registers (through the captured reference they reload)
            #[allow(clippy::needless_range_loop)] // s is both the slot written and the index read
            for s in task * rpt * k..((task + 1) * rpt * k).min(n) {
                let b = ids[s] as usize;
                let p = cur[b];
                cur[b] += 1;
                // SAFETY: each (expert, task) owns a disjoint range of positions, p < n; s is this task's.
                unsafe {
                    o.prefetch_write(p + SCATTER_AHEAD);
                    o.write(p, s as i64);
                    inv.write(s, p as i64);
                }
            }
        });
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(e: usize, k: usize) -> Gate {
        Gate { n_experts: e, k, score: ScoreFn::Identity, n_groups: 1, topk_groups: 1, group_mode: GroupMode::Max, normalize: false, scale: 1.0 }
    }

    #[test]
    fn topk_ties_go_to_lower_index() {
        let x = [1.0f32, 3.0, 3.0, -0.0, 0.0, 3.0];
        let (mut ids, mut sel, mut w) = (vec![0; 4], vec![0.0; 4], vec![0.0; 4]);
        route_topk(&x, None, &gate(6, 4), &mut ids, &mut sel, &mut w).unwrap();
        assert_eq!(ids, vec![1, 2, 5, 0]);
    }

    #[test]
    fn softmax_matches_std_exp() {
        let x: Vec<f32> = (0..300).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.37).collect();
        for &v in &x {
            let a = exp_nonpos_f32(v - 20.0);
            let b = (v - 20.0).exp();
            assert!((a - b).abs() <= 4e-7 * b.max(1e-38), "{v}: {a} vs {b}");
        }
        assert_eq!(exp_nonpos_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpos_f32(0.0), 1.0);
    }

    #[test]
    fn groups_limit_the_choice() {
        let mut g = gate(4, 2);
        g.n_groups = 2;
        g.topk_groups = 1;
        let x = [0.9f32, 0.1, 0.5, 0.6];
        let (mut ids, mut sel, mut w) = (vec![0; 2], vec![0.0; 2], vec![0.0; 2]);
        route_topk(&x, None, &g, &mut ids, &mut sel, &mut w).unwrap();
        assert_eq!(ids, vec![0, 1]);
        g.group_mode = GroupMode::Top2;
        route_topk(&x, None, &g, &mut ids, &mut sel, &mut w).unwrap();
        assert_eq!(ids, vec![3, 2]);
    }

    #[test]
    fn bad_gates_are_errors() {
        let x = [0.0f32; 4];
        let (mut ids, mut sel, mut w) = (vec![0; 8], vec![0.0; 8], vec![0.0; 8]);
        assert!(route_topk(&x, None, &gate(4, 5), &mut ids, &mut sel, &mut w).is_err());
        let nan = [f32::NAN, 0.0, 0.0, 0.0];
        let (mut ids, mut sel, mut w) = (vec![0; 1], vec![0.0; 1], vec![0.0; 1]);
        assert_eq!(route_topk(&nan, None, &gate(4, 1), &mut ids, &mut sel, &mut w), Err(CoreError::NanInput { arg: "logits" }));
    }

    fn tables(ids: &[i64], e: usize, cap: Option<usize>, policy: DropPolicy, prio: Option<&[f32]>) -> (Vec<i64>, Vec<i64>, Vec<i64>, Vec<bool>) {
        let n = ids.len();
        let (mut o, mut inv, mut c, mut off, mut k) = (vec![0; n], vec![0; n], vec![0; e], vec![0; e + 1], vec![false; n]);
        route_tables(ids, e, cap, policy, prio, &mut o, &mut inv, &mut c, &mut off, &mut k).unwrap();
        for (p, &s) in o.iter().enumerate() {
            assert_eq!(inv[s as usize], p as i64);
        }
        (o, c, off, k)
    }

    #[test]
    fn counting_sort_is_stable_and_large() {
        let ids: Vec<i64> = (0..200_000).map(|i| (i * 7919 % 13) as i64).collect();
        let (o, c, off, _) = tables(&ids, 13, None, DropPolicy::Position, None);
        let mut want: Vec<i64> = (0..ids.len() as i64).collect();
        want.sort_by_key(|&s| ids[s as usize]);
        assert_eq!(o, want);
        assert_eq!(off[13], ids.len() as i64);
        assert_eq!(c.iter().sum::<i64>(), ids.len() as i64);
    }

    #[test]
    fn capacity_drops() {
        let ids = [0i64, 0, 0, 1, 0];
        let prio = [0.1f32, 0.5, 0.5, 0.2, 0.9];
        let (o, c, off, k) = tables(&ids, 2, Some(2), DropPolicy::Position, None);
        assert_eq!((o, c, off, k), (vec![0, 1, 3, 2, 4], vec![2, 1], vec![0, 2, 3], vec![true, true, false, true, false]));
        let (o, c, _, _) = tables(&ids, 2, Some(2), DropPolicy::Probs, Some(&prio));
        assert_eq!((o, c), (vec![1, 4, 3, 0, 2], vec![2, 1]));
    }

    #[test]
    fn simd_kernels_equal_portable_kernel() {
        // ties, -inf, near-equal values, every score function, with and without bias and groups
        let rows = 200;
        // spread 40: logits 160 apart, so the softmax bound's numerator underflows (the all-candidates path)
        for &(e, k, groups, spread) in &[(256usize, 8usize, 1usize, 1.0f32), (256, 3, 1, 1.0), (64, 8, 8, 1.0), (48, 1, 1, 1.0),
            (33, 8, 1, 1.0), (40, 12, 1, 1.0), (256, 8, 1, 40.0), (47, 5, 1, 40.0)]  // fmt: skip
        {
            let x: Vec<f32> = (0..rows * e)
                .map(|i| match i % 97 {
                    0 => f32::NEG_INFINITY,
                    r if r < 40 => ((i * 7919 % 9) as f32 - 4.0) * 0.5 * spread,
                    _ => ((i * 2_654_435_761usize % 100_003) as f32 / 100_003.0 - 0.5) * 8.0 * spread,
                })
                .collect();
            let bias: Vec<f32> = (0..e).map(|i| (i % 5) as f32 * 0.01).collect();
            for score in [ScoreFn::Softmax, ScoreFn::Sigmoid, ScoreFn::Identity] {
                for b in [None, Some(&bias[..])] {
                    let mut g = gate(e, k);
                    g.score = score;
                    g.n_groups = groups;
                    g.topk_groups = if groups > 1 { 3 } else { 1 };
                    g.normalize = b.is_some();
                    let n = rows * k;
                    let run = |level: u8| {
                        let (mut i, mut s, mut w, mut h) = (vec![0; n], vec![0.0f32; n], vec![0.0f32; n], vec![0usize; e]);
                        let mut buf = fast::Bufs::new(&g);
                        let ok = fast::rows(&x, b, &g, &mut buf, &mut i, &mut s, &mut w, Some(&mut h), level);
                        (ok, i, s.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), w.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), h)
                    };
                    let want = run(0);
                    assert!(want.0 || score == ScoreFn::Softmax);
                    for level in 1..=fast::simd_level() {
                        assert_eq!(run(level), want, "{level}: {e} {k} {groups} {spread} {score:?} {}", b.is_some());
                    }
                    // and the generic kernel picks the same experts
                    let (mut i0, mut s0, mut w0) = (vec![0; n], vec![0.0f32; n], vec![0.0f32; n]);
                    assert_eq!(rows_generic(&x, b, &g, &mut i0, &mut s0, &mut w0, None), want.0);
                    if want.0 {
                        assert_eq!(i0, want.1, "{e} {k} {groups} {score:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn fused_plan_equals_topk_then_tables() {
        // rows with ties, -inf and both score functions; E not a multiple of the lane width
        for &(e, k) in &[(37usize, 5usize), (256, 8), (16, 16), (40, 1), (7, 3)] {
            let rows = 300;
            let x: Vec<f32> = (0..rows * e).map(|i| ((i * 7919 % 23) as f32 - 11.0) * 0.25).collect();
            for score in [ScoreFn::Softmax, ScoreFn::Sigmoid, ScoreFn::Identity] {
                let mut g = gate(e, k);
                g.score = score;
                let n = rows * k;
                let (mut i1, mut s1, mut w1) = (vec![0; n], vec![0.0f32; n], vec![0.0f32; n]);
                route_topk(&x, None, &g, &mut i1, &mut s1, &mut w1).unwrap();
                // the generic kernel is the reference for the vectorised float32 one
                let (mut i0, mut s0, mut w0) = (vec![0; n], vec![0.0f32; n], vec![0.0f32; n]);
                assert!(rows_generic(&x, None, &g, &mut i0, &mut s0, &mut w0, None));
                assert_eq!(i0, i1, "{e} {k} {score:?}");
                let (o0, c0, off0, k0) = tables(&i1, e, None, DropPolicy::Position, None);
                let (mut o, mut inv, mut c, mut off, mut kp) = (vec![0; n], vec![0; n], vec![0; e], vec![0; e + 1], vec![false; n]);
                let (mut i2, mut s2, mut w2) = (vec![0; n], vec![0.0f32; n], vec![0.0f32; n]);
                route_plan(&x, None, &g, None, DropPolicy::Probs, &mut i2, &mut s2, &mut w2, &mut o, &mut inv, &mut c, &mut off, &mut kp).unwrap();
                assert_eq!((i2, s2, w2), (i1, s1, w1));
                assert_eq!((o.clone(), c, off, kp), (o0, c0, off0, k0));
                for (p, &sl) in o.iter().enumerate() {
                    assert_eq!(inv[sl as usize], p as i64);
                }
            }
        }
    }
}
