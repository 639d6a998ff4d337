//! Timing of one RigL mask update (`sparsity::update`) and the gradient-masking pass (`zero_off`) on a
//! 100M-parameter model (50 layers of 1414^2 float32, density 0.1, global), without Python. A
//! development aid beside benches/bench_sparsity.py (which is where the ratios against torch come from).
//!
//! ```text
//! cargo run -p sparsekit-core --profile fast --example sparsity_update -- [layers] [rounds]
//! ```

use std::time::Instant;

use sparsekit_core::sparsity::{update, zero_off, Counts, Layer};

fn lcg(seed: &mut u64) -> u32 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (*seed >> 32) as u32
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().unwrap()).collect();
    let layers = args.first().copied().unwrap_or(50);
    let rounds = args.get(1).copied().unwrap_or(5);
    let n = 1414 * 1414;
    let mut seed = 1u64;
    let unit = |s: &mut u64| (lcg(s) as f32 / u32::MAX as f32) * 2.0 - 1.0;
    let mut masks: Vec<Vec<bool>> = (0..layers).map(|_| (0..n).map(|_| lcg(&mut seed) % 10 == 0).collect()).collect();
    let mut ws: Vec<Vec<f32>> = masks.iter().map(|m| m.iter().map(|&on| if on { unit(&mut seed) } else { 0.0 }).collect()).collect();
    let mut gs: Vec<Vec<f32>> = (0..layers).map(|_| (0..n).map(|_| unit(&mut seed)).collect()).collect();
    let active: u64 = masks.iter().map(|m| m.iter().filter(|&&b| b).count() as u64).sum();
    let keep = active - (0.3 * active as f64 + 0.5) as u64;
    let counts = Counts::Global { keep, grow: active - keep };
    let mut times = Vec::new();
    for r in 0..=rounds {
        let t = Instant::now();
        let mut ls: Vec<Layer<'_, f32, f32>> = ws
            .iter_mut()
            .zip(masks.iter_mut())
            .zip(&gs)
            .map(|((w, m), g)| Layer { weight: w, mask: m, grow: Some(&g[..]), states: vec![] })
            .collect();
        update(&mut ls, &counts).unwrap();
        let dt = t.elapsed().as_secs_f64() * 1e3;
        println!("update {dt:8.1} ms");
        if r > 0 {
            times.push(dt);
        }
    }
    println!("median update {:.1} ms", median(times));
    let mut times = Vec::new();
    for _ in 0..rounds {
        let ms: Vec<&[bool]> = masks.iter().map(|m| &m[..]).collect();
        let mut xs: Vec<&mut [f32]> = gs.iter_mut().map(|g| &mut g[..]).collect();
        let t = Instant::now();
        zero_off(&mut xs, &ms).unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!("median zero_off {:.1} ms", median(times));
}
