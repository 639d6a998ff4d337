//! Selection against a plain stable-sort reference: random data, heavy ties, every radix path
//! (one pass, gather, extra histogram passes), many sources, NaN, and thread-count independence.

use half::{bf16, f16};
use sparsekit_core::pool;
use sparsekit_core::select::radix::{self, Strategy};
use sparsekit_core::select::{self, BlockGrid, BlockNorm, Order, Score};
use sparsekit_core::CoreError;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit().max(1e-300), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// Reference: stable sort of global indices by descending key, keep the first k.
fn reference_masks<T: Score>(sources: &[&[T]], k: usize, order: Order) -> Vec<Vec<bool>> {
    let mut all: Vec<(T::Key, usize, usize)> = Vec::new();
    for (s, src) in sources.iter().enumerate() {
        for (i, &x) in src.iter().enumerate() {
            all.push((x.key(order), s, i));
        }
    }
    all.sort_by(|a, b| b.0.cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
    let mut masks: Vec<Vec<bool>> = sources.iter().map(|s| vec![false; s.len()]).collect();
    for &(_, s, i) in &all[..k] {
        masks[s][i] = true;
    }
    masks
}

fn ours<T: Score>(sources: &[&[T]], k: u64, order: Order) -> Result<Vec<Vec<bool>>, CoreError> {
    let mut masks: Vec<Vec<bool>> = sources.iter().map(|s| vec![false; s.len()]).collect();
    let mut views: Vec<&mut [bool]> = masks.iter_mut().map(|m| m.as_mut_slice()).collect();
    select::topk_masks(sources, &mut views, k, order)?;
    Ok(masks)
}

fn check<T: Score>(sources: &[&[T]], ks: &[usize]) {
    for order in [Order::Abs, Order::Value] {
        for &k in ks {
            assert_eq!(ours(sources, k as u64, order).unwrap(), reference_masks(sources, k, order), "k={k} {order:?}");
            if k > 0 {
                // The radix fallback alone must find the same threshold as the sampled fast path.
                let auto = radix::kth_keys_with(sources, &[k as u64], order, Strategy::Auto).unwrap();
                let radix_only = radix::kth_keys_with(sources, &[k as u64], order, Strategy::RadixOnly).unwrap();
                assert_eq!(auto, radix_only, "k={k} {order:?}");
            }
        }
    }
}

fn ks_for(n: usize) -> Vec<usize> {
    let mut ks = vec![0, 1, n / 10, n / 2, n.saturating_sub(1), n];
    ks.retain(|&k| k <= n);
    ks
}

#[test]
fn random_f32_single_and_many_sources() {
    let mut rng = Rng(7);
    let data: Vec<f32> = (0..300_000).map(|_| rng.normal() as f32).collect();
    check(&[&data[..]], &ks_for(data.len()));
    let parts: Vec<&[f32]> = vec![&data[..0], &data[..1000], &data[1000..1000], &data[1000..250_000], &data[250_000..]];
    check(&parts, &ks_for(data.len()));
}

#[test]
fn heavy_ties_keep_lowest_indices() {
    let mut rng = Rng(11);
    let data: Vec<f32> = (0..200_000).map(|_| [0.0f32, -0.0, 1.0, -1.0, 2.0][(rng.next() % 5) as usize]).collect();
    let parts: Vec<&[f32]> = data.chunks(70_001).collect();
    check(&parts, &[0, 1, 39_999, 40_000, 40_001, 100_000, 199_999, 200_000]);
}

#[test]
fn narrow_range_forces_second_histogram_pass() {
    // Every value shares its top 16 key bits: the first pass cannot split them, so either the gather
    // or the next histogram pass has to.
    let mut rng = Rng(3);
    let data: Vec<f32> = (0..1 << 20).map(|_| 1.0 + (rng.unit() as f32) * 0.0078).collect();
    check(&[&data[..]], &[1, 12_345, 1 << 19]);
    let wide: Vec<f64> = (0..1 << 20).map(|_| 1.0 + rng.unit() * 1e-3).collect();
    check(&[&wide[..]], &[1, 777, (1 << 20) - 1]);
}

#[test]
fn half_types_and_f64() {
    let mut rng = Rng(5);
    let base: Vec<f64> = (0..150_000).map(|_| rng.normal() * 3.0).collect();
    let h: Vec<f16> = base.iter().map(|&v| f16::from_f64(v)).collect();
    let b: Vec<bf16> = base.iter().map(|&v| bf16::from_f64(v)).collect();
    check(&[&h[..]], &ks_for(h.len()));
    check(&[&b[..]], &ks_for(b.len()));
    check(&[&base[..]], &ks_for(base.len()));
}

#[test]
fn infinities_are_extremes() {
    let data = [1.0f32, f32::INFINITY, -f32::INFINITY, 0.0, -2.0];
    assert_eq!(ours(&[&data[..]], 2, Order::Abs).unwrap()[0], vec![false, true, true, false, false]);
    assert_eq!(ours(&[&data[..]], 1, Order::Value).unwrap()[0], vec![false, true, false, false, false]);
}

#[test]
fn nan_and_bad_k_are_errors() {
    let data = [1.0f32, f32::NAN, 3.0];
    for k in [0, 1, 3] {
        assert_eq!(ours(&[&data[..]], k, Order::Abs), Err(CoreError::NanInput { arg: "x" }));
    }
    let big: Vec<f32> = (0..100_000).map(|i| if i == 99_999 { f32::NAN } else { i as f32 }).collect();
    assert_eq!(ours(&[&big[..]], 10, Order::Value), Err(CoreError::NanInput { arg: "x" }));
    assert_eq!(ours(&[&[1.0f32, 2.0][..]], 3, Order::Abs), Err(CoreError::KOutOfRange { k: 3, n: 2 }));
    assert!(select::kth_values(&[&[1.0f32][..]], &[0], Order::Value).is_err());
    assert!(select::kth_values::<f32>(&[], &[1], Order::Value).is_err());
    let mut short = vec![false; 1];
    assert!(matches!(
        select::topk_masks(&[&[1.0f32, 2.0][..]], &mut [&mut short[..]], 1, Order::Abs),
        Err(CoreError::LengthMismatch { .. })
    ));
}

#[test]
fn kth_values_match_sorted() {
    let mut rng = Rng(9);
    let data: Vec<f32> = (0..500_000).map(|_| (rng.normal() * 10.0).round() as f32 / 4.0).collect();
    let mut sorted = data.clone();
    sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let ranks = [1u64, 2, 1000, 250_000, 499_999, 500_000];
    let got = select::kth_values(&[&data[..]], &ranks, Order::Value).unwrap();
    for (r, v) in ranks.iter().zip(got) {
        assert_eq!(v, sorted[*r as usize - 1]);
    }
    let abs = select::kth_values(&[&data[..]], &[1], Order::Abs).unwrap()[0];
    assert_eq!(abs, data.iter().fold(0.0f32, |m, v| m.max(v.abs())));
}

#[test]
fn same_answer_on_any_thread_count() {
    let mut rng = Rng(13);
    let data: Vec<f32> = (0..400_000).map(|_| ((rng.next() % 50) as f32) - 25.0).collect();
    let parts: Vec<&[f32]> = data.chunks(99_999).collect();
    let mut results = Vec::new();
    for threads in [1, 2, 3, 8] {
        pool::set_num_threads(threads).unwrap();
        results.push(ours(&parts, 123_456, Order::Abs).unwrap());
    }
    pool::set_num_threads(0).unwrap();
    assert!(results.windows(2).all(|w| w[0] == w[1]));
}

fn nm_reference(x: &[f32], len: usize, inner: usize, n: usize, m: usize) -> Vec<bool> {
    let mut out = vec![false; x.len()];
    for row in 0..x.len() / (len * inner) {
        for g in 0..len / m {
            for i in 0..inner {
                let pos = |j: usize| row * len * inner + (g * m + j) * inner + i;
                let mut idx: Vec<usize> = (0..m).collect();
                idx.sort_by(|&a, &b| x[pos(b)].abs().partial_cmp(&x[pos(a)].abs()).unwrap().then(a.cmp(&b)));
                for &j in &idx[..n] {
                    out[pos(j)] = true;
                }
            }
        }
    }
    out
}

#[test]
fn nm_masks_match_reference() {
    let mut rng = Rng(17);
    let x: Vec<f32> = (0..6 * 8 * 5).map(|_| ((rng.next() % 7) as f32) - 3.0).collect();
    for (len, inner, n, m) in [(8, 5, 2, 4), (8, 5, 1, 8), (40, 1, 2, 4), (240, 1, 3, 8), (8, 5, 0, 2), (8, 5, 4, 4), (240, 1, 3, 40)] {
        let mut out = vec![false; x.len()];
        select::nm_mask(&x, &mut out, len, inner, n, m, Order::Abs).unwrap();
        assert_eq!(out, nm_reference(&x, len, inner, n, m), "len={len} inner={inner} {n}:{m}");
    }
    let mut out = vec![false; x.len()];
    assert!(select::nm_mask(&x, &mut out, 8, 5, 5, 4, Order::Abs).is_err());
    assert!(select::nm_mask(&x, &mut out, 8, 5, 2, 3, Order::Abs).is_err());
}

#[test]
fn block_masks_match_reference() {
    let mut rng = Rng(19);
    let (rows, cols, bh, bw) = (12, 8, 3, 2);
    let x: Vec<f32> = (0..rows * cols).map(|_| ((rng.next() % 5) as f32) - 2.0).collect();
    let grid = BlockGrid { rows, cols, bh, bw };
    for norm in [BlockNorm::L1, BlockNorm::L2, BlockNorm::Max] {
        let scores = select::block::block_scores(&x, grid, norm).unwrap();
        for k in [0u64, 1, 5, 16] {
            let mut elem = vec![false; x.len()];
            let mut blocks = vec![false; grid.num_blocks()];
            select::block_topk_mask(&x, grid, k, norm, &mut elem, &mut blocks).unwrap();
            assert_eq!(vec![blocks.clone()], reference_masks(&[&scores[..]], k as usize, Order::Value));
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(elem[r * cols + c], blocks[(r / bh) * (cols / bw) + c / bw]);
                }
            }
        }
    }
    let bad = BlockGrid { rows, cols, bh: 5, bw: 2 };
    assert!(select::block::block_scores(&x, bad, BlockNorm::L2).is_err());
}

#[test]
fn one_pass_path_handles_partial_ties_in_index_order() {
    // Values on a 1/256 grid: every value repeats, so the k-th key is tied and only part of the tie
    // is kept; the bracket still holds few enough keys for the one-pass path to be taken.
    let mut rng = Rng(23);
    let data: Vec<f32> = (0..1 << 20).map(|_| ((rng.normal() * 256.0).round() / 256.0) as f32).collect();
    let parts: Vec<&[f32]> = vec![&data[..100_000], &data[100_000..100_000], &data[100_000..]];
    for order in [Order::Abs, Order::Value] {
        for k in [1usize, 1000, 104_857, 500_000] {
            let mut masks: Vec<Vec<bool>> = parts.iter().map(|s| vec![false; s.len()]).collect();
            let mut views: Vec<&mut [bool]> = masks.iter_mut().map(|m| m.as_mut_slice()).collect();
            let taken = pool::install(|| select::fused::topk_masks_one_pass(&parts, &mut views, k as u64, order)).unwrap();
            assert!(taken, "one-pass path not taken for k={k} {order:?}");
            assert_eq!(masks, reference_masks(&parts, k, order), "k={k} {order:?}");
        }
    }
}
