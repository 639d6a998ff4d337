//! Throughput of the core selection routines against a plain streaming pass over the same data.
//!
//! Run (from the repository root):
//!
//! ```text
//! cargo bench -p sparsekit-core --bench select -- --warm-up-time 1 --measurement-time 5
//! ```
//!
//! Every benchmark reports `Throughput::Bytes` = bytes of f32 input read once (4 * n), so criterion
//! prints GB/s (GiB/s) that compare directly:
//!
//! - `floor/*`: the cheapest possible pass over the input, i.e. the memory-bandwidth floor.
//!   `sum_abs_iter_1t` is the literal `iter().map(|x| x.abs()).sum::<f32>()` (one thread, a serial
//!   add chain, so it is latency-bound rather than bandwidth-bound); `sum_abs_lanes_1t` is a 16-lane
//!   chunked sum (vectorised, one thread); `sum_abs_lanes_par` is the same chunked sum run in the
//!   sparsekit rayon pool over the same 64 slices, the fair floor for the (parallel) select routines.
//! - `topk_masks/*`: `select::topk_masks` over 64 slices, k = 10 %, `Order::Abs` (threshold + masks).
//! - `phase_threshold/*`: only the threshold search of `topk_masks` (`radix::topk_threshold`).
//! - `phase_write_masks/*`: only the mask-writing pass of `topk_masks` (`mask::write_masks`).
//! - `phase_bracket_scan/*`, `phase_bracket_select/*`: the threshold search split further: the
//!   sampled-bracket counting/gathering pass over all data (`bracket::bracket_pass`), then the exact
//!   select among the gathered in-bracket keys (`Bracket::threshold`, single-threaded).
//! - `floor/abs_ge_write_par`: the mask-writing floor, one parallel pass `m = |x| >= t` (read 4 B,
//!   write 1 B per element) outside sparsekit's code, to compare with `phase_write_masks`.
//! - `kth_values/*`: `select::kth_values`, one rank (n/10), `Order::Value` (the `kth_largest` path) and
//!   two adjacent ranks (the `quantile(x, 0.9)` path).
//!
//! - `topk_masks_tied/*`, `phase_write_masks_tied/*` (2**26 only): the same on data with heavy ties at
//!   the threshold (uniform on a 2**-23 grid), where the mask pass has to split the tied keys by index.
//!
//! - `matrix/*`: `nm_mask` 2:4 and `block_topk_mask` ((32, 32) blocks, L2, density 0.1) on a 4096 x 4096
//!   matrix, the block-scoring phase alone (`block::block_scores`), and the read floor on that matrix.
//!
//! Sizes: 2**24 and 2**26 f32 split into 64 slices of varied sizes (the shapes of a small transformer:
//! embedding, q/k/v/o, gate/up/down, norms), standard-normal data from a fixed-seed generator.
//! Worker threads follow `SPARSEKIT_NUM_THREADS` (default: all cores).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use rayon::prelude::*;
use sparsekit_core::select::{self, block, bracket, mask, pieces, radix, BlockGrid, BlockNorm, Order};

/// Slice lengths of a 64-tensor "model" totalling 2**26 elements (same layout as benches/bench_select.py):
/// 7 layers of [norm, q, k, v, o, norm, gate, up, down] plus an embedding.
fn model_sizes_2_26() -> Vec<usize> {
    let d = 1024;
    let mut sizes = vec![15346 * d];
    for _ in 0..7 {
        sizes.extend([d, d * d, 256 * d, 256 * d, d * d, d, 1536 * d, 1536 * d, d * 1536]);
    }
    assert_eq!(sizes.len(), 64);
    assert_eq!(sizes.iter().sum::<usize>(), 1 << 26);
    sizes
}

fn model_sizes(total_log2: u32) -> Vec<usize> {
    let div = 1usize << (26 - total_log2);
    let sizes: Vec<usize> = model_sizes_2_26().into_iter().map(|s| s / div).collect();
    assert_eq!(sizes.iter().sum::<usize>(), 1 << total_log2);
    sizes
}

struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1) with 53 random bits.
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
}

#[derive(Clone, Copy)]
enum Dist {
    /// Standard normal (Box-Muller in f64, rounded to f32): continuous, like trained weights; only a
    /// handful of exactly equal values near the threshold.
    Normal,
    /// Uniform in (-1, 1) on a 2**-23 grid: |x| takes 2**23 values, so at 2**26 elements every value
    /// repeats ~8 times and the k-th largest is tied (exercises the tie-splitting mask path).
    UniformGrid,
}

fn fill(out: &mut [f32], seed: u64, dist: Dist) {
    let mut rng = SplitMix(seed);
    match dist {
        Dist::Normal => {
            for pair in out.chunks_mut(2) {
                let (u1, u2) = (rng.unit(), rng.unit());
                let r = (-2.0 * u1.ln()).sqrt();
                let t = std::f64::consts::TAU * u2;
                pair[0] = (r * t.cos()) as f32;
                if pair.len() > 1 {
                    pair[1] = (r * t.sin()) as f32;
                }
            }
        }
        Dist::UniformGrid => {
            for x in out.iter_mut() {
                *x = ((rng.next() >> 40) as f32 + 0.5) / (1u64 << 23) as f32 - 1.0;
            }
        }
    }
}

struct Data {
    slices: Vec<Vec<f32>>,
    masks: Vec<Vec<bool>>,
    n: u64,
}

impl Data {
    fn new(total_log2: u32, seed: u64, dist: Dist) -> Self {
        let sizes = model_sizes(total_log2);
        let slices: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let mut v = vec![0f32; len];
                fill(&mut v, seed ^ (i as u64).wrapping_mul(0x1234_5678_9ABC_DEF1), dist);
                v
            })
            .collect();
        let masks = sizes.iter().map(|&len| vec![false; len]).collect();
        Data { slices, masks, n: 1u64 << total_log2 }
    }
    fn sources(&self) -> Vec<&[f32]> {
        self.slices.iter().map(|s| s.as_slice()).collect()
    }
}

#[inline]
fn sum_abs_lanes(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            acc[i] += c[i].abs();
        }
    }
    acc.iter().sum::<f32>() + rest.iter().map(|x| x.abs()).sum::<f32>()
}

fn bench_select(c: &mut Criterion) {
    for total_log2 in [24u32, 26] {
        let mut data = Data::new(total_log2, 0x5EED + total_log2 as u64, Dist::Normal);
        let n = data.n;
        let k = n / 10;
        let label = format!("2^{total_log2}");
        let bytes = n * 4;

        let mut group = c.benchmark_group("select");
        group.sample_size(10).sampling_mode(SamplingMode::Flat).throughput(Throughput::Bytes(bytes));

        // ---- floors: one read of the input
        {
            let sources = data.sources();
            group.bench_function(BenchmarkId::new("floor/sum_abs_iter_1t", &label), |b| {
                b.iter(|| black_box(sources.iter().map(|s| s.iter().map(|x| x.abs()).sum::<f32>()).sum::<f32>()))
            });
            group.bench_function(BenchmarkId::new("floor/sum_abs_lanes_1t", &label), |b| {
                b.iter(|| black_box(sources.iter().map(|s| sum_abs_lanes(s)).sum::<f32>()))
            });
            group.bench_function(BenchmarkId::new("floor/sum_abs_lanes_par", &label), |b| {
                b.iter(|| {
                    black_box(sparsekit_core::pool::install(|| {
                        sources
                            .par_iter()
                            .flat_map_iter(|s| s.chunks(1 << 16))
                            .map(sum_abs_lanes)
                            .sum::<f32>()
                    }))
                })
            });
        }

        // ---- the full routine: threshold + masks
        {
            let sources: Vec<&[f32]> = data.slices.iter().map(|s| s.as_slice()).collect();
            let mut masks: Vec<&mut [bool]> = data.masks.iter_mut().map(|m| m.as_mut_slice()).collect();
            group.bench_function(BenchmarkId::new("topk_masks/abs_k10pct", &label), |b| {
                b.iter(|| select::topk_masks(black_box(&sources), &mut masks, k, Order::Abs).unwrap())
            });
            select::topk_masks(&sources, &mut masks, k, Order::Abs).unwrap(); // check, even when filtered out
            let kept: usize = masks.iter().map(|m| m.iter().filter(|&&b| b).count()).sum();
            assert_eq!(kept as u64, k);

            // ---- its two phases, separately
            group.bench_function(BenchmarkId::new("phase_threshold/abs_k10pct", &label), |b| {
                b.iter(|| {
                    sparsekit_core::pool::install(|| radix::topk_threshold(black_box(&sources), k, Order::Abs).unwrap())
                })
            });
            let threshold = sparsekit_core::pool::install(|| radix::topk_threshold(&sources, k, Order::Abs).unwrap());
            let t = threshold.expect("k > 0");
            let tkey = t.key;
            eprintln!("threshold at {label}: {} greater, {} equal, k = {k} (one-pass mask: {})", t.greater, t.equal,
                      t.take_equal(k) == t.equal);
            group.bench_function(BenchmarkId::new("floor/abs_ge_write_par", &label), |b| {
                b.iter(|| {
                    sparsekit_core::pool::install(|| {
                        sources.par_iter().zip(masks.par_iter_mut()).for_each(|(s, m)| {
                            s.par_chunks(1 << 16).zip(m.par_chunks_mut(1 << 16)).for_each(|(s, m)| {
                                let t = black_box(tkey);
                                for (o, &x) in m.iter_mut().zip(s) {
                                    *o = (x.to_bits() & 0x7FFF_FFFF) >= t;
                                }
                            })
                        })
                    })
                })
            });
            // the bracket pass and the in-bracket select (the fast path of the threshold search)
            let pcs = pieces::split(&sources);
            let max_inside = (n / 4) / 4;
            group.bench_function(BenchmarkId::new("phase_bracket_scan/abs_k10pct", &label), |b| {
                b.iter(|| {
                    sparsekit_core::pool::install(|| {
                        bracket::bracket_pass(black_box(&pcs), n, k, Order::Abs, max_inside).expect("bracket")
                    })
                })
            });
            let br = sparsekit_core::pool::install(|| bracket::bracket_pass(&pcs, n, k, Order::Abs, max_inside).unwrap());
            eprintln!("bracket at {label}: {} keys inside ({:.2} % of n), {} above", br.inside.len(),
                      100.0 * br.inside.len() as f64 / n as f64, br.above);
            group.bench_function(BenchmarkId::new("phase_bracket_select/abs_k10pct", &label), |b| {
                b.iter(|| black_box(&br).threshold(k).expect("inside"))
            });
            group.bench_function(BenchmarkId::new("phase_write_masks/abs_k10pct", &label), |b| {
                b.iter(|| {
                    sparsekit_core::pool::install(|| {
                        mask::write_masks(black_box(&sources), &mut masks, threshold, k, Order::Abs).unwrap()
                    })
                })
            });
        }

        // ---- order statistics
        {
            let sources = data.sources();
            group.bench_function(BenchmarkId::new("kth_values/value_1rank", &label), |b| {
                b.iter(|| select::kth_values(black_box(&sources), &[k], Order::Value).unwrap())
            });
            // quantile(x, 0.9): ranks floor/ceil of 0.9 * (n - 1), as the Python wrapper asks for them.
            let pos = (0.9f64 * (n - 1) as f64).floor() as u64;
            let ranks = [n - pos, n - pos - 1];
            group.bench_function(BenchmarkId::new("kth_values/value_2ranks_q0.9", &label), |b| {
                b.iter(|| select::kth_values(black_box(&sources), &ranks, Order::Value).unwrap())
            });
        }
        group.finish();
    }

    // Heavy ties at the threshold: the mask pass must split the tied keys by index (two passes).
    let mut data = Data::new(26, 0x7135, Dist::UniformGrid);
    let n = data.n;
    let k = n / 10;
    let mut group = c.benchmark_group("select");
    group.sample_size(10).sampling_mode(SamplingMode::Flat).throughput(Throughput::Bytes(n * 4));
    let sources: Vec<&[f32]> = data.slices.iter().map(|s| s.as_slice()).collect();
    let mut masks: Vec<&mut [bool]> = data.masks.iter_mut().map(|m| m.as_mut_slice()).collect();
    let t = sparsekit_core::pool::install(|| radix::topk_threshold(&sources, k, Order::Abs).unwrap()).unwrap();
    eprintln!("tied data at 2^26: {} greater, {} equal, k = {k} (one-pass mask: {})", t.greater, t.equal,
              t.take_equal(k) == t.equal);
    group.bench_function(BenchmarkId::new("topk_masks_tied/abs_k10pct", "2^26"), |b| {
        b.iter(|| select::topk_masks(black_box(&sources), &mut masks, k, Order::Abs).unwrap())
    });
    group.bench_function(BenchmarkId::new("phase_write_masks_tied/abs_k10pct", "2^26"), |b| {
        b.iter(|| {
            sparsekit_core::pool::install(|| {
                mask::write_masks(black_box(&sources), &mut masks, Some(t), k, Order::Abs).unwrap()
            })
        })
    });
    group.finish();
}

/// nm_mask and block_topk_mask on one 4096 x 4096 matrix, with the block-score phase on its own.
fn bench_matrix(c: &mut Criterion) {
    let (rows, cols) = (4096usize, 4096usize);
    let mut x = vec![0f32; rows * cols];
    fill(&mut x, 0x4D41_5452, Dist::Normal);
    let mut out = vec![false; rows * cols];
    let grid = BlockGrid { rows, cols, bh: 32, bw: 32 };
    let mut block_out = vec![false; grid.num_blocks()];
    let kb = (0.1 * grid.num_blocks() as f64 + 0.5).floor() as u64;

    let mut group = c.benchmark_group("matrix");
    group.sample_size(10).sampling_mode(SamplingMode::Flat).throughput(Throughput::Bytes((rows * cols * 4) as u64));
    group.bench_function(BenchmarkId::new("floor/sum_abs_lanes_par", "4096x4096"), |b| {
        b.iter(|| sparsekit_core::pool::install(|| x.par_chunks(1 << 16).map(sum_abs_lanes).sum::<f32>()))
    });
    group.bench_function(BenchmarkId::new("nm_mask/2:4", "4096x4096"), |b| {
        b.iter(|| select::nm_mask(black_box(&x), &mut out, cols, 1, 2, 4, Order::Abs).unwrap())
    });
    group.bench_function(BenchmarkId::new("block_topk_mask/32x32_l2_d0.1", "4096x4096"), |b| {
        b.iter(|| select::block_topk_mask(black_box(&x), grid, kb, BlockNorm::L2, &mut out, &mut block_out).unwrap())
    });
    group.bench_function(BenchmarkId::new("phase_block_scores/32x32_l2", "4096x4096"), |b| {
        b.iter(|| sparsekit_core::pool::install(|| block::block_scores(black_box(&x), grid, BlockNorm::L2).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, bench_select, bench_matrix);
criterion_main!(benches);
