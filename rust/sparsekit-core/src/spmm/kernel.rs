//! Register-tiled micro-kernels and the cache-blocked drivers built on them.
//!
//! Every product here is `C[MR x NR] (+)= sum over pairs (ka, bo) of A[ka.., :MR] * B[bo.., :NR]`, with A
//! packed `[depth][MR]` (one broadcast per row and step) and B packed `[depth][NR]` (NR contiguous
//! floats per step). The pair list is the k-loop over the stored blocks of one block-row (DSD forward)
//! or block-column (dX, through the transpose metadata); SDD runs it with one pair per k-chunk.
//! Tile shapes per instruction set are in [`Isa`]; rows left over at the edges use smaller instances of
//! the same kernels, columns left over use masks (AVX-512) or the scalar kernel.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::elem::Elem;

/// Widest micro-tile (columns) of any kernel.
pub const NR_MAX: usize = 32;

/// Instruction set picked once per call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    /// The best kernel this CPU runs: AVX-512F, else AVX2 + FMA, else scalar.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    /// Every kernel this CPU can run (tests compare them all).
    #[cfg(test)]
    pub fn available() -> Vec<Isa> {
        let mut out = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                out.push(Isa::Avx2);
            }
            if is_x86_feature_detected!("avx512f") {
                out.push(Isa::Avx512);
            }
        }
        out
    }

    /// Micro-tile columns for output segments `width` wide: 16, or 32 (two zmm) with AVX-512.
    pub fn nr(self, width: usize) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if width >= 32 => 32,
            _ => 16,
        }
    }

    /// Micro-tile rows of the DSD kernels: 12 x 32 keeps 24 accumulators in the 32 zmm registers,
    /// 6 x 16 keeps 12 in the 16 ymm registers.
    pub fn mr(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => 12,
            _ => 6,
        }
    }

    /// Micro-tile rows of SDD, whose rows run over a block's height: a power of two divides it.
    pub fn sdd_mr(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => 8,
            _ => 4,
        }
    }
}

/// One micro-tile: step `kk` of pair `(ka, bo)` reads row `i` of A at `a + (ka + kk) * lda + i * sa` and
/// B at `b + bo + kk * ldb` (`cols` floats); the `rows x cols` result goes to `c` (row stride `ldc`),
/// overwriting it or (`add`) added to it.
#[derive(Clone, Copy)]
pub struct Tile<'p> {
    pub a: *const f32,
    pub lda: usize,
    pub sa: usize,
    pub pairs: &'p [(usize, usize)],
    pub depth: usize,
    pub b: *const f32,
    pub ldb: usize,
    pub c: *mut f32,
    pub ldc: usize,
    pub cols: usize,
    pub add: bool,
    /// The result is final and not read back by the driver: full aligned output lines may bypass the
    /// cache (AVX-512 non-temporal stores). False where later tiles add onto this one (SDD's k-chunks).
    pub stream: bool,
}

/// Scalar micro-kernel (any `cols <= NR_MAX`): the fallback on CPUs without AVX2 and the column-tail
/// kernel of the AVX2 path.
///
/// # Safety
/// `t.a`, `t.b` and `t.c` must be valid for every offset the pairs, `depth`, strides and `cols` reach.
#[inline(always)]
unsafe fn micro_scalar<const R: usize>(t: &Tile<'_>) {
    let mut acc = [[0f32; NR_MAX]; R];
    for &(ka, bo) in t.pairs {
        let mut ap = t.a.add(ka * t.lda);
        let mut bp = t.b.add(bo);
        for _ in 0..t.depth {
            for (i, row) in acc.iter_mut().enumerate() {
                let av = *ap.add(i * t.sa);
                for (j, o) in row.iter_mut().enumerate().take(t.cols) {
                    *o = av.mul_add(*bp.add(j), *o);
                }
            }
            ap = ap.add(t.lda);
            bp = bp.add(t.ldb);
        }
    }
    for (i, row) in acc.iter().enumerate() {
        let cp = t.c.add(i * t.ldc);
        for (j, &v) in row.iter().enumerate().take(t.cols) {
            *cp.add(j) = if t.add { *cp.add(j) + v } else { v };
        }
    }
}

/// AVX2 + FMA micro-kernel, `R x 16`: 2R accumulators stay in ymm registers for the whole pair list.
///
/// # Safety
/// The CPU supports avx2 and fma, `t.cols == 16`, and the pointers are valid as for [`micro_scalar`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn micro_avx2<const R: usize>(t: &Tile<'_>) {
    let mut acc0 = [_mm256_setzero_ps(); R];
    let mut acc1 = [_mm256_setzero_ps(); R];
    for &(ka, bo) in t.pairs {
        let mut ap = t.a.add(ka * t.lda);
        let mut bp = t.b.add(bo);
        for _ in 0..t.depth {
            let b0 = _mm256_loadu_ps(bp);
            let b1 = _mm256_loadu_ps(bp.add(8));
            for i in 0..R {
                let av = _mm256_broadcast_ss(&*ap.add(i * t.sa));
                acc0[i] = _mm256_fmadd_ps(av, b0, acc0[i]);
                acc1[i] = _mm256_fmadd_ps(av, b1, acc1[i]);
            }
            ap = ap.add(t.lda);
            bp = bp.add(t.ldb);
        }
    }
    for i in 0..R {
        let cp = t.c.add(i * t.ldc);
        let (mut v0, mut v1) = (acc0[i], acc1[i]);
        if t.add {
            v0 = _mm256_add_ps(_mm256_loadu_ps(cp), v0);
            v1 = _mm256_add_ps(_mm256_loadu_ps(cp.add(8)), v1);
        }
        _mm256_storeu_ps(cp, v0);
        _mm256_storeu_ps(cp.add(8), v1);
    }
}

/// AVX-512 micro-kernel, `R x 16V` (V = 1 or 2 zmm per row); masked loads and stores serve any
/// `cols <= 16V`, so column tails need no second kernel.
///
/// # Safety
/// The CPU supports avx512f, `t.cols <= 16 * V`, and the pointers are valid as for [`micro_scalar`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn micro_avx512<const R: usize, const V: usize>(t: &Tile<'_>) {
    let lane = |n: usize| -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    };
    let mk = [lane(t.cols), lane(t.cols.saturating_sub(16))];
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    // A tile's R output rows lie a whole output row apart, and the store queue waited on each of their
    // lines. Full aligned lines of a final result are streamed (non-temporal: no read for ownership; the
    // 10 % forward with its output evicted between calls: 17.6-18.4 -> 16.7-18.0 ms, and with a relu
    // reading the output after it 25.8-27.6 -> 25.2-25.9 ms); other tiles ask for their lines in a
    // writable state now, so the stores at the end find them in L1 (on its own: 18.6 -> 15 ms).
    let stream = t.stream
        && !t.add
        && V == 2
        && t.cols == 32
        && (t.c as usize).is_multiple_of(64)
        && (t.ldc * 4).is_multiple_of(64);
    if !stream {
        for i in 0..R {
            for v in 0..V {
                _mm_prefetch::<_MM_HINT_ET0>(t.c.wrapping_add(i * t.ldc + 16 * v) as *const i8);
            }
        }
    }
    for &(ka, bo) in t.pairs {
        let mut ap = t.a.add(ka * t.lda);
        let mut bp = t.b.add(bo);
        for _ in 0..t.depth {
            let mut bv = [_mm512_setzero_ps(); V];
            for (v, b) in bv.iter_mut().enumerate() {
                *b = _mm512_maskz_loadu_ps(mk[v], bp.add(16 * v));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ap.add(i * t.sa));
                for (o, &b) in row.iter_mut().zip(&bv) {
                    *o = _mm512_fmadd_ps(av, b, *o);
                }
            }
            ap = ap.add(t.lda);
            bp = bp.add(t.ldb);
        }
    }
    for (i, row) in acc.iter().enumerate() {
        let cp = t.c.add(i * t.ldc);
        for (v, &x) in row.iter().enumerate() {
            let p = cp.add(16 * v);
            if stream {
                _mm512_stream_ps(p, x);
            } else {
                let x = if t.add { _mm512_add_ps(_mm512_maskz_loadu_ps(mk[v], p), x) } else { x };
                _mm512_mask_storeu_ps(p, mk[v], x);
            }
        }
    }
    if stream {
        // streamed stores are weakly ordered: fence them before the task reports its part done
        _mm_sfence();
    }
}

/// Runs one micro-tile of `rows` rows (at most `isa.mr()`, or 8 for SDD) and `t.cols <= nr` columns,
/// `nr = isa.nr(..)` the panel width the B operand was packed with.
///
/// # Safety
/// As for [`micro_scalar`]; `isa` must come from [`Isa::detect`].
pub unsafe fn micro(isa: Isa, nr: usize, rows: usize, t: &Tile<'_>) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            if nr == 32 {
                macro_rules! f { ($($r:literal)+) => { match rows { $($r => micro_avx512::<$r, 2>(t),)+ _ => unreachable!() } } }
                f!(1 2 3 4 5 6 7 8 9 10 11 12)
            } else {
                macro_rules! f { ($($r:literal)+) => { match rows { $($r => micro_avx512::<$r, 1>(t),)+ _ => unreachable!() } } }
                f!(1 2 3 4 5 6 7 8 9 10 11 12)
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if t.cols == 16 => {
            macro_rules! f { ($($r:literal)+) => { match rows { $($r => micro_avx2::<$r>(t),)+ _ => unreachable!() } } }
            f!(1 2 3 4 5 6)
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            macro_rules! f { ($($r:literal)+) => { match rows { $($r => micro_scalar_fma::<$r>(t),)+ _ => unreachable!() } } }
            f!(1 2 3 4 5 6 7 8)
        }
        _ => {
            macro_rules! f { ($($r:literal)+) => { match rows { $($r => micro_scalar::<$r>(t),)+ _ => unreachable!() } } }
            f!(1 2 3 4 5 6 7 8)
        }
    }
}

/// [`micro_scalar`] inlined into an avx2+fma function, so its `mul_add` is one `vfmadd` (same bits)
/// rather than a libm `fmaf` call: the AVX2 path's column tails (`cols < 16`, e.g. 8-wide blocks).
///
/// # Safety
/// The CPU supports avx2 and fma; the pointers are valid as for [`micro_scalar`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn micro_scalar_fma<const R: usize>(t: &Tile<'_>) {
    micro_scalar::<R>(t)
}

/// Packs every `[bh, bw]` block for the micro-kernel's B operand, in panels of `nr0` output columns.
/// With `transpose`, B is the block transposed (`[bw][bh]`, output columns run over `bh`: DSD forward);
/// without, B is the block itself (`[bh][bw]`, output columns over `bw`: dX). Panel `jp` of block `b`
/// starts at `b * bh * bw + jp * nr0 * depth` and holds `[depth][min(nr0, width - jp * nr0)]`.
/// float16 / bfloat16 blocks are widened to f32 here, as they are packed (exact).
pub fn pack_blocks<T: Elem>(values: &[T], bh: usize, bw: usize, transpose: bool, nr0: usize, out: &mut [f32]) {
    let bs = bh * bw;
    let (depth, width) = if transpose { (bw, bh) } else { (bh, bw) };
    for (v, o) in values.chunks_exact(bs).zip(out.chunks_exact_mut(bs)) {
        for j0 in (0..width).step_by(nr0) {
            let nr = nr0.min(width - j0);
            let dst = &mut o[j0 * depth..j0 * depth + nr * depth];
            for kk in 0..depth {
                for j in 0..nr {
                    // B[kk][j0 + j]: W[j0 + j][kk] transposed, W[kk][j0 + j] otherwise.
                    dst[kk * nr + j] = if transpose { v[(j0 + j) * bw + kk] } else { v[kk * bw + j0 + j] }.to_f32();
                }
            }
        }
    }
}
