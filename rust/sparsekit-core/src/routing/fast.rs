//! The float32 gate kernel: one row at a time, everything in L1, written as fixed-width lane loops so
//! LLVM vectorises them, and compiled three times (baseline x86-64; AVX2 with an intrinsic top-k;
//! AVX-512 with 16-lane score loops, bound and ranking, and an intrinsic exp) behind a runtime check
//! (`SPARSEKIT_SIMD=0|1` caps it). All builds compute the scores with the same IEEE operations in the
//! same order (Rust never contracts `a*b+c` on its own; the exp's multiply-adds are written as fused
//! `mul_add`, one rounding each, which the SIMD builds run as FMA instructions and the portable x86-64
//! build as libm's correctly rounded `fmaf`, slower but equal) and pick the same top-k, so the answer
//! does not depend on the CPU (tested: each wider path against the portable one).
//!
//! Per row: scores (softmax: max, exp, 16-lane sum, divide; sigmoid through `exp(-|x|)` so only the
//! branch-free `exp` of a non-positive argument is needed), the bias for the choice, then top-k. The
//! AVX2 top-k (k <= 8) first takes a lower bound, the k-th largest of 16 lane maxima (k elements are
//! at or above it, so the k-th largest element is too); only the few elements >= the bound reach a
//! sorted 8-entry list kept in two registers, inserted without branches. Softmax without a bias or
//! groups does the whole row in two passes over the logits: the maximum (with 16 lane maxima, whose
//! k-th largest bounds the k-th logit), then `exp(x - max)` summed and, in the same loop, packed as a
//! candidate when at or above the bound's numerator less a margin (exp's rounding and the division by
//! the row sum cannot merge a non-candidate with the k-th score); only candidates are divided, and the
//! numerators are never stored.

use super::{choose_groups, exp_nonpos_f32, push_top, Gate, ScoreFn};

/// Lanes of the row loops (two AVX2 registers).
const LANES: usize = 16;

/// Rows ahead whose logits are prefetched while a row is routed: the rows stream in from memory at
/// about the rate the kernel consumes them, and without the hint the row maximum stalled on each
/// (T=262144, E=256, k=8: 66 -> 57 ms; 2 to 8 rows ahead measure the same).
const PREFETCH_ROWS: usize = 4;

/// The 16 lane maxima of `x` (its first `len - len % 16` elements) and the row maximum (NaN ignored).
#[inline(always)]
fn row_max(x: &[f32]) -> ([f32; LANES], f32) {
    let full = x.len() - x.len() % LANES;
    let mx = lane_max(x);
    let mut m = f32::NEG_INFINITY;
    for &v in mx.iter().chain(&x[full..]) {
        m = if v > m { v } else { m };
    }
    (mx, m)
}

/// Softmax numerators `e = exp(x - max)` into `s` and their 16-lane-ordered sum `z`. `z` is NaN for NaN logits, `+inf`, or an all `-inf` row.
#[inline(always)]
fn softmax_numerators(x: &[f32], s: &mut [f32]) -> f32 {
    let e = x.len();
    let full = e - e % LANES;
    let (_, m) = row_max(x);
    let mut zs = [0.0f32; LANES];
    for (sc, xc) in s[..full].chunks_exact_mut(LANES).zip(x[..full].chunks_exact(LANES)) {
        for i in 0..LANES {
            let v = exp_nonpos_f32(xc[i] - m);
            sc[i] = v;
            zs[i] += v;
        }
    }
    let mut z = 0.0f32;
    for &v in &zs {
        z += v;
    }
    for (d, &v) in s[full..].iter_mut().zip(&x[full..]) {
        *d = exp_nonpos_f32(v - m);
        z += *d;
    }
    z
}

/// Scores of one row into `s`; false when one of them is NaN (NaN logits, `+inf` or an all `-inf` row
/// under softmax).
#[inline(always)]
fn scores(x: &[f32], score: ScoreFn, s: &mut [f32]) -> bool {
    let e = x.len();
    let full = e - e % LANES;
    match score {
        ScoreFn::Softmax => {
            let z = softmax_numerators(x, s);
            if z.is_nan() {
                return false;
            }
            for v in s.iter_mut() {
                *v /= z;
            }
            true
        }
        ScoreFn::Sigmoid => {
            let mut acc = [0.0f32; LANES];
            for (sc, xc) in s[..full].chunks_exact_mut(LANES).zip(x[..full].chunks_exact(LANES)) {
                for i in 0..LANES {
                    let v = sigmoid(xc[i]);
                    sc[i] = v;
                    acc[i] += v;
                }
            }
            let mut t = 0.0f32;
            for &v in &acc {
                t += v;
            }
            for (d, &v) in s[full..].iter_mut().zip(&x[full..]) {
                *d = sigmoid(v);
                t += *d;
            }
            !t.is_nan() // scores lie in [0, 1]: the sum is NaN exactly when one is
        }
        ScoreFn::Identity => {
            s.copy_from_slice(x);
            let mut nan = false;
            for &v in x {
                nan |= v.is_nan();
            }
            !nan
        }
    }
}

/// `1 / (1 + e^-x)` from `e = exp(-|x|)` alone: `1/(1+e)` for x >= 0, `e/(1+e)` below (NaN stays NaN).
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    let e = exp_nonpos_f32(-x.abs());
    let num = if x >= 0.0 { 1.0 } else { e };
    num / (1.0 + e)
}

/// Portable top-k of `c` into `best` (descending, ties to the lower index, no NaN): the k-th best so
/// far kept in a register, so most elements fail one compare.
#[inline(always)]
fn topk_scan(c: &[f32], best: &mut [(f32, usize)]) {
    let k = best.len();
    let mut len = 0usize;
    let mut thr = f32::NEG_INFINITY;
    for (j, &v) in c.iter().enumerate() {
        if len < k || v > thr {
            push_top(best, &mut len, v, j);
            if len == k {
                thr = best[k - 1].0;
            }
        }
    }
}

/// 16 lane maxima of `c` (its first `len - len % 16` elements).
#[inline(always)]
fn lane_max(c: &[f32]) -> [f32; LANES] {
    let full = c.len() - c.len() % LANES;
    let mut lm = [f32::NEG_INFINITY; LANES];
    for ch in c[..full].chunks_exact(LANES) {
        for i in 0..LANES {
            lm[i] = if ch[i] > lm[i] { ch[i] } else { lm[i] };
        }
    }
    lm
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! Every function here carries the AVX2 feature itself, so LLVM inlines the intrinsics into it and
    //! it into `rows_avx2` (no closures: they would not inherit the feature).
    use std::arch::x86_64::*;

    /// `pack[m]`: the lane numbers of the set bits of `m`, in order (an 8-lane compress by permute).
    static PACK: [[u8; 8]; 256] = {
        let mut t = [[0u8; 8]; 256];
        let mut m = 0;
        while m < 256 {
            let (mut n, mut b) = (0, 0);
            while b < 8 {
                if m & (1 << b) != 0 {
                    t[m][n] = b as u8;
                    n += 1;
                }
                b += 1;
            }
            m += 1;
        }
        t
    };

    /// The k-th largest (`k <= 16`) of the 16 lane maxima: the least one with fewer than k above it.
    #[target_feature(enable = "avx2,fma,popcnt")]
    #[inline]
    pub unsafe fn kth16(lm: &[f32; 16], k: usize) -> f32 {
        // SAFETY: loads of the two halves of a 16-element array
        let (a, b) = unsafe { (_mm256_loadu_ps(lm.as_ptr()), _mm256_loadu_ps(lm.as_ptr().add(8))) };
        let mut bound = f32::INFINITY;
        for &v in lm {
            let vv = _mm256_set1_ps(v);
            let above = (_mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(a, vv)) as u32).count_ones()
                + (_mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(b, vv)) as u32).count_ones();
            let c = if (above as usize) < k { v } else { f32::INFINITY };
            bound = if c < bound { c } else { bound };
        }
        bound
    }

    /// Top `k <= 8` of the candidates `c[j] >= bound`, ties to the lower index; `(index, key)` into
    /// `out[..k]`. The candidates are packed without branches (compare, mask, permute by table) into
    /// `cv` / `ci` (length >= c.len() + 8), then ranked by [`rank8`].
    #[target_feature(enable = "avx2,fma,popcnt")]
    #[inline]
    pub unsafe fn topk8(c: &[f32], bound: f32, cv: &mut [f32], ci: &mut [i32], out: &mut [(usize, f32)]) {
        let full = c.len() - c.len() % 8;
        assert!(cv.len() >= c.len() + 8 && ci.len() >= c.len() + 8);
        let bv = _mm256_set1_ps(bound);
        let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mut nc = 0usize;
        let mut b = 0;
        while b < full {
            // SAFETY: b + 8 <= full <= c.len(); nc <= b, so nc + 8 <= c.len() + 8 <= cv.len(), ci.len()
            unsafe {
                let x = _mm256_loadu_ps(c.as_ptr().add(b));
                let m = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(x, bv)) as usize;
                let perm = _mm256_cvtepu8_epi32(_mm_loadl_epi64(PACK[m].as_ptr() as *const __m128i));
                _mm256_storeu_ps(cv.as_mut_ptr().add(nc), _mm256_permutevar8x32_ps(x, perm));
                let idx = _mm256_add_epi32(iota, _mm256_set1_epi32(b as i32));
                _mm256_storeu_si256(ci.as_mut_ptr().add(nc) as *mut __m256i, _mm256_permutevar8x32_epi32(idx, perm));
                nc += m.count_ones() as usize;
            }
            b += 8;
        }
        for (j, &v) in c.iter().enumerate().skip(full) {
            cv[nc] = v;
            ci[nc] = j as i32;
            nc += (v >= bound) as usize;
        }
        // SAFETY: AVX2 is enabled here
        unsafe { rank8(cv, ci, nc, None, out) }
    }

    /// Softmax numerators of one row fused with the candidate pass: `z`, summed exactly as
    /// `softmax_numerators` sums it (16 lanes, the lane sums, then the tail), and the numerators `>= lo`
    /// packed with their indices into `cv` / `ci` (length >= x.len() + 8) in index order; the row's
    /// numerators are never stored. Returns `(z, candidates)`.
    ///
    /// # Safety
    /// The CPU must have AVX2 (callers are the AVX2 / AVX-512 builds, into which this inlines).
    #[inline(always)]
    /// `WIDE`: pack 16 lanes at once with AVX-512 compress (the CPU must have AVX-512F).
    pub unsafe fn softmax_candidates<const WIDE: bool>(x: &[f32], m: f32, lo: f32, cv: &mut [f32], ci: &mut [i32]) -> (f32, usize) {
        let e = x.len();
        let full = e - e % super::LANES;
        assert!(cv.len() >= e + 8 && ci.len() >= e + 8);
        // SAFETY (every block below): AVX2 per the contract; a store of 8 at nc <= 16 * b + 8 * h fits,
        // since nc + 8 <= full <= e < cv.len(), ci.len()
        let (bv, iota) = unsafe { (_mm256_set1_ps(lo), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)) };
        let mut zs = [0.0f32; super::LANES];
        let mut nc = 0usize;
        if WIDE {
            // SAFETY: AVX-512F per the contract
            let (mv, lov, sixteen) = unsafe { (_mm512_set1_ps(m), _mm512_set1_ps(lo), _mm512_set1_epi32(super::LANES as i32)) };
            // SAFETY: as above
            let (mut zv, mut idx) = unsafe { (_mm512_setzero_ps(), iota16()) };
            for xc in x[..full].chunks_exact(super::LANES) {
                // SAFETY: AVX-512F per the contract; a load of 16 from a 16-chunk; 16 stored at
                // nc <= 16 * chunk, so nc + 16 <= full <= cv.len(), ci.len()
                unsafe {
                    // the line PREFETCH_ROWS rows ahead (a hint: past the end is never dereferenced)
                    _mm_prefetch::<_MM_HINT_T0>(xc.as_ptr().wrapping_add(super::PREFETCH_ROWS * e) as *const i8);
                    let y = super::avx512::exp16(_mm512_sub_ps(_mm512_loadu_ps(xc.as_ptr()), mv));
                    zv = _mm512_add_ps(zv, y);
                    let msk = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(y, lov);
                    _mm512_storeu_ps(cv.as_mut_ptr().add(nc), _mm512_maskz_compress_ps(msk, y));
                    _mm512_storeu_si512(ci.as_mut_ptr().add(nc) as *mut _, _mm512_maskz_compress_epi32(msk, idx));
                    idx = _mm512_add_epi32(idx, sixteen);
                    nc += msk.count_ones() as usize;
                }
            }
            // SAFETY: a store of 16 into a 16-element array
            unsafe { _mm512_storeu_ps(zs.as_mut_ptr(), zv) };
        } else {
            for (b, xc) in x[..full].chunks_exact(super::LANES).enumerate() {
                let mut v = [0.0f32; super::LANES];
                for i in 0..super::LANES {
                    v[i] = super::exp_nonpos_f32(xc[i] - m);
                    zs[i] += v[i];
                }
                for h in 0..2 {
                    unsafe {
                        let y = _mm256_loadu_ps(v.as_ptr().add(8 * h));
                        let msk = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(y, bv)) as usize;
                        let perm = _mm256_cvtepu8_epi32(_mm_loadl_epi64(PACK[msk].as_ptr() as *const __m128i));
                        _mm256_storeu_ps(cv.as_mut_ptr().add(nc), _mm256_permutevar8x32_ps(y, perm));
                        let idx = _mm256_add_epi32(iota, _mm256_set1_epi32((b * super::LANES + 8 * h) as i32));
                        _mm256_storeu_si256(ci.as_mut_ptr().add(nc) as *mut __m256i, _mm256_permutevar8x32_epi32(idx, perm));
                        nc += msk.count_ones() as usize;
                    }
                }
            }
        }
        let mut z = 0.0f32;
        for &v in &zs {
            z += v;
        }
        for (j, &xv) in x.iter().enumerate().skip(full) {
            let v = super::exp_nonpos_f32(xv - m);
            z += v;
            cv[nc] = v;
            ci[nc] = j as i32;
            nc += (v >= lo) as usize;
        }
        (z, nc)
    }

    /// 0, 1, ..., 15 (AVX-512F).
    #[inline(always)]
    unsafe fn iota16() -> __m512i {
        // SAFETY: AVX-512F per the caller's contract
        unsafe { _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15) }
    }

    /// Top `k = out.len() <= 8` of the `nc` packed candidates `cv` / `ci` (index order), ranked by
    /// `cv / z` (`div = Some(z)`) or `cv`, ties to the lower index; `cv.len() >= 32`. Up to 32
    /// candidates are ranked all-against-all (rank = keys above + equal keys at lower indices), more
    /// fall back to an insertion list.
    #[target_feature(enable = "avx2,fma,popcnt")]
    #[inline]
    pub unsafe fn rank8(cv: &mut [f32], ci: &[i32], nc: usize, div: Option<f32>, out: &mut [(usize, f32)]) {
        let k = out.len();
        assert!(cv.len() >= 32 && ci.len() >= nc && k <= 8);
        if let Some(z) = div {
            for v in cv[..nc].iter_mut() {
                *v /= z;
            }
        }
        if nc <= 32 {
            // pad to 32 with -inf at indices past every candidate: they never outrank one
            cv[nc..32].fill(f32::NEG_INFINITY);
            // SAFETY: 32 <= cv.len(), asserted above
            let keys = unsafe {
                [
                    _mm256_loadu_ps(cv.as_ptr()),
                    _mm256_loadu_ps(cv.as_ptr().add(8)),
                    _mm256_loadu_ps(cv.as_ptr().add(16)),
                    _mm256_loadu_ps(cv.as_ptr().add(24)),
                ]
            };
            let mut slots = [(0usize, 0.0f32); 9]; // slot 8 takes every rank >= k
            for t in 0..nc {
                let vv = _mm256_set1_ps(cv[t]);
                let mut rank = 0u32;
                for (q, &kq) in keys.iter().enumerate() {
                    let gt = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(kq, vv)) as u32;
                    let eq = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(kq, vv)) as u32;
                    // equal keys count when they sit at an earlier candidate position (lower index)
                    let before = if t >= 8 * (q + 1) { 0xFF } else if t <= 8 * q { 0 } else { (1u32 << (t - 8 * q)) - 1 };
                    rank += (gt | (eq & before)).count_ones();
                }
                let r = (rank as usize).min(8);
                slots[if r < k { r } else { 8 }] = (ci[t] as usize, cv[t]);
            }
            out.copy_from_slice(&slots[..k]);
        } else {
            let mut best = [(0.0f32, 0usize); 8];
            let mut len = 0usize;
            for t in 0..nc {
                super::push_top(&mut best[..k], &mut len, cv[t], ci[t] as usize);
            }
            for (o, &(v, j)) in out.iter_mut().zip(&best[..k]) {
                *o = (j, v);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! AVX-512 forms of the AVX2 bound and ranking (same answers: they count the same comparisons),
    //! one 16-lane compare and a mask popcount where the AVX2 forms need two halves and movemasks.
    use std::arch::x86_64::*;

    /// [`super::avx2::kth16`]: for every lane at once, how many lanes are above it (15 rotations), then
    /// the least lane value with fewer than k above it.
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,popcnt")]
    #[inline]
    pub unsafe fn kth16(lm: &[f32; 16], k: usize) -> f32 {
        // SAFETY: a load of a 16-element array
        let v = unsafe { _mm512_loadu_ps(lm.as_ptr()) };
        let one = _mm512_set1_epi32(1);
        let mut above = _mm512_setzero_si512();
        let mut rot = _mm512_setr_epi32(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0);
        for _ in 0..15 {
            let r = _mm512_permutexvar_ps(rot, v);
            above = _mm512_mask_add_epi32(above, _mm512_cmp_ps_mask::<_CMP_GT_OQ>(r, v), above, one);
            rot = _mm512_and_si512(_mm512_add_epi32(rot, one), _mm512_set1_epi32(15));
        }
        let ok = _mm512_cmplt_epi32_mask(above, _mm512_set1_epi32(k as i32));
        _mm512_mask_reduce_min_ps(ok, v)
    }

    /// [`super::row_max`] with four independent accumulators and a log-depth reduction (the lane maxima
    /// and the maximum are the same values: no lane holds NaN, `max_ps(v, acc)` keeps `acc` for a NaN `v`).
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,popcnt")]
    #[inline]
    pub unsafe fn row_max(x: &[f32]) -> ([f32; 16], f32) {
        let full = x.len() - x.len() % 16;
        let quad = x.len() - x.len() % 64;
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        let (mut a0, mut a1, mut a2, mut a3) = (ninf, ninf, ninf, ninf);
        for ch in x[..quad].chunks_exact(64) {
            // SAFETY: loads of 16 inside a 64-chunk
            unsafe {
                a0 = _mm512_max_ps(_mm512_loadu_ps(ch.as_ptr()), a0);
                a1 = _mm512_max_ps(_mm512_loadu_ps(ch.as_ptr().add(16)), a1);
                a2 = _mm512_max_ps(_mm512_loadu_ps(ch.as_ptr().add(32)), a2);
                a3 = _mm512_max_ps(_mm512_loadu_ps(ch.as_ptr().add(48)), a3);
            }
        }
        for ch in x[quad..full].chunks_exact(16) {
            // SAFETY: a load of 16 from a 16-chunk
            a0 = _mm512_max_ps(unsafe { _mm512_loadu_ps(ch.as_ptr()) }, a0);
        }
        let lm = _mm512_max_ps(_mm512_max_ps(a0, a1), _mm512_max_ps(a2, a3));
        let mut m = _mm512_reduce_max_ps(lm);
        for &v in &x[full..] {
            m = if v > m { v } else { m };
        }
        let mut out = [0.0f32; 16];
        // SAFETY: a store of 16 into a 16-element array
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), lm) };
        (out, m)
    }

    /// [`super::super::exp_nonpos_f32`] on 16 lanes, the same operations (so the same bits): rounding
    /// by `roundscale`, and the final `p * 2^n` in one `scalef` (one rounding, as the split product).
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,popcnt")]
    #[inline]
    pub unsafe fn exp16(x: __m512) -> __m512 {
        // max(-104, x) with NaN kept: `max_ps(a, b)` is `a > b ? a : b`, so a NaN `x` passes
        let x = _mm512_max_ps(_mm512_set1_ps(-104.0), x);
        let t = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_fmadd_ps(r, _mm512_set1_ps(0.001_388_89), _mm512_set1_ps(0.008_333_99));
        p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.041_666_52));
        p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.166_666_57));
        p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.5));
        p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(1.0));
        p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(1.0));
        _mm512_scalef_ps(p, n)
    }

    /// [`super::avx2::rank8`] with the (at most 32) keys in two zmm registers.
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,popcnt")]
    #[inline]
    pub unsafe fn rank8(cv: &mut [f32], ci: &[i32], nc: usize, div: Option<f32>, out: &mut [(usize, f32)]) {
        let k = out.len();
        assert!(cv.len() >= 32 && ci.len() >= nc && k <= 8);
        if nc > 32 {
            // SAFETY: AVX2 is enabled here (the insertion-list fallback)
            return unsafe { super::avx2::rank8(cv, ci, nc, div, out) };
        }
        cv[nc..32].fill(f32::NEG_INFINITY);
        // SAFETY: 32 <= cv.len(), asserted above
        let (mut k0, mut k1) = unsafe { (_mm512_loadu_ps(cv.as_ptr()), _mm512_loadu_ps(cv.as_ptr().add(16))) };
        if let Some(z) = div {
            // the same IEEE division per candidate as the scalar loop, 16 at a time (-inf padding stays -inf)
            let zv = _mm512_set1_ps(z);
            (k0, k1) = (_mm512_div_ps(k0, zv), _mm512_div_ps(k1, zv));
            // SAFETY: as above
            unsafe {
                _mm512_storeu_ps(cv.as_mut_ptr(), k0);
                _mm512_storeu_ps(cv.as_mut_ptr().add(16), k1);
            }
        }
        let mut slots = [(0usize, 0.0f32); 9]; // slot 8 takes every rank >= k
        if nc <= 16 {
            // the usual case (about 10 candidates for k = 8 of 256 normal logits): one register of keys
            for t in 0..nc {
                let vv = _mm512_set1_ps(cv[t]);
                let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(k0, vv) as u32;
                let eq = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(k0, vv) as u32;
                let before = (1u32 << t).wrapping_sub(1);
                let r = ((gt | (eq & before)).count_ones() as usize).min(8);
                slots[if r < k { r } else { 8 }] = (ci[t] as usize, cv[t]);
            }
            out.copy_from_slice(&slots[..k]);
            return;
        }
        for t in 0..nc {
            let vv = _mm512_set1_ps(cv[t]);
            let gt = (_mm512_cmp_ps_mask::<_CMP_GT_OQ>(k0, vv) as u32) | ((_mm512_cmp_ps_mask::<_CMP_GT_OQ>(k1, vv) as u32) << 16);
            let eq = (_mm512_cmp_ps_mask::<_CMP_EQ_OQ>(k0, vv) as u32) | ((_mm512_cmp_ps_mask::<_CMP_EQ_OQ>(k1, vv) as u32) << 16);
            // equal keys count when they sit at an earlier candidate position (lower index)
            let before = (1u32 << t).wrapping_sub(1);
            let r = ((gt | (eq & before)).count_ones() as usize).min(8);
            slots[if r < k { r } else { 8 }] = (ci[t] as usize, cv[t]);
        }
        out.copy_from_slice(&slots[..k]);
    }
}

/// Scratch of one task.
pub(super) struct Bufs {
    pub scores: Vec<f32>,
    pub choice: Vec<f32>,
    pub best: Vec<(f32, usize)>,
    pub groups: Vec<(f32, usize)>,
    pub allowed: Vec<bool>,
    pub cv: Vec<f32>,
    pub ci: Vec<i32>,
}

impl Bufs {
    pub fn new(g: &Gate) -> Self {
        Bufs {
            scores: vec![0.0; g.n_experts],
            choice: vec![0.0; g.n_experts],
            best: vec![(0.0, 0); g.k],
            groups: vec![(0.0, 0); g.topk_groups],
            allowed: vec![false; g.n_groups],
            cv: vec![0.0; g.n_experts + 8],
            ci: vec![0; g.n_experts + 8],
        }
    }
}

/// Write one row's outputs from `best` (its chosen experts and their unbiased scores `sv`).
#[inline(always)]
fn emit(g: &Gate, best: &[(usize, f32)], ids: &mut [i64], sel: &mut [f32], w: &mut [f32], hist: Option<&mut [usize]>) {
    let scale = g.scale as f32;
    let mut total = 0.0f32;
    for (j, &(ex, sv)) in best.iter().enumerate() {
        ids[j] = ex as i64;
        sel[j] = sv;
        total += sv;
    }
    // from `best`, not read back from `sel`: a vector load of the scalar stores just made would stall
    for (wj, &(_, v)) in w.iter_mut().zip(best) {
        *wj = if g.normalize { v / total } else { v } * scale;
    }
    if let Some(h) = hist {
        for &(ex, _) in best {
            h[ex] += 1;
        }
    }
}

/// Route the rows of `x` (`rows * E`), writing `ids`, `sel`, `w` (`rows * k`) and adding each chosen
/// expert to `hist` (when given). False when a row's scores hold a NaN. `AVX2`: use the intrinsic top-k
/// (the caller is compiled with AVX2).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows_impl<const AVX2: bool, const AVX512: bool>(
    x: &[f32],
    bias: Option<&[f32]>,
    g: &Gate,
    buf: &mut Bufs,
    ids: &mut [i64],
    sel: &mut [f32],
    w: &mut [f32],
    mut hist: Option<&mut [usize]>,
) -> bool {
    let e = g.n_experts;
    let k = g.k;
    let fast_topk = AVX2 && cfg!(target_arch = "x86_64") && k <= 8 && e >= 2 * LANES && g.n_groups == 1;
    let mut pairs = [(0usize, 0.0f32); 8];
    for (r, xr) in x.chunks_exact(e).enumerate() {
        let o = r * k..(r + 1) * k;
        let s = &mut buf.scores[..];
        #[cfg(target_arch = "x86_64")]
        if fast_topk && g.score == ScoreFn::Softmax && bias.is_none() {
            if !AVX512 {
                // SAFETY: prefetch is a hint; the address may lie past the end (never dereferenced)
                unsafe {
                    use std::arch::x86_64::*;
                    let nx = xr.as_ptr().wrapping_add(PREFETCH_ROWS * e) as *const i8;
                    for l in (0..e * 4).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(nx.wrapping_add(l));
                    }
                }
            }
            // One pass over the numerators, which are never stored: the bound comes from the logits. At
            // least k logits are >= bx (the k-th largest lane maximum), so the k-th largest numerator is
            // >= exp(bx - m) up to exp's ~1 ulp error each way; lo sits 2^-18 below that, so a numerator
            // under lo divides to a score strictly below the k-th (no candidate lost, ties kept).
            // SAFETY: AVX-512 is enabled in the AVX512 build
            let (mx, m) = if AVX512 { unsafe { avx512::row_max(xr) } } else { row_max(xr) };
            // SAFETY: AVX2 is enabled in this build (AVX2 = true only inside rows_avx2 / rows_avx512)
            let bx = unsafe { if AVX512 { avx512::kth16(&mx, k) } else { avx2::kth16(&mx, k) } };
            let be = exp_nonpos_f32(bx - m);
            let lo = if be >= 1e-20 { be * (1.0 - 1.0 / 262_144.0) } else { 0.0 };
            // SAFETY: as above
            let (z, nc) = unsafe { avx2::softmax_candidates::<AVX512>(xr, m, lo, &mut buf.cv, &mut buf.ci) };
            if z.is_nan() {
                return false;
            }
            // SAFETY: as above
            unsafe {
                if AVX512 {
                    avx512::rank8(&mut buf.cv, &buf.ci, nc, Some(z), &mut pairs[..k])
                } else {
                    avx2::rank8(&mut buf.cv, &buf.ci, nc, Some(z), &mut pairs[..k])
                }
            };
            emit(g, &pairs[..k], &mut ids[o.clone()], &mut sel[o.clone()], &mut w[o], hist.as_deref_mut());
            continue;
        }
        if !scores(xr, g.score, s) {
            return false;
        }
        let choice: &[f32] = match bias {
            Some(b) => {
                for ((c, &v), &bv) in buf.choice.iter_mut().zip(s.iter()).zip(b) {
                    *c = v + bv;
                }
                &buf.choice
            }
            None => s,
        };
        #[cfg(target_arch = "x86_64")]
        if fast_topk {
            // SAFETY: as above
            let bound = unsafe { if AVX512 { avx512::kth16(&lane_max(choice), k) } else { avx2::kth16(&lane_max(choice), k) } };
            // SAFETY: as above
            unsafe { avx2::topk8(choice, bound, &mut buf.cv, &mut buf.ci, &mut pairs[..k]) };
            for p in pairs[..k].iter_mut() {
                p.1 = s[p.0]; // the weight comes from the unbiased score
            }
            emit(g, &pairs[..k], &mut ids[o.clone()], &mut sel[o.clone()], &mut w[o], hist.as_deref_mut());
            continue;
        }
        let best = &mut buf.best[..k];
        if g.n_groups > 1 {
            choose_groups(choice, g, &mut buf.groups, &mut buf.allowed, best);
        } else {
            topk_scan(choice, best);
        }
        let (ids_r, sel_r, w_r) = (&mut ids[o.clone()], &mut sel[o.clone()], &mut w[o]);
        let scale = g.scale as f32;
        let mut total = 0.0f32;
        for (j, &(_, ex)) in best.iter().enumerate() {
            ids_r[j] = ex as i64;
            sel_r[j] = s[ex];
            total += s[ex];
        }
        for j in 0..k {
            let v = sel_r[j];
            w_r[j] = if g.normalize { v / total } else { v } * scale;
        }
        if let Some(h) = hist.as_deref_mut() {
            for &(_, ex) in best.iter() {
                h[ex] += 1;
            }
        }
    }
    true
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,popcnt")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_avx2(
    x: &[f32],
    bias: Option<&[f32]>,
    g: &Gate,
    buf: &mut Bufs,
    ids: &mut [i64],
    sel: &mut [f32],
    w: &mut [f32],
    hist: Option<&mut [usize]>,
) -> bool {
    rows_impl::<true, false>(x, bias, g, buf, ids, sel, w, hist)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,popcnt")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_avx512(
    x: &[f32],
    bias: Option<&[f32]>,
    g: &Gate,
    buf: &mut Bufs,
    ids: &mut [i64],
    sel: &mut [f32],
    w: &mut [f32],
    hist: Option<&mut [usize]>,
) -> bool {
    // the same code with 16-lane vectors for the score loops and AVX-512 compress for the candidates
    rows_impl::<true, true>(x, bias, g, buf, ids, sel, w, hist)
}

/// The widest build of [`rows`] this CPU runs: 0 portable, 1 AVX2, 2 AVX-512 (`SPARSEKIT_SIMD=0|1`
/// caps it, to test and compare the others). Detected once per process.
pub(super) fn simd_level() -> u8 {
    crate::simd::level()
}

/// [`rows_impl`] on the build `level` (from [`simd_level`]; same answer on every level).
#[allow(clippy::too_many_arguments)]
pub(super) fn rows(
    x: &[f32],
    bias: Option<&[f32]>,
    g: &Gate,
    buf: &mut Bufs,
    ids: &mut [i64],
    sel: &mut [f32],
    w: &mut [f32],
    hist: Option<&mut [usize]>,
    level: u8,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `level` came from `simd_level`, which checked the CPU.
        if level >= 2 {
            return unsafe { rows_avx512(x, bias, g, buf, ids, sel, w, hist) };
        }
        if level == 1 {
            return unsafe { rows_avx2(x, bias, g, buf, ids, sel, w, hist) };
        }
    }
    let _ = level;
    rows_impl::<false, false>(x, bias, g, buf, ids, sel, w, hist)
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp16_equals_scalar_exp_bit_for_bit() {
        use std::arch::x86_64::*;
        if super::simd_level() < 2 {
            return; // no AVX-512 here: the wide build never runs
        }
        // a dense sweep of [-110, 0] (the subnormal results below about -87 included), and the edges
        let mut x: Vec<f32> = (0..=1_100_000).map(|i| -(i as f32) * 1e-4).collect();
        x.extend([f32::NEG_INFINITY, f32::NAN, -0.0, -104.0, -103.972_08, -87.336_55, f32::MIN, -f32::MIN_POSITIVE]);
        x.resize(x.len().div_ceil(16) * 16, 0.0);
        for ch in x.chunks_exact(16) {
            let mut got = [0.0f32; 16];
            // SAFETY: AVX-512 checked above; 16-element loads and stores
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), super::avx512::exp16(_mm512_loadu_ps(ch.as_ptr()))) };
            for (&v, &g) in ch.iter().zip(&got) {
                let want = super::exp_nonpos_f32(v);
                assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()), "exp({v}): {g} vs {want}");
            }
        }
    }
}
