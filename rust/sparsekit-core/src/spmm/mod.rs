//! CPU block-sparse GEMM: BSR layout, transpose metadata, SIMD-friendly micro-kernels (DSD, SDD).
//!
//! `W` is `[n, k]`, stored as `nnz` dense blocks of `bh x bw` (row-major, `values[nnz * bh * bw]`), in
//! block-row order: block-row `r` holds blocks `row_offsets[r]..row_offsets[r + 1]`, whose block-columns
//! are `col_indices[..]` (strictly increasing within a block-row). The transpose metadata lists the same
//! blocks in block-column order: column `c` holds `t_offsets[c]..t_offsets[c + 1]`, entry `j` is block
//! `t_perm[j]` (an index into the row-ordered blocks) lying in block-row `t_row_indices[j]`.
//!
//! Kernels (f32 arithmetic; operands f32, or float16 / bfloat16 as raw bits: see [`Elem`]; dense operands
//! row-major and contiguous):
//! * [`linear`]: `y[m, n] = x[m, k] @ W^T` (DSD forward),
//! * [`linear_grad_input`]: `dx[m, k] = dy[m, n] @ W` (via the transpose metadata),
//! * [`sdd`]: `out[b] = a[:, r-block]^T @ b[:, c-block]` for every stored block `b = (r, c)`.
//!
//! All three run one register-tiled micro-kernel (see [`kernel`]): the dense operand is packed once per
//! strip of rows and reused across every block-row (or block-column) the task computes, the k-loop runs
//! over the stored blocks of one block-row, the accumulators never leave registers. AVX2+FMA is picked
//! at run time (the wheel targets baseline x86-64), with a scalar fallback. Tiles are fixed sizes, so
//! results never depend on the thread count.

mod elem;
mod kernel;

use rayon::prelude::*;

pub use elem::Elem;

use crate::error::CoreError;
use crate::pages::prefer_huge_pages;
use crate::pool;
use kernel::{micro, pack_blocks, Isa, Tile};

/// Block-sparse layout of an `[n, k]` matrix with `bh x bw` blocks (borrowed index arrays).
#[derive(Clone, Copy, Debug)]
pub struct Layout<'a> {
    pub n: usize,
    pub k: usize,
    pub bh: usize,
    pub bw: usize,
    pub row_offsets: &'a [i64],
    pub col_indices: &'a [i64],
    pub t_offsets: &'a [i64],
    pub t_perm: &'a [i64],
    pub t_row_indices: &'a [i64],
}

fn invalid(arg: &'static str, why: impl Into<String>) -> CoreError {
    CoreError::Invalid { arg, why: why.into() }
}

fn check_offsets(arg: &'static str, off: &[i64], len: usize, nnz: usize) -> Result<(), CoreError> {
    if off.len() != len + 1 {
        return Err(CoreError::LengthMismatch { arg, expected: len + 1, got: off.len() });
    }
    if off[0] != 0 {
        return Err(invalid(arg, format!("must start at 0, got {}", off[0])));
    }
    for w in off.windows(2) {
        if w[1] < w[0] {
            return Err(invalid(arg, "must be non-decreasing"));
        }
    }
    if off[len] as u64 != nnz as u64 {
        return Err(invalid(arg, format!("must end at nnz = {nnz}, got {}", off[len])));
    }
    Ok(())
}

impl Layout<'_> {
    /// Number of block-rows.
    pub fn block_rows(&self) -> usize {
        self.n / self.bh
    }
    /// Number of block-columns.
    pub fn block_cols(&self) -> usize {
        self.k / self.bw
    }
    /// Number of stored blocks.
    pub fn nnz(&self) -> usize {
        self.col_indices.len()
    }

    /// Checks every invariant of the layout (O(nnz)); kernels call it before touching memory.
    pub fn validate(&self) -> Result<(), CoreError> {
        if self.bh == 0 || self.bw == 0 {
            return Err(invalid("block", format!("block sizes must be positive, got ({}, {})", self.bh, self.bw)));
        }
        if !self.n.is_multiple_of(self.bh) || !self.k.is_multiple_of(self.bw) {
            return Err(invalid(
                "shape",
                format!("({}, {}) is not divisible by the block ({}, {})", self.n, self.k, self.bh, self.bw),
            ));
        }
        let (nbr, nbc, nnz) = (self.block_rows(), self.block_cols(), self.nnz());
        check_offsets("row_offsets", self.row_offsets, nbr, nnz)?;
        check_offsets("t_offsets", self.t_offsets, nbc, nnz)?;
        for (name, len) in [("t_perm", self.t_perm.len()), ("t_row_indices", self.t_row_indices.len())] {
            if len != nnz {
                return Err(CoreError::LengthMismatch { arg: name, expected: nnz, got: len });
            }
        }
        let mut block_row = vec![0usize; nnz];
        for r in 0..nbr {
            let (s, e) = (self.row_offsets[r] as usize, self.row_offsets[r + 1] as usize);
            let mut prev: i64 = -1;
            for (b, &c) in self.col_indices.iter().enumerate().take(e).skip(s) {
                if c < 0 || c as usize >= nbc {
                    return Err(invalid("col_indices", format!("{c} is outside [0, {nbc})")));
                }
                if c <= prev {
                    return Err(invalid("col_indices", format!("must be strictly increasing within block-row {r}")));
                }
                prev = c;
                block_row[b] = r;
            }
        }
        let mut seen = vec![false; nnz];
        for c in 0..nbc {
            let (s, e) = (self.t_offsets[c] as usize, self.t_offsets[c + 1] as usize);
            for j in s..e {
                let b = self.t_perm[j];
                if b < 0 || b as usize >= nnz || seen[b as usize] {
                    return Err(invalid("t_perm", "must be a permutation of 0..nnz"));
                }
                let b = b as usize;
                seen[b] = true;
                if self.col_indices[b] as usize != c {
                    return Err(invalid("t_perm", format!("entry {j} (block {b}) does not lie in block-column {c}")));
                }
                if self.t_row_indices[j] < 0 || self.t_row_indices[j] as usize != block_row[b] {
                    return Err(invalid(
                        "t_row_indices",
                        format!("entry {j} does not match the block-row of block {b}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn check_len(arg: &'static str, got: usize, expected: usize) -> Result<(), CoreError> {
    if got != expected {
        return Err(CoreError::LengthMismatch { arg, expected, got });
    }
    Ok(())
}

/// Floats of the dense operand one task keeps hot in L2 across all the segments it computes.
const STRIP_FLOATS: usize = 128 * 1024;
/// Tasks the DSD drivers aim for (fixed, so the tiling never depends on the thread count).
const TASKS: usize = 64;
/// Depth of one SDD k-chunk: a chunk of A and B panels stays in L1 across the micro-tiles of a block.
const KC: usize = 128;
/// Stored blocks one SDD task handles (they share the panel of `a`).
const SDD_GROUP: usize = 8;

/// Rows of the dense operand per task: the strip `[rows, kd]` fits `STRIP_FLOATS`.
fn strip_rows(kd: usize, mr: usize) -> usize {
    (STRIP_FLOATS / kd.max(1) / mr * mr).clamp(mr, 32 * mr)
}

/// A raw pointer into an output that tasks write in disjoint parts.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
// SAFETY: every task writes a disjoint set of elements (the drivers partition the output).
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

/// Per-thread f32 buffers of the half-precision paths: a widened strip of the dense operand, a widened
/// operand panel, finished f32 tiles before rounding. Reused across tasks and calls, so the half paths
/// allocate nothing per task (the tasks never re-enter rayon, so the borrow is never nested).
#[derive(Default)]
struct Scratch {
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// `out[m, ldc]` columns `[s * width, (s + 1) * width)` = `a[m, kd] @ B_s` where segment `s` is the sum
/// over its pairs `(ka, bo)` of `a[:, ka..ka + depth] @ block(bo)`; blocks packed by [`pack_blocks`]
/// with panels `isa.nr(width)` wide.
///
/// f32 `a` is read in place and `out` written in place. For float16 / bfloat16 each task widens its strip
/// of `a` (at most `STRIP_FLOATS`, L2-sized) into a per-thread buffer, computes its tiles into a second
/// f32 buffer exactly as the f32 path would (same micro-kernel, same pairs, same order) and rounds them
/// once into `out`: the result is the f32 path's on the widened inputs, rounded, bit for bit.
#[allow(clippy::too_many_arguments)]
fn dsd<T: Elem>(
    isa: Isa,
    a: &[T],
    m: usize,
    kd: usize,
    seg_off: &[usize],
    pairs: &[(usize, usize)],
    width: usize,
    depth: usize,
    packed: &[f32],
    out: &mut [T],
    ldc: usize,
) {
    let (mr0, nr0) = (isa.mr(), isa.nr(width));
    let nseg = seg_off.len() - 1;
    let mc = strip_rows(kd, mr0);
    let strips = m.div_ceil(mc);
    let groups = TASKS.div_ceil(strips).clamp(1, nseg.max(1));
    let per = nseg.div_ceil(groups);
    let a32 = T::as_f32(a);
    let optr = Shared(out.as_mut_ptr());
    (0..strips * groups).into_par_iter().for_each(|t| {
        let (s, g) = (t / groups, t % groups);
        let (row0, rows) = (s * mc, mc.min(m - s * mc));
        let (seg0, seg1) = ((g * per).min(nseg), ((g + 1) * per).min(nseg));
        if seg0 == seg1 {
            return;
        }
        #[allow(clippy::redundant_locals)] // the closure captures the whole Send wrapper, not its raw field
        let optr = optr;
        // the next strip of `a` (likely this thread's next task: rayon splits the range in halves) is
        // asked for into L2 a slice per micro-tile, so it is there when that task starts
        let next = a32.map(|a| a.as_ptr().wrapping_add((row0 + rows) * kd) as *const i8);
        let next_bytes = if row0 + rows < m { mc.min(m - row0 - rows) * kd * 4 } else { 0 };
        let per_tile = next_bytes.div_ceil(64 * ((seg1 - seg0) * width.div_ceil(nr0) * rows.div_ceil(mr0)).max(1));
        let mut ahead = 0usize;
        let direct = a32.is_some();
        // `tiles(a_strip, c, ldc_c)`: every micro-tile of this task; row r0 of the strip is `a_strip +
        // r0 * kd`, output row r0 / segment seg at `c + r0 * ldc_c + (seg - seg0) * width`.
        let mut tiles = |ap: *const f32, c: *mut f32, ldc_c: usize| {
            for seg in seg0..seg1 {
                let pr = &pairs[seg_off[seg]..seg_off[seg + 1]];
                for j0 in (0..width).step_by(nr0) {
                    let cols = nr0.min(width - j0);
                    for r0 in (0..rows).step_by(mr0) {
                        let mr = mr0.min(rows - r0);
                        // SAFETY: the layout was validated, so every pair reaches inside the strip and
                        // `packed`; `c` spans this task's rows x segments, written by this task alone.
                        unsafe {
                            let tile = Tile {
                                a: ap.add(r0 * kd),
                                lda: 1,
                                sa: kd,
                                pairs: pr,
                                depth,
                                b: packed.as_ptr().add(j0 * depth),
                                ldb: cols,
                                c: c.add(r0 * ldc_c + (seg - seg0) * width + j0),
                                ldc: ldc_c,
                                cols,
                                add: false,
                                // f32 writes the final output; the half paths' f32 tiles are read back at once
                                stream: direct,
                            };
                            micro(isa, nr0, mr, &tile);
                        }
                        if let Some(np) = next {
                            for _ in 0..per_tile {
                                if ahead < next_bytes {
                                    prefetch_l2(np.wrapping_add(ahead));
                                }
                                ahead += 64;
                            }
                        }
                    }
                }
            }
        };
        match a32 {
            Some(a) => {
                // SAFETY: row0 + rows <= m and seg0 * width + (seg1 - seg0) * width <= ldc.
                let c = unsafe { optr.0.add(row0 * ldc + seg0 * width) } as *mut f32;
                tiles(a[row0 * kd..].as_ptr(), c, ldc)
            }
            None => SCRATCH.with(|cell| {
                let sc = &mut *cell.borrow_mut();
                let ncols = (seg1 - seg0) * width;
                let strip = sized(&mut sc.a, rows * kd);
                T::widen(&a[row0 * kd..(row0 + rows) * kd], strip);
                let cbuf = sized(&mut sc.c, rows * ncols);
                tiles(strip.as_ptr(), cbuf.as_mut_ptr(), ncols);
                for r in 0..rows {
                    // SAFETY: row row0 + r, columns [seg0 * width, seg1 * width) of `out` belong to this task.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(optr.0.add((row0 + r) * ldc + seg0 * width), ncols)
                    };
                    T::narrow(&cbuf[r * ncols..(r + 1) * ncols], dst);
                }
            }),
        }
    });
}

/// A hint to bring the line at `p` into L2 (never faults).
#[inline(always)]
fn prefetch_l2(p: *const i8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Packed blocks: from the buffer cache once large (a fresh vector of a few MB is faulted in and zeroed
/// page by page on every call: 8 % of the 10 % forward's time in the benchmark).
enum Packed {
    Small(Vec<f32>),
    Cached(crate::buffers::Buffer),
}

impl std::ops::Deref for Packed {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Packed::Small(v) => v,
            // SAFETY: the buffer holds len / 4 floats, 2 MiB aligned, every one written by `pack_all`
            Packed::Cached(b) => unsafe { std::slice::from_raw_parts(b.as_ptr() as *const f32, b.len() / 4) },
        }
    }
}

/// Blocks packed for [`dsd`] (widened to f32), in parallel.
fn pack_all<T: Elem>(isa: Isa, values: &[T], bh: usize, bw: usize, transpose: bool) -> Packed {
    let bs = bh * bw;
    let nr0 = isa.nr(if transpose { bh } else { bw });
    let bytes = values.len() * 4;
    let cached = if bytes >= crate::buffers::MIN_BYTES { crate::buffers::Buffer::take(bytes).ok() } else { None };
    let mut packed = match cached {
        Some(b) => Packed::Cached(b),
        None => Packed::Small(vec![0f32; values.len()]),
    };
    let out: &mut [f32] = match &mut packed {
        Packed::Small(v) => v,
        // SAFETY: len / 4 floats of an exclusively owned, 2 MiB aligned buffer, zeroed first (its
        // pages are already mapped, so that is a memset, not faults) so the slice never sees
        // uninitialised memory
        Packed::Cached(b) => unsafe {
            std::ptr::write_bytes(b.as_mut_ptr(), 0, b.len());
            std::slice::from_raw_parts_mut(b.as_mut_ptr() as *mut f32, b.len() / 4)
        },
    };
    if bs > 0 {
        out.par_chunks_mut(bs * 64)
            .zip(values.par_chunks(bs * 64))
            .for_each(|(o, v)| pack_blocks(v, bh, bw, transpose, nr0, o));
    }
    packed
}

/// `y[m, n] = x[m, k] @ W^T`; `y` is overwritten. `T` is f32, `half::f16` or `half::bf16` (then the
/// products are accumulated in f32 and `y` rounded once).
pub fn linear<T: Elem>(l: &Layout<'_>, values: &[T], x: &[T], m: usize, y: &mut [T]) -> Result<(), CoreError> {
    linear_on(Isa::detect(), l, values, x, m, y)
}

fn linear_on<T: Elem>(
    isa: Isa,
    l: &Layout<'_>,
    values: &[T],
    x: &[T],
    m: usize,
    y: &mut [T],
) -> Result<(), CoreError> {
    l.validate()?;
    let bs = l.bh * l.bw;
    check_len("values", values.len(), l.nnz() * bs)?;
    check_len("x", x.len(), m * l.k)?;
    check_len("out", y.len(), m * l.n)?;
    if m == 0 || l.n == 0 {
        return Ok(());
    }
    let seg_off: Vec<usize> = l.row_offsets.iter().map(|&o| o as usize).collect();
    let pairs: Vec<(usize, usize)> = (0..l.nnz()).map(|b| (l.col_indices[b] as usize * l.bw, b * bs)).collect();
    prefer_huge_pages(y);
    pool::run(|| {
        let packed = pack_all(isa, values, l.bh, l.bw, true);
        dsd(isa, x, m, l.k, &seg_off, &pairs, l.bh, l.bw, &packed, y, l.n);
        Ok(())
    })
}

/// `dx[m, k] = dy[m, n] @ W`, walking W's blocks by column through the transpose metadata; `dx` is
/// overwritten. Element types as for [`linear`].
pub fn linear_grad_input<T: Elem>(
    l: &Layout<'_>,
    values: &[T],
    dy: &[T],
    m: usize,
    dx: &mut [T],
) -> Result<(), CoreError> {
    linear_grad_input_on(Isa::detect(), l, values, dy, m, dx)
}

fn linear_grad_input_on<T: Elem>(
    isa: Isa,
    l: &Layout<'_>,
    values: &[T],
    dy: &[T],
    m: usize,
    dx: &mut [T],
) -> Result<(), CoreError> {
    l.validate()?;
    let bs = l.bh * l.bw;
    check_len("values", values.len(), l.nnz() * bs)?;
    check_len("dy", dy.len(), m * l.n)?;
    check_len("out", dx.len(), m * l.k)?;
    if m == 0 || l.k == 0 {
        return Ok(());
    }
    let seg_off: Vec<usize> = l.t_offsets.iter().map(|&o| o as usize).collect();
    let pairs: Vec<(usize, usize)> =
        (0..l.nnz()).map(|j| (l.t_row_indices[j] as usize * l.bh, l.t_perm[j] as usize * bs)).collect();
    prefer_huge_pages(dx);
    pool::run(|| {
        let packed = pack_all(isa, values, l.bh, l.bw, false);
        dsd(isa, dy, m, l.n, &seg_off, &pairs, l.bw, l.bh, &packed, dx, l.k);
        Ok(())
    })
}

/// Column blocks of the row-major `a [m, cols]`, each `width` wide, laid out one after another, each
/// `[m][width]` contiguous: SDD then streams its operands instead of gathering rows 4 KiB apart.
/// Blocks not in `used` are left unwritten. A raw copy in the operand's own type (half stays half).
fn split_columns<T: Elem>(a: &[T], m: usize, cols: usize, width: usize, used: &[bool]) -> Vec<T> {
    let mut out = vec![T::ZERO; m * cols];
    prefer_huge_pages(&mut out);
    let optr = Shared(out.as_mut_ptr());
    let nb = cols / width;
    (0..m.div_ceil(64)).into_par_iter().for_each(|t| {
        #[allow(clippy::redundant_locals)] // the closure captures the whole Send wrapper, not its raw field
        let optr = optr;
        for row in t * 64..(t * 64 + 64).min(m) {
            for c in (0..nb).filter(|&c| used[c]) {
                let src = &a[row * cols + c * width..row * cols + c * width + width];
                // SAFETY: (row, c) is written by this task only, inside `out` (m * cols elements).
                unsafe {
                    std::ptr::copy_nonoverlapping(src.as_ptr(), optr.0.add(c * m * width + row * width), width);
                }
            }
        }
    });
    out
}

/// `out[b] = a[:, r-block]^T @ b[:, c-block]` for every stored block `b = (r, c)`; `a` is `[m, n]`,
/// `b` is `[m, k]`, `out` is `[nnz, bh, bw]` (overwritten). Element types as for [`linear`]: half
/// operands are widened one k-chunk panel at a time (L1-sized), each task's blocks rounded once at the end.
pub fn sdd<T: Elem>(l: &Layout<'_>, a: &[T], b: &[T], m: usize, out: &mut [T]) -> Result<(), CoreError> {
    sdd_on(Isa::detect(), l, a, b, m, out)
}

fn sdd_on<T: Elem>(isa: Isa, l: &Layout<'_>, a: &[T], b: &[T], m: usize, out: &mut [T]) -> Result<(), CoreError> {
    l.validate()?;
    let (bh, bw, n, k) = (l.bh, l.bw, l.n, l.k);
    let bs = bh * bw;
    check_len("a", a.len(), m * n)?;
    check_len("b", b.len(), m * k)?;
    check_len("out", out.len(), l.nnz() * bs)?;
    if l.nnz() == 0 {
        return Ok(());
    }
    if m == 0 {
        out.fill(T::ZERO);
        return Ok(());
    }
    let (mr0, nr0) = (isa.sdd_mr(), isa.nr(bw));
    // Tasks: runs of at most SDD_GROUP blocks of one block-row, which share the panel of `a`.
    let mut tasks = vec![];
    let mut used_r = vec![false; l.block_rows()];
    let mut used_c = vec![false; l.block_cols()];
    for (r, used) in used_r.iter_mut().enumerate() {
        let (s, e) = (l.row_offsets[r] as usize, l.row_offsets[r + 1] as usize);
        *used = e > s;
        for s0 in (s..e).step_by(SDD_GROUP) {
            tasks.push((r, s0, (s0 + SDD_GROUP).min(e)));
        }
    }
    for &c in l.col_indices {
        used_c[c as usize] = true;
    }
    prefer_huge_pages(out);
    let optr = Shared(out.as_mut_ptr());
    let one = [(0usize, 0usize)];
    let is_f32 = T::as_f32(a).is_some();
    pool::run(|| {
        let ap = split_columns(a, m, n, bh, &used_r);
        let bp = split_columns(b, m, k, bw, &used_c);
        tasks.par_iter().for_each(|&(r, s, e)| {
            #[allow(clippy::redundant_locals)] // the closure captures the whole Send wrapper, not its raw field
        let optr = optr;
            let apr = &ap[r * m * bh..(r + 1) * m * bh];
            // `run(c, panel)`: every k-chunk of the task's blocks into `c` (block `blk` at `c + (blk - s)
            // * bs`); `panel(src, k0, kc, width, buf)` gives the f32 rows k0..k0 + kc of a column panel.
            let run = |c: *mut f32, sc: &mut Scratch| {
                for k0 in (0..m).step_by(KC) {
                    let kc = KC.min(m - k0);
                    let pa = panel(apr, k0, kc, bh, &mut sc.a);
                    for blk in s..e {
                        let col = l.col_indices[blk] as usize;
                        let pb = panel(&bp[col * m * bw..(col + 1) * m * bw], k0, kc, bw, &mut sc.b);
                        for j0 in (0..bw).step_by(nr0) {
                            let cols = nr0.min(bw - j0);
                            for i0 in (0..bh).step_by(mr0) {
                                // SAFETY: kc steps of the panels stay inside `pa` / `pb`; block `blk`'s
                                // output belongs to this task alone.
                                unsafe {
                                    let tile = Tile {
                                        a: pa.add(i0),
                                        lda: bh,
                                        sa: 1,
                                        pairs: &one,
                                        depth: kc,
                                        b: pb.add(j0),
                                        ldb: bw,
                                        c: c.add((blk - s) * bs + i0 * bw + j0),
                                        ldc: bw,
                                        cols,
                                        add: k0 > 0,
                                        stream: false,
                                    };
                                    micro(isa, nr0, mr0.min(bh - i0), &tile);
                                }
                            }
                        }
                    }
                }
            };
            if is_f32 {
                // SAFETY: blocks s..e of `out` belong to this task; T is f32 here. The f32 panels are
                // read in place, so the scratch buffers stay empty.
                let c = unsafe { optr.0.add(s * bs) } as *mut f32;
                run(c, &mut Scratch::default());
            } else {
                SCRATCH.with(|cell| {
                    let sc = &mut *cell.borrow_mut();
                    let mut cbuf = std::mem::take(&mut sc.c);
                    let c = sized(&mut cbuf, (e - s) * bs);
                    run(c.as_mut_ptr(), sc);
                    // SAFETY: blocks s..e of `out` belong to this task alone.
                    let dst = unsafe { std::slice::from_raw_parts_mut(optr.0.add(s * bs), (e - s) * bs) };
                    T::narrow(c, dst);
                    sc.c = cbuf;
                });
            }
        });
        Ok(())
    })
}

/// Rows `k0..k0 + kc` of a `[m][width]` column panel as f32: in place for f32, else widened into `buf`.
fn panel<T: Elem>(src: &[T], k0: usize, kc: usize, width: usize, buf: &mut Vec<f32>) -> *const f32 {
    let part = &src[k0 * width..(k0 + kc) * width];
    match T::as_f32(part) {
        Some(p) => p.as_ptr(),
        None => {
            let dst = sized(buf, kc * width);
            T::widen(part, dst);
            dst.as_ptr()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Owned {
        n: usize,
        k: usize,
        bh: usize,
        bw: usize,
        ro: Vec<i64>,
        ci: Vec<i64>,
        to: Vec<i64>,
        tp: Vec<i64>,
        tr: Vec<i64>,
    }

    impl Owned {
        fn layout(&self) -> Layout<'_> {
            Layout {
                n: self.n,
                k: self.k,
                bh: self.bh,
                bw: self.bw,
                row_offsets: &self.ro,
                col_indices: &self.ci,
                t_offsets: &self.to,
                t_perm: &self.tp,
                t_row_indices: &self.tr,
            }
        }
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    }

    fn make(n: usize, k: usize, bh: usize, bw: usize, mask: &dyn Fn(usize, usize) -> bool) -> Owned {
        let (nbr, nbc) = (n / bh, k / bw);
        let (mut ro, mut ci, mut rows) = (vec![0i64], vec![], vec![]);
        for r in 0..nbr {
            for c in 0..nbc {
                if mask(r, c) {
                    ci.push(c as i64);
                    rows.push(r as i64);
                }
            }
            ro.push(ci.len() as i64);
        }
        let (mut to, mut tp, mut tr) = (vec![0i64], vec![], vec![]);
        for c in 0..nbc {
            for (b, &cc) in ci.iter().enumerate() {
                if cc as usize == c {
                    tp.push(b as i64);
                    tr.push(rows[b]);
                }
            }
            to.push(tp.len() as i64);
        }
        Owned { n, k, bh, bw, ro, ci, to, tp, tr }
    }

    fn dense(o: &Owned, values: &[f32]) -> Vec<f32> {
        let mut w = vec![0f32; o.n * o.k];
        for r in 0..o.n / o.bh {
            for b in o.ro[r] as usize..o.ro[r + 1] as usize {
                let c = o.ci[b] as usize;
                for i in 0..o.bh {
                    for j in 0..o.bw {
                        w[(r * o.bh + i) * o.k + c * o.bw + j] = values[(b * o.bh + i) * o.bw + j];
                    }
                }
            }
        }
        w
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    #[test]
    fn kernels_match_naive_reference() {
        let mut seed = 7u64;
        // Edges of every tile: rows not a multiple of MR, strips (m > strip rows), column tails (bh, bw not
        // multiples of 16), several SDD k-chunks (m > 256) and block groups (> 8 blocks in a block-row).
        for &(m, n, k, bh, bw) in &[
            (5, 8, 12, 2, 3),
            (37, 64, 32, 16, 8),
            (1, 4, 4, 4, 4),
            (20, 6, 10, 1, 1),
            (0, 4, 4, 2, 2),
            (301, 64, 48, 32, 16),
            (13, 40, 60, 20, 12),
            (7, 32, 320, 16, 16),
            (530, 32, 16, 16, 16),
        ] {
            for pattern in 0..3 {
                let o = make(n, k, bh, bw, &|r, c| match pattern {
                    0 => (r * 7 + c * 3) % 3 != 0 && r != 1,
                    1 => true,
                    _ => false,
                });
                let l = o.layout();
                l.validate().unwrap();
                let values: Vec<f32> = (0..l.nnz() * bh * bw).map(|_| lcg(&mut seed)).collect();
                let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
                let dy: Vec<f32> = (0..m * n).map(|_| lcg(&mut seed)).collect();
                let w = dense(&o, &values);
                for isa in Isa::available() {
                    let mut y = vec![1f32; m * n];
                    linear_on(isa, &l, &values, &x, m, &mut y).unwrap();
                    let mut yr = vec![0f32; m * n];
                    for a in 0..m {
                        for i in 0..n {
                            yr[a * n + i] = (0..k).map(|j| x[a * k + j] * w[i * k + j]).sum();
                        }
                    }
                    close(&y, &yr);
                    // a 64-byte aligned output too: full aligned lines are streamed (non-temporal)
                    let mut buf = vec![1f32; m * n + 16];
                    let skip = buf.as_ptr().align_offset(64);
                    let ya = &mut buf[skip..skip + m * n];
                    linear_on(isa, &l, &values, &x, m, ya).unwrap();
                    assert_eq!(ya, &y[..], "{m} {n} {k} {bh} {bw} {isa:?}");
                    let mut dx = vec![1f32; m * k];
                    linear_grad_input_on(isa, &l, &values, &dy, m, &mut dx).unwrap();
                    let mut dxr = vec![0f32; m * k];
                    for a in 0..m {
                        for j in 0..k {
                            dxr[a * k + j] = (0..n).map(|i| dy[a * n + i] * w[i * k + j]).sum();
                        }
                    }
                    close(&dx, &dxr);
                    let mut g = vec![1f32; l.nnz() * bh * bw];
                    sdd_on(isa, &l, &dy, &x, m, &mut g).unwrap();
                    let gw: Vec<f32> = (0..n * k)
                        .map(|e| {
                            let (i, j) = (e / k, e % k);
                            (0..m).map(|a| dy[a * n + i] * x[a * k + j]).sum()
                        })
                        .collect();
                    // Sampled dense gradient, compared on the stored blocks.
                    let mut gd = vec![0f32; n * k];
                    for (e, v) in dense(&o, &g).into_iter().enumerate() {
                        gd[e] = v;
                    }
                    let maskd = dense(&o, &vec![1f32; l.nnz() * bh * bw]);
                    let gwm: Vec<f32> = gw.iter().zip(&maskd).map(|(a, b)| a * b).collect();
                    close(&gd, &gwm);
                }
            }
        }
    }

    /// The half paths against the f32 path run on the widened inputs, rounded once: bit for bit (same
    /// micro-kernel, same pairs, same order, only the buffers differ), on every ISA and tile edge.
    fn half_matches_f32_on_widened<T: Elem + std::fmt::Debug>(from: fn(f32) -> T, bits: fn(T) -> u16) {
        let mut seed = 11u64;
        for &(m, n, k, bh, bw) in &[
            (5, 8, 12, 2, 3),
            (37, 64, 32, 16, 8),
            (0, 4, 4, 2, 2),
            (301, 64, 48, 32, 16),
            (13, 40, 60, 20, 12),
            (7, 32, 320, 16, 16),
            (530, 32, 16, 16, 16),
            (100, 64, 64, 32, 32),
        ] {
            for pattern in 0..3 {
                let o = make(n, k, bh, bw, &|r, c| match pattern {
                    0 => (r * 5 + c) % 3 != 0 && r != 1,
                    1 => true,
                    _ => false,
                });
                let l = o.layout();
                // Values spread over several binades (products then need the f32 accumulator).
                let mut gen = |len: usize| -> Vec<T> { (0..len).map(|_| from(lcg(&mut seed) * 8.0)).collect() };
                let (vh, xh, dyh) = (gen(l.nnz() * bh * bw), gen(m * k), gen(m * n));
                let wide = |v: &[T]| -> Vec<f32> { v.iter().map(|e| e.to_f32()).collect() };
                let (v32, x32, dy32) = (wide(&vh), wide(&xh), wide(&dyh));
                let same = |got: &[T], want32: &[f32], what: &str| {
                    let mut want = vec![T::ZERO; want32.len()];
                    T::narrow(want32, &mut want);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert_eq!(bits(*g), bits(*w), "{what} {i} ({m}, {n}, {k}, {bh}, {bw}) pattern {pattern}");
                    }
                };
                for isa in Isa::available() {
                    let (mut y32, mut yh) = (vec![0f32; m * n], vec![from(1.0); m * n]);
                    linear_on(isa, &l, &v32, &x32, m, &mut y32).unwrap();
                    linear_on(isa, &l, &vh, &xh, m, &mut yh).unwrap();
                    same(&yh, &y32, "linear");
                    let (mut d32, mut dh) = (vec![0f32; m * k], vec![from(1.0); m * k]);
                    linear_grad_input_on(isa, &l, &v32, &dy32, m, &mut d32).unwrap();
                    linear_grad_input_on(isa, &l, &vh, &dyh, m, &mut dh).unwrap();
                    same(&dh, &d32, "linear_grad_input");
                    let (mut g32, mut gh) = (vec![0f32; l.nnz() * bh * bw], vec![from(1.0); l.nnz() * bh * bw]);
                    sdd_on(isa, &l, &dy32, &x32, m, &mut g32).unwrap();
                    sdd_on(isa, &l, &dyh, &xh, m, &mut gh).unwrap();
                    same(&gh, &g32, "sdd");
                }
            }
        }
    }

    #[test]
    fn f16_is_the_f32_path_on_widened_inputs_rounded_once() {
        half_matches_f32_on_widened(half::f16::from_f32, half::f16::to_bits);
    }

    #[test]
    fn bf16_is_the_f32_path_on_widened_inputs_rounded_once() {
        half_matches_f32_on_widened(half::bf16::from_f32, half::bf16::to_bits);
    }

    #[test]
    fn bad_layouts_are_errors() {
        let o = make(4, 4, 2, 2, &|r, c| r == c);
        let mut bad = Owned { ci: vec![1, 1], ..make(4, 4, 2, 2, &|r, c| r == c) };
        assert!(bad.layout().validate().is_err());
        bad = Owned { ro: vec![0, 1], ..make(4, 4, 2, 2, &|r, c| r == c) };
        assert!(bad.layout().validate().is_err());
        bad = Owned { tp: vec![1, 0], ..make(4, 4, 2, 2, &|r, c| r == c) };
        assert!(bad.layout().validate().is_err());
        bad = Owned { ci: vec![0, 5], ..make(4, 4, 2, 2, &|r, c| r == c) };
        assert!(bad.layout().validate().is_err());
        let l = Layout { n: 5, ..o.layout() };
        assert!(l.validate().is_err());
        let l = Layout { bh: 0, ..o.layout() };
        assert!(l.validate().is_err());
        let mut y = vec![0f32; 3];
        assert!(linear(&o.layout(), &[0.0; 8], &[0.0; 4], 1, &mut y).is_err());
    }
}
