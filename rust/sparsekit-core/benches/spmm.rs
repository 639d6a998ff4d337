//! GFLOP/s of the block-sparse kernels on their stored blocks.
//!
//! Run (from the repository root):
//!
//! ```text
//! cargo bench -p sparsekit-core --bench spmm -- --warm-up-time 1 --measurement-time 5
//! ```
//!
//! x `[4096, 2048]`, W `2048 x 2048` in 32 x 32 blocks at 10 % and 50 % block density (fixed-seed
//! random layout), f32. Each benchmark reports `Throughput::Elements` = floating-point operations on
//! the stored blocks (`2 * m * nnz * 32 * 32`), so criterion's "elem/s" reads as FLOP/s:
//! `linear` (DSD forward, `x @ W^T`), `linear_grad_input` (dX = `dy @ W`, through the transpose
//! metadata), `sdd` (dW at W's blocks). Compare with dense GEMM GFLOP/s on the same machine
//! (`benches/bench_spmm.py` prints torch's). Worker threads follow `SPARSEKIT_NUM_THREADS`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sparsekit_core::spmm::{self, Layout};

struct Owned {
    ro: Vec<i64>,
    ci: Vec<i64>,
    to: Vec<i64>,
    tp: Vec<i64>,
    tr: Vec<i64>,
}

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    ((*seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
}

fn layout(nbr: usize, nbc: usize, density: f32, seed: &mut u64) -> Owned {
    let (mut ro, mut ci, mut rows) = (vec![0i64], vec![], vec![]);
    for r in 0..nbr {
        for c in 0..nbc {
            if lcg(seed) + 0.5 < density {
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
    Owned { ro, ci, to, tp, tr }
}

fn bench(c: &mut Criterion) {
    let (m, n, k, b) = (4096usize, 2048usize, 2048usize, 32usize);
    let mut seed = 11u64;
    let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
    let dy: Vec<f32> = (0..m * n).map(|_| lcg(&mut seed)).collect();
    let mut g = c.benchmark_group("spmm");
    g.sample_size(10);
    for density in [0.1f32, 0.5] {
        let o = layout(n / b, k / b, density, &mut seed);
        let l = Layout {
            n,
            k,
            bh: b,
            bw: b,
            row_offsets: &o.ro,
            col_indices: &o.ci,
            t_offsets: &o.to,
            t_perm: &o.tp,
            t_row_indices: &o.tr,
        };
        let values: Vec<f32> = (0..o.ci.len() * b * b).map(|_| lcg(&mut seed)).collect();
        g.throughput(Throughput::Elements((2 * m * o.ci.len() * b * b) as u64));
        let id = format!("{:.0}%", density * 100.0);
        let mut y = vec![0f32; m * n];
        g.bench_with_input(BenchmarkId::new("linear", &id), &(), |bch, _| {
            bch.iter(|| spmm::linear(&l, &values, black_box(&x), m, &mut y).unwrap())
        });
        let mut dx = vec![0f32; m * k];
        g.bench_with_input(BenchmarkId::new("linear_grad_input", &id), &(), |bch, _| {
            bch.iter(|| spmm::linear_grad_input(&l, &values, black_box(&dy), m, &mut dx).unwrap())
        });
        let mut dv = vec![0f32; values.len()];
        g.bench_with_input(BenchmarkId::new("sdd", &id), &(), |bch, _| {
            bch.iter(|| spmm::sdd(&l, black_box(&dy), &x, m, &mut dv).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
