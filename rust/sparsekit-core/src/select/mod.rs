//! Exact selection: top-k masks (one tensor or many at once), order statistics, N:M and block masks.
//!
//! Every routine returns exactly what a stable sort by descending score would: exactly `k` elements,
//! ties broken by lowest index (source order first when there are many sources), the same on any
//! thread count. NaN scores are an error.

pub mod block;
pub mod bracket;
pub mod fused;
pub mod key;
pub mod mask;
pub mod nm;
pub mod pieces;
pub mod radix;

pub use block::{BlockGrid, BlockNorm};
pub use key::{Order, Score};
pub use radix::Threshold;

use crate::error::CoreError;
use crate::pool;

/// Top-`k` over all `sources` together: `masks[i][j]` is true for exactly `k` elements in total.
pub fn topk_masks<T: Score>(sources: &[&[T]], masks: &mut [&mut [bool]], k: u64, order: Order) -> Result<(), CoreError> {
    mask::check_outputs(sources, masks)?;
    pool::run(|| {
        if fused::topk_masks_one_pass(sources, masks, k, order)? {
            return Ok(());
        }
        // The bracket cannot serve this k (see `fused`): go straight to the radix passes.
        let threshold = radix::topk_threshold_with(sources, k, order, radix::Strategy::RadixOnly)?;
        mask::write_masks(sources, masks, threshold, k, order)
    })
}

/// The `rank`-th largest score (1-based) over all sources, for each rank. With `Order::Abs` the
/// returned values are magnitudes.
pub fn kth_values<T: Score>(sources: &[&[T]], ranks: &[u64], order: Order) -> Result<Vec<T>, CoreError> {
    pool::run(|| {
        let thresholds = radix::kth_keys(sources, ranks, order)?;
        Ok(thresholds.into_iter().map(|t| T::from_key(t.key, order)).collect())
    })
}

/// N:M mask of `x` viewed as `(outer, len, inner)`, groups of `m` along `len`.
pub fn nm_mask<T: Score>(x: &[T], out: &mut [bool], len: usize, inner: usize, n: usize, m: usize, order: Order) -> Result<(), CoreError> {
    pool::run(|| nm::nm_mask(x, out, len, inner, n, m, order))
}

/// Keep the `k` blocks of highest norm.
pub fn block_topk_mask<T: Score>(
    x: &[T],
    grid: BlockGrid,
    k: u64,
    norm: BlockNorm,
    elem_mask: &mut [bool],
    block_mask: &mut [bool],
) -> Result<(), CoreError> {
    pool::run(|| block::block_topk_mask(x, grid, k, norm, elem_mask, block_mask))
}
