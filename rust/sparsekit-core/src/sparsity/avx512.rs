//! AVX-512 builds of the float32 passes of a mask update (weights and grow scores both float32, the
//! common case): the one read pass of [`super::fast`], the writing pass and the gradient-masking pass.
//! Same results as the generic code, bit for bit (tests compare them); 16 connections per step,
//! comparisons into mask registers, gathered keys packed with `vpcompressd`, zeros written with masked
//! stores only where a value is not already +0.0, so lines that do not change are never dirtied.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::fast::{Bounds, Part};
use super::{LayerStats, Simple};

const ABS: i32 = 0x7FFF_FFFF;
const INF: i32 = 0x7F80_0000;

/// Mask of the 16 bools at `p` (true = nonzero byte).
#[inline(always)]
unsafe fn load_mask(p: *const bool) -> __mmask16 {
    let v = _mm_loadu_si128(p as *const __m128i);
    _mm_test_epi8_mask(v, v)
}

#[inline(always)]
unsafe fn abs_keys(p: *const f32) -> __m512i {
    _mm512_and_si512(_mm512_loadu_si512(p as *const __m512i), _mm512_set1_epi32(ABS))
}

/// `keys[i] >= lo && keys[i] <= hi` (unsigned).
#[inline(always)]
unsafe fn inside(keys: __m512i, lo: __m512i, hi: __m512i) -> __mmask16 {
    _mm512_cmpge_epu32_mask(keys, lo) & _mm512_cmple_epu32_mask(keys, hi)
}

/// Append the lanes of `v` selected by `k` to `out` (16 spare slots are reserved first).
#[inline(always)]
unsafe fn append(out: &mut Vec<u32>, k: __mmask16, v: __m512i) {
    out.reserve(16);
    let len = out.len();
    _mm512_storeu_si512(out.as_mut_ptr().add(len) as *mut __m512i, _mm512_maskz_compress_epi32(k, v));
    out.set_len(len + k.count_ones() as usize);
}

#[inline(always)]
unsafe fn count(acc: __m512i, k: __mmask16) -> __m512i {
    _mm512_mask_sub_epi32(acc, k, acc, _mm512_set1_epi32(-1))
}

#[inline(always)]
unsafe fn total(acc: __m512i) -> u64 {
    let mut lanes = [0u32; 16];
    _mm512_storeu_si512(lanes.as_mut_ptr() as *mut __m512i, acc);
    lanes.iter().map(|&x| x as u64).sum()
}

/// [`super::fast`]'s pass over one piece; `g` is `None` when the piece's group grows nothing. Full
/// blocks of 16 here, the tail (fewer than 16) by the caller's generic code.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,popcnt")]
pub(super) unsafe fn pass_f32(
    w: &[f32],
    m: &[bool],
    g: Option<&[f32]>,
    b: &Bounds<u32, u32>,
    take_open: bool,
    take_grow: bool,
    out: &mut Part<u32, u32>,
) -> usize {
    let full = w.len() / 16 * 16;
    let (klo, khi) = (_mm512_set1_epi32(b.keep.lo as i32), _mm512_set1_epi32(b.keep.hi as i32));
    let (glo, ghi) = (_mm512_set1_epi32(b.grow.lo as i32), _mm512_set1_epi32(b.grow.hi as i32));
    let inf = _mm512_set1_epi32(INF);
    let zero = _mm512_setzero_si512();
    let (mut act, mut k_above, mut open_n) = (zero, zero, zero);
    let (mut elig, mut g_above, mut g_in_n) = (zero, zero, zero);
    let mut nan: __mmask16 = 0;
    let mut i = 0;
    while i < full {
        let on = load_mask(m.as_ptr().add(i));
        let wk = abs_keys(w.as_ptr().add(i));
        let above = _mm512_mask_cmpgt_epu32_mask(on, wk, khi);
        let open = on & inside(wk, klo, khi);
        nan |= _mm512_mask_cmpgt_epu32_mask(on, wk, inf);
        act = count(act, on);
        k_above = count(k_above, above);
        open_n = count(open_n, open);
        if let Some(g) = g {
            let gk = abs_keys(g.as_ptr().add(i));
            let e = !on | _mm512_cmplt_epu32_mask(wk, klo);
            let ga = _mm512_mask_cmpgt_epu32_mask(e, gk, ghi);
            let gi = e & inside(gk, glo, ghi);
            nan |= _mm512_mask_cmpgt_epu32_mask(e, gk, inf);
            elig = count(elig, e);
            g_above = count(g_above, ga);
            g_in_n = count(g_in_n, gi);
            if take_grow && gi != 0 {
                append(&mut out.grow_in, gi, gk);
            }
            if take_open && open != 0 {
                append(&mut out.open_w, open, wk);
                append(&mut out.open_g, open, gk);
            }
        } else if take_open && open != 0 {
            append(&mut out.open_w, open, wk);
            append(&mut out.open_g, open, zero);
        }
        i += 16;
    }
    out.active += total(act);
    out.keep_above += total(k_above);
    out.open_hits += total(open_n);
    out.eligible += total(elig);
    out.grow_above += total(g_above);
    out.grow_hits += total(g_in_n);
    out.nan |= nan != 0;
    full
}

/// Zero where `!stay` and not already +0.0; `stay` selects lanes kept as they are.
#[inline(always)]
unsafe fn zero_where_not(p: *mut f32, stay: __mmask16) {
    let v = _mm512_loadu_si512(p as *const __m512i);
    let z = _mm512_mask_test_epi32_mask(!stay, v, v);
    if z != 0 {
        _mm512_mask_storeu_epi32(p as *mut i32, z, _mm512_setzero_si512());
    }
}

/// The writing pass over full blocks of one piece with simple cuts ("key >= min"); returns how many
/// elements it did (the caller's generic code does the tail).
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,popcnt")]
pub(super) unsafe fn write_f32(
    w: &mut [f32],
    m: &mut [bool],
    g: Option<&[f32]>,
    states: &mut [&mut [f32]],
    keep: Simple<u32>,
    grow: Simple<u32>,
    st: &mut LayerStats,
) -> usize {
    let full = w.len() / 16 * 16;
    let kmin = _mm512_set1_epi32(keep.min as i32);
    let gmin = _mm512_set1_epi32(grow.min as i32);
    let ones = _mm_set1_epi8(1);
    let (mut kept, mut grown, mut dropped) = (0u64, 0u64, 0u64);
    let mut i = 0;
    while i < full {
        let old = load_mask(m.as_ptr().add(i));
        let wk = abs_keys(w.as_ptr().add(i));
        let k = if keep.any { _mm512_mask_cmpge_epu32_mask(old, wk, kmin) } else { 0 };
        let new = match g {
            Some(g) if grow.any => k | _mm512_mask_cmpge_epu32_mask(!k, abs_keys(g.as_ptr().add(i)), gmin),
            _ => k,
        };
        _mm_storeu_si128(m.as_mut_ptr().add(i) as *mut __m128i, _mm_maskz_mov_epi8(new, ones));
        let stay = new & old;
        kept += new.count_ones() as u64;
        grown += (new & !old).count_ones() as u64;
        dropped += (old & !new).count_ones() as u64;
        if stay != 0xFFFF {
            zero_where_not(w.as_mut_ptr().add(i), stay);
            for s in states.iter_mut() {
                zero_where_not(s.as_mut_ptr().add(i), stay);
            }
        }
        i += 16;
    }
    st.kept += kept;
    st.grown += grown;
    st.dropped += dropped;
    full
}

/// `x[i] = 0` where `!m[i]`, over full blocks; returns how many elements it did.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,popcnt")]
pub(super) unsafe fn zero_off_f32(x: &mut [f32], m: &[bool]) -> usize {
    let full = x.len() / 16 * 16;
    let mut i = 0;
    while i < full {
        let on = load_mask(m.as_ptr().add(i));
        if on != 0xFFFF {
            zero_where_not(x.as_mut_ptr().add(i), on);
        }
        i += 16;
    }
    full
}
