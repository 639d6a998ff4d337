//! CPU block-sparse GEMM: BSR layout, transpose metadata, SIMD-friendly micro-kernels (DSD, SDD).
//!
//! `W` is `[n, k]`, stored as `nnz` dense blocks of `bh x bw` (row-major, `values[nnz * bh * bw]`), in
//! block-row order: block-row `r` holds blocks `row_offsets[r]..row_offsets[r + 1]`, whose block-columns
//! are `col_indices[..]` (strictly increasing within a block-row). The transpose metadata lists the same
//! blocks in block-column order: column `c` holds `t_offsets[c]..t_offsets[c + 1]`, entry `j` is block
//! `t_perm[j]` (an index into the row-ordered blocks) lying in block-row `t_row_indices[j]`.
//!
//! Kernels (all f32, dense operands row-major and contiguous):
//! * [`linear`]: `y[m, n] = x[m, k] @ W^T` (DSD forward),
//! * [`linear_grad_input`]: `dx[m, k] = dy[m, n] @ W` (via the transpose metadata),
//! * [`sdd`]: `out[b] = a[:, r-block]^T @ b[:, c-block]` for every stored block `b = (r, c)`.
//!
//! Every inner loop runs over a contiguous dimension (axpy form), so the compiler vectorises it; an
//! AVX2+FMA build of each kernel is picked at run time when the CPU has it.

use rayon::prelude::*;

use crate::error::CoreError;
use crate::pool;

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
        if self.n % self.bh != 0 || self.k % self.bw != 0 {
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
            for b in s..e {
                let c = self.col_indices[b];
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
                    return Err(invalid("t_row_indices", format!("entry {j} does not match the block-row of block {b}")));
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

/// Rows of the dense operand one task handles.
const PANEL: usize = 16;

#[inline(always)]
fn axpy(out: &mut [f32], a: f32, x: &[f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o += a * v;
    }
}

#[inline(always)]
fn linear_panel(l: &Layout<'_>, vt: &[f32], x: &[f32], y: &mut [f32]) {
    let (bh, bw, n, k) = (l.bh, l.bw, l.n, l.k);
    let rows = y.len() / n.max(1);
    let bs = bh * bw;
    for r in 0..l.block_rows() {
        let (s, e) = (l.row_offsets[r] as usize, l.row_offsets[r + 1] as usize);
        for m in 0..rows {
            let yo = &mut y[m * n + r * bh..m * n + r * bh + bh];
            let xr = &x[m * k..m * k + k];
            for b in s..e {
                let c = l.col_indices[b] as usize;
                let blk = &vt[b * bs..b * bs + bs];
                let xs = &xr[c * bw..c * bw + bw];
                for (j, &xv) in xs.iter().enumerate() {
                    axpy(yo, xv, &blk[j * bh..j * bh + bh]);
                }
            }
        }
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
unsafe fn linear_panel_avx2(l: &Layout<'_>, vt: &[f32], x: &[f32], y: &mut [f32]) {
    linear_panel(l, vt, x, y)
}

#[inline(always)]
fn grad_panel(l: &Layout<'_>, values: &[f32], dy: &[f32], dx: &mut [f32]) {
    let (bh, bw, n, k) = (l.bh, l.bw, l.n, l.k);
    let rows = dx.len() / k.max(1);
    let bs = bh * bw;
    for c in 0..l.block_cols() {
        let (s, e) = (l.t_offsets[c] as usize, l.t_offsets[c + 1] as usize);
        for m in 0..rows {
            let xo = &mut dx[m * k + c * bw..m * k + c * bw + bw];
            let dyr = &dy[m * n..m * n + n];
            for j in s..e {
                let b = l.t_perm[j] as usize;
                let r = l.t_row_indices[j] as usize;
                let blk = &values[b * bs..b * bs + bs];
                for (i, &g) in dyr[r * bh..r * bh + bh].iter().enumerate() {
                    axpy(xo, g, &blk[i * bw..i * bw + bw]);
                }
            }
        }
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
unsafe fn grad_panel_avx2(l: &Layout<'_>, values: &[f32], dy: &[f32], dx: &mut [f32]) {
    grad_panel(l, values, dy, dx)
}

#[inline(always)]
fn sdd_block(l: &Layout<'_>, m: usize, r: usize, c: usize, a: &[f32], b: &[f32], out: &mut [f32]) {
    let (bh, bw, n, k) = (l.bh, l.bw, l.n, l.k);
    out.fill(0.0);
    for row in 0..m {
        let ar = &a[row * n + r * bh..row * n + r * bh + bh];
        let br = &b[row * k + c * bw..row * k + c * bw + bw];
        for (i, &av) in ar.iter().enumerate() {
            axpy(&mut out[i * bw..i * bw + bw], av, br);
        }
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn sdd_block_avx2(l: &Layout<'_>, m: usize, r: usize, c: usize, a: &[f32], b: &[f32], out: &mut [f32]) {
    sdd_block(l, m, r, c, a, b, out)
}

fn has_avx2() -> bool {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    {
        false
    }
}

/// `y[m, n] = x[m, k] @ W^T`; `y` is overwritten.
pub fn linear(l: &Layout<'_>, values: &[f32], x: &[f32], m: usize, y: &mut [f32]) -> Result<(), CoreError> {
    l.validate()?;
    let bs = l.bh * l.bw;
    check_len("values", values.len(), l.nnz() * bs)?;
    check_len("x", x.len(), m * l.k)?;
    check_len("out", y.len(), m * l.n)?;
    y.fill(0.0);
    if m == 0 || l.n == 0 {
        return Ok(());
    }
    let avx = has_avx2();
    pool::install(|| {
        // Blocks transposed to [bw, bh] so the inner loop runs over contiguous output columns.
        let mut vt = vec![0f32; values.len()];
        vt.par_chunks_mut(bs.max(1)).zip(values.par_chunks(bs.max(1))).for_each(|(t, v)| {
            for i in 0..l.bh {
                for j in 0..l.bw {
                    t[j * l.bh + i] = v[i * l.bw + j];
                }
            }
        });
        y.par_chunks_mut(PANEL * l.n).zip(x.par_chunks(PANEL * l.k.max(1))).for_each(|(yp, xp)| {
            #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
            if avx {
                // SAFETY: the CPU supports avx2 and fma (checked above).
                unsafe { linear_panel_avx2(l, &vt, xp, yp) };
                return;
            }
            let _ = avx;
            linear_panel(l, &vt, xp, yp)
        });
    });
    Ok(())
}

/// `dx[m, k] = dy[m, n] @ W`; `dx` is overwritten.
pub fn linear_grad_input(l: &Layout<'_>, values: &[f32], dy: &[f32], m: usize, dx: &mut [f32]) -> Result<(), CoreError> {
    l.validate()?;
    check_len("values", values.len(), l.nnz() * l.bh * l.bw)?;
    check_len("dy", dy.len(), m * l.n)?;
    check_len("out", dx.len(), m * l.k)?;
    dx.fill(0.0);
    if m == 0 || l.k == 0 {
        return Ok(());
    }
    let avx = has_avx2();
    pool::install(|| {
        dx.par_chunks_mut(PANEL * l.k).zip(dy.par_chunks(PANEL * l.n.max(1))).for_each(|(xp, dp)| {
            #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
            if avx {
                // SAFETY: the CPU supports avx2 and fma (checked above).
                unsafe { grad_panel_avx2(l, values, dp, xp) };
                return;
            }
            let _ = avx;
            grad_panel(l, values, dp, xp)
        });
    });
    Ok(())
}

/// `out[b] = a[:, r-block]^T @ b[:, c-block]` for every stored block `b = (r, c)`; `a` is `[m, n]`,
/// `b` is `[m, k]`, `out` is `[nnz, bh, bw]` (overwritten).
pub fn sdd(l: &Layout<'_>, a: &[f32], b: &[f32], m: usize, out: &mut [f32]) -> Result<(), CoreError> {
    l.validate()?;
    let bs = l.bh * l.bw;
    check_len("a", a.len(), m * l.n)?;
    check_len("b", b.len(), m * l.k)?;
    check_len("out", out.len(), l.nnz() * bs)?;
    if l.nnz() == 0 {
        return Ok(());
    }
    let mut block_row = vec![0usize; l.nnz()];
    for r in 0..l.block_rows() {
        for br in &mut block_row[l.row_offsets[r] as usize..l.row_offsets[r + 1] as usize] {
            *br = r;
        }
    }
    let avx = has_avx2();
    pool::install(|| {
        out.par_chunks_mut(bs).enumerate().for_each(|(blk, o)| {
            let (r, c) = (block_row[blk], l.col_indices[blk] as usize);
            #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
            if avx {
                // SAFETY: the CPU supports avx2 and fma (checked above).
                unsafe { sdd_block_avx2(l, m, r, c, a, b, o) };
                return;
            }
            let _ = avx;
            sdd_block(l, m, r, c, a, b, o)
        });
    });
    Ok(())
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
        for &(m, n, k, bh, bw) in &[(5, 8, 12, 2, 3), (37, 64, 32, 16, 8), (1, 4, 4, 4, 4), (20, 6, 10, 1, 1), (0, 4, 4, 2, 2)] {
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
                let mut y = vec![1f32; m * n];
                linear(&l, &values, &x, m, &mut y).unwrap();
                let mut yr = vec![0f32; m * n];
                for a in 0..m {
                    for i in 0..n {
                        yr[a * n + i] = (0..k).map(|j| x[a * k + j] * w[i * k + j]).sum();
                    }
                }
                close(&y, &yr);
                let mut dx = vec![1f32; m * k];
                linear_grad_input(&l, &values, &dy, m, &mut dx).unwrap();
                let mut dxr = vec![0f32; m * k];
                for a in 0..m {
                    for j in 0..k {
                        dxr[a * k + j] = (0..n).map(|i| dy[a * n + i] * w[i * k + j]).sum();
                    }
                }
                close(&dx, &dxr);
                let mut g = vec![1f32; l.nnz() * bh * bw];
                sdd(&l, &dy, &x, m, &mut g).unwrap();
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
