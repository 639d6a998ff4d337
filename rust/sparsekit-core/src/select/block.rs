//! Block masks: score each `bh x bw` block of a matrix by a norm and keep the top-k blocks.
//!
//! Norms are accumulated in f64 in a fixed order (four interleaved accumulators per block-row
//! segment), so they are the same on every run and thread count. "l2" ranks by the sum of squares (same order as the L2 norm, no square root).
//! Equal scores are broken by lower block index (row-major over blocks).

use rayon::prelude::*;

use super::key::{Order, Score};
use super::mask::write_masks;
use super::radix::topk_threshold;
use crate::error::CoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockNorm {
    L1,
    L2,
    Max,
}

/// A `rows x cols` row-major matrix cut into `bh x bw` blocks.
#[derive(Debug, Clone, Copy)]
pub struct BlockGrid {
    pub rows: usize,
    pub cols: usize,
    pub bh: usize,
    pub bw: usize,
}

impl BlockGrid {
    pub fn check(&self, len: usize) -> Result<(), CoreError> {
        if self.bh == 0 || self.bw == 0 {
            return Err(CoreError::Invalid { arg: "block", why: format!("block sizes must be positive, got ({}, {})", self.bh, self.bw) });
        }
        if !self.rows.is_multiple_of(self.bh) || !self.cols.is_multiple_of(self.bw) {
            return Err(CoreError::Invalid {
                arg: "block",
                why: format!("block ({}, {}) does not divide the shape ({}, {})", self.bh, self.bw, self.rows, self.cols),
            });
        }
        match self.rows.checked_mul(self.cols) {
            Some(n) if n == len => {}
            Some(n) => return Err(CoreError::LengthMismatch { arg: "x", expected: n, got: len }),
            None => {
                return Err(CoreError::Invalid {
                    arg: "shape",
                    why: format!("({}, {}) overflows the address space", self.rows, self.cols),
                })
            }
        }
        Ok(())
    }
    pub fn block_rows(&self) -> usize {
        self.rows / self.bh
    }
    pub fn block_cols(&self) -> usize {
        self.cols / self.bw
    }
    pub fn num_blocks(&self) -> usize {
        self.block_rows() * self.block_cols()
    }
}

/// How one block's elements fold into its score; fixed at compile time so the inner loop is tight.
trait Fold: Copy + Send + Sync {
    /// Fold one magnitude into an accumulator.
    fn add(acc: f64, a: f64) -> f64;
    /// Merge two accumulators.
    fn combine(a: f64, b: f64) -> f64;
}
#[derive(Clone, Copy)]
struct SumAbs;
#[derive(Clone, Copy)]
struct SumSquares;
#[derive(Clone, Copy)]
struct MaxAbs;
impl Fold for SumAbs {
    #[inline(always)]
    fn add(acc: f64, a: f64) -> f64 {
        acc + a
    }
    #[inline(always)]
    fn combine(a: f64, b: f64) -> f64 {
        a + b
    }
}
impl Fold for SumSquares {
    #[inline(always)]
    fn add(acc: f64, a: f64) -> f64 {
        acc + a * a
    }
    #[inline(always)]
    fn combine(a: f64, b: f64) -> f64 {
        a + b
    }
}
impl Fold for MaxAbs {
    #[inline(always)]
    fn add(acc: f64, a: f64) -> f64 {
        acc.max(a)
    }
    #[inline(always)]
    fn combine(a: f64, b: f64) -> f64 {
        a.max(b)
    }
}

/// Fold one block-row segment of `bw` elements with four independent accumulators (a fixed order,
/// so the result is the same on every run), combined pairwise.
#[inline(always)]
fn fold_segment<T: Score, N: Fold>(seg: &[T]) -> f64 {
    let mut acc = [0.0f64; 4];
    let mut lanes = seg.chunks_exact(4);
    for c in &mut lanes {
        for i in 0..4 {
            acc[i] = N::add(acc[i], c[i].to_f64().abs());
        }
    }
    for (i, &v) in lanes.remainder().iter().enumerate() {
        acc[i] = N::add(acc[i], v.to_f64().abs());
    }
    N::combine(N::combine(acc[0], acc[1]), N::combine(acc[2], acc[3]))
}

fn block_scores_with<T: Score, N: Fold>(x: &[T], grid: BlockGrid, scores: &mut [f64]) -> Result<(), CoreError> {
    let bc = grid.block_cols();
    scores.par_chunks_mut(bc).enumerate().try_for_each(|(br, row_scores)| {
        let rows = &x[br * grid.bh * grid.cols..(br + 1) * grid.bh * grid.cols];
        if rows.iter().any(|v| v.is_nan()) {
            return Err(CoreError::NanInput { arg: "x" });
        }
        for row in rows.chunks_exact(grid.cols) {
            for (acc, seg) in row_scores.iter_mut().zip(row.chunks_exact(grid.bw)) {
                *acc = N::combine(*acc, fold_segment::<T, N>(seg));
            }
        }
        Ok(())
    })
}

/// One score per block, row-major over blocks.
pub fn block_scores<T: Score>(x: &[T], grid: BlockGrid, norm: BlockNorm) -> Result<Vec<f64>, CoreError> {
    grid.check(x.len())?;
    let mut scores = vec![0.0f64; grid.num_blocks()];
    if scores.is_empty() {
        return Ok(scores);
    }
    match norm {
        BlockNorm::L1 => block_scores_with::<T, SumAbs>(x, grid, &mut scores)?,
        BlockNorm::L2 => block_scores_with::<T, SumSquares>(x, grid, &mut scores)?,
        BlockNorm::Max => block_scores_with::<T, MaxAbs>(x, grid, &mut scores)?,
    }
    Ok(scores)
}

/// Keep the `k` highest-scoring blocks: fills the element mask and the block mask.
pub fn block_topk_mask<T: Score>(
    x: &[T],
    grid: BlockGrid,
    k: u64,
    norm: BlockNorm,
    elem_mask: &mut [bool],
    block_mask: &mut [bool],
) -> Result<(), CoreError> {
    grid.check(x.len())?;
    if elem_mask.len() != x.len() {
        return Err(CoreError::LengthMismatch { arg: "mask", expected: x.len(), got: elem_mask.len() });
    }
    if block_mask.len() != grid.num_blocks() {
        return Err(CoreError::LengthMismatch { arg: "block_mask", expected: grid.num_blocks(), got: block_mask.len() });
    }
    let scores = block_scores(x, grid, norm)?;
    let sources = [&scores[..]];
    let threshold = topk_threshold(&sources, k, Order::Value)?;
    write_masks(&sources, &mut [&mut *block_mask], threshold, k, Order::Value)?;
    if x.is_empty() {
        return Ok(());
    }
    let bc = grid.block_cols();
    let block_mask = &*block_mask;
    elem_mask.par_chunks_mut(grid.cols).enumerate().for_each(|(r, row)| {
        let blocks = &block_mask[(r / grid.bh) * bc..(r / grid.bh + 1) * bc];
        for (chunk, &keep) in row.chunks_mut(grid.bw).zip(blocks) {
            chunk.fill(keep);
        }
    });
    Ok(())
}
