//! `update` against a direct reference: stable sorts of (score, layer, index) over the eligible.

use super::*;
use half::bf16;

fn lcg(seed: &mut u64) -> u64 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    *seed >> 33
}

/// Top `k` of `score` among `elig` (global order: layer, then index), as per-layer masks.
fn top(score: &[Vec<f64>], elig: &[Vec<bool>], k: usize) -> Vec<Vec<bool>> {
    let mut all: Vec<(f64, usize, usize)> = Vec::new();
    for (l, (s, e)) in score.iter().zip(elig).enumerate() {
        for (i, (&v, &on)) in s.iter().zip(e).enumerate() {
            if on {
                all.push((v, l, i));
            }
        }
    }
    all.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut out: Vec<Vec<bool>> = score.iter().map(|s| vec![false; s.len()]).collect();
    for &(_, l, i) in &all[..k] {
        out[l][i] = true;
    }
    out
}

struct Case {
    w: Vec<Vec<f32>>,
    m: Vec<Vec<bool>>,
    g: Vec<Vec<f32>>,
}

fn case(seed: &mut u64, sizes: &[usize], levels: u64) -> Case {
    let mut w = Vec::new();
    let mut m = Vec::new();
    let mut g = Vec::new();
    for &n in sizes {
        let mask: Vec<bool> = (0..n).map(|_| lcg(seed) % 3 == 0).collect();
        // Few distinct levels force ties; masked weights are zero (the controller's invariant), and
        // some active weights are zero too.
        w.push((0..n).map(|i| if mask[i] { (lcg(seed) % levels) as f32 - (levels / 2) as f32 } else { 0.0 }).collect());
        g.push((0..n).map(|_| (lcg(seed) % levels) as f32 * if lcg(seed) % 2 == 0 { 1.0 } else { -1.0 }).collect());
        m.push(mask);
    }
    Case { w, m, g }
}

fn abs64(x: &[Vec<f32>]) -> Vec<Vec<f64>> {
    x.iter().map(|v| v.iter().map(|a| a.abs() as f64).collect()).collect()
}

fn reference(c: &Case, keep: usize, grow: usize, global: bool) -> Vec<Vec<bool>> {
    let run = |layers: &[usize], k: usize, g: usize| -> Vec<Vec<bool>> {
        let pick = |x: &Vec<Vec<f64>>| layers.iter().map(|&l| x[l].clone()).collect::<Vec<_>>();
        let elig: Vec<Vec<bool>> = layers.iter().map(|&l| c.m[l].clone()).collect();
        let kept = top(&pick(&abs64(&c.w)), &elig, k);
        let not_kept: Vec<Vec<bool>> = kept.iter().map(|v| v.iter().map(|b| !b).collect()).collect();
        let grown = top(&pick(&abs64(&c.g)), &not_kept, g);
        kept.iter().zip(&grown).map(|(a, b)| a.iter().zip(b).map(|(x, y)| *x || *y).collect()).collect()
    };
    if global {
        run(&(0..c.w.len()).collect::<Vec<_>>(), keep, grow)
    } else {
        (0..c.w.len()).map(|l| run(&[l], keep.min(c.m[l].iter().filter(|&&b| b).count()), grow).remove(0)).collect()
    }
}

fn run_update(c: &Case, counts: &Counts, grow: bool) -> (Vec<Vec<bool>>, Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<LayerStats>) {
    let mut w = c.w.clone();
    let mut m = c.m.clone();
    let mut s: Vec<Vec<f32>> = c.w.iter().map(|v| v.iter().map(|_| 1.0).collect()).collect();
    let mut layers: Vec<Layer<'_, f32, f32>> = w
        .iter_mut()
        .zip(m.iter_mut())
        .zip(s.iter_mut())
        .zip(&c.g)
        .map(|(((w, m), s), g)| Layer { weight: w, mask: m, grow: grow.then_some(&g[..]), states: vec![&mut s[..]] })
        .collect();
    let stats = update(&mut layers, counts).unwrap();
    drop(layers);
    (m, w, s, stats)
}

#[test]
fn drop_grow_matches_reference_global_and_per_layer() {
    let mut seed = 7u64;
    for round in 0..24 {
        let sizes: Vec<usize> = match round % 3 {
            0 => vec![1, 40, 0, 7],
            1 => vec![300, 200],
            _ => vec![70_000, 1000, 66_000], // several pieces per layer
        };
        let c = case(&mut seed, &sizes, [3, 20, 1000][round % 3]);
        let active: Vec<usize> = c.m.iter().map(|v| v.iter().filter(|&&b| b).count()).collect();
        let total: usize = active.iter().sum();
        let n: usize = sizes.iter().sum();
        for (keep, grow) in [(total, 0), (total / 2, total - total / 2), (0, n / 4), (total * 2 / 3, 0)] {
            let (m, w, s, stats) = run_update(&c, &Counts::Global { keep: keep as u64, grow: grow as u64 }, grow > 0);
            let want = reference(&c, keep, grow, true);
            assert!(m == want, "round {round} keep {keep} grow {grow}");
            for l in 0..sizes.len() {
                for i in 0..sizes[l] {
                    let stay = want[l][i] && c.m[l][i];
                    assert_eq!(w[l][i], if stay { c.w[l][i] } else { 0.0 });
                    assert_eq!(s[l][i], if stay { 1.0 } else { 0.0 });
                }
                let kept = want[l].iter().filter(|&&b| b).count() as u64;
                let grown = (0..sizes[l]).filter(|&i| want[l][i] && !c.m[l][i]).count() as u64;
                assert_eq!(stats[l], LayerStats { kept, grown, dropped: active[l] as u64 + grown - kept });
            }
        }
        // Per layer: keep half of each layer's active, grow 3 in each.
        let per: Vec<(u64, u64)> = active.iter().zip(&sizes).map(|(&a, &n)| ((a / 2) as u64, 3.min(n - a / 2) as u64)).collect();
        let (m, _, _, _) = run_update(&c, &Counts::PerLayer(per.clone()), true);
        for l in 0..sizes.len() {
            let one = Case { w: vec![c.w[l].clone()], m: vec![c.m[l].clone()], g: vec![c.g[l].clone()] };
            assert!(m[l] == reference(&one, per[l].0 as usize, per[l].1 as usize, true)[0], "layer {l}");
        }
    }
}

#[test]
fn same_answer_on_any_thread_count() {
    let mut seed = 3u64;
    let c = case(&mut seed, &[200_000, 70_001], 50);
    let counts = Counts::Global { keep: 40_000, grow: 30_000 };
    let runs: Vec<_> = [1usize, 2, 5]
        .iter()
        .map(|&t| {
            crate::pool::set_num_threads(t).unwrap();
            run_update(&c, &counts, true).0
        })
        .collect();
    crate::pool::set_num_threads(0).unwrap();
    assert!(runs.windows(2).all(|p| p[0] == p[1]));
}

#[test]
fn errors_leave_everything_untouched() {
    let mut w = vec![1.0f32, f32::NAN, 3.0];
    let mut m = vec![true, true, false];
    let mut layers = vec![Layer::<f32, f32> { weight: &mut w, mask: &mut m, grow: None, states: vec![] }];
    assert!(matches!(update(&mut layers, &Counts::Global { keep: 1, grow: 0 }), Err(CoreError::NanInput { .. })));
    assert!(update(&mut layers, &Counts::Global { keep: 3, grow: 0 }).is_err()); // only 2 active
    assert!(update(&mut layers, &Counts::Global { keep: 1, grow: 1 }).is_err()); // no grow scores
    assert!(update(&mut layers, &Counts::PerLayer(vec![])).is_err());
    drop(layers);
    assert_eq!(m, vec![true, true, false]);
    assert!(w[1].is_nan() && w[0] == 1.0);
}

#[test]
fn bf16_weights_with_f32_grow_scores() {
    let mut w: Vec<bf16> = [0.5f32, -2.0, 0.0, 1.0, 0.0, 0.0].map(bf16::from_f32).to_vec();
    let mut m = vec![true, true, true, true, false, false];
    let g = vec![9.0f32, 0.0, 0.1, 0.0, 0.3, 0.2];
    let mut layers = vec![Layer { weight: &mut w, mask: &mut m, grow: Some(&g[..]), states: vec![] }];
    let st = update(&mut layers, &Counts::Global { keep: 2, grow: 2 }).unwrap();
    drop(layers);
    // kept -2 and 1; grew 9.0 (index 0: dropped and regrown at once, so it keeps its weight) and 0.3
    assert_eq!(m, vec![true, true, false, true, true, false]);
    assert_eq!(st[0], LayerStats { kept: 4, grown: 1, dropped: 1 });
    assert_eq!(w[0], bf16::from_f32(0.5));
}

#[test]
fn count_and_zero_off() {
    let a = vec![true; 70_000];
    let b = vec![false, true, true];
    assert_eq!(count_masks(&[&a, &b, &[]]).unwrap(), vec![70_000, 2, 0]);
    let mut x = vec![f32::INFINITY, 2.0, -3.0];
    zero_off(&mut [&mut x], &[&b]).unwrap();
    assert_eq!(x, vec![0.0, 2.0, -3.0]);
    assert!(zero_off::<f32>(&mut [&mut x], &[&a]).is_err());
}

/// Continuous values (few ties) on `sizes`, density ~1/3 active; `zero_active`: that fraction of the
/// active weights is exactly zero (connections grown at the last update).
fn case_continuous(seed: &mut u64, sizes: &[usize], zero_active: f64) -> Case {
    let mut c = Case { w: Vec::new(), m: Vec::new(), g: Vec::new() };
    let unit = |s: &mut u64| (lcg(s) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0;
    for &n in sizes {
        let mask: Vec<bool> = (0..n).map(|_| lcg(seed) % 3 == 0).collect();
        let w = (0..n)
            .map(|i| {
                let x = unit(seed);
                if mask[i] && (lcg(seed) % 1000) as f64 >= zero_active * 1000.0 { x } else { 0.0 }
            })
            .collect();
        c.g.push((0..n).map(|_| unit(seed)).collect());
        c.w.push(w);
        c.m.push(mask);
    }
    c
}

fn run_with(c: &Case, counts: &Counts, grow: bool, fast: bool) -> ((Vec<Vec<bool>>, Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<LayerStats>), bool) {
    let mut w = c.w.clone();
    let mut m = c.m.clone();
    let mut s: Vec<Vec<f32>> = c.w.iter().map(|v| v.iter().map(|_| 1.0).collect()).collect();
    let mut layers: Vec<Layer<'_, f32, f32>> = w
        .iter_mut()
        .zip(m.iter_mut())
        .zip(s.iter_mut())
        .zip(&c.g)
        .map(|(((w, m), s), g)| Layer { weight: w, mask: m, grow: grow.then_some(&g[..]), states: vec![&mut s[..]] })
        .collect();
    let (stats, used) = update_with(&mut layers, counts, fast).unwrap();
    drop(layers);
    ((m, w, s, stats), used)
}

fn rigl_counts(c: &Case, frac: f64) -> (u64, u64) {
    let active: u64 = c.m.iter().map(|v| v.iter().filter(|&&b| b).count() as u64).sum();
    let keep = active - (frac * active as f64 + 0.5) as u64;
    (keep, active - keep)
}

#[test]
fn one_pass_path_equals_general_passes_and_reference() {
    let mut seed = 11u64;
    // Sizes with tails that are not multiples of the 16-wide blocks, several pieces, a tiny layer.
    let sizes = [70_001usize, 3, 200_000, 65_536, 17];
    for (zero_active, frac) in [(0.0, 0.3), (0.3, 0.3), (0.0, 0.05), (0.5, 0.5)] {
        let c = case_continuous(&mut seed, &sizes, zero_active);
        let (keep, grow) = rigl_counts(&c, frac);
        let counts = Counts::Global { keep, grow };
        let (fast, used) = run_with(&c, &counts, true, true);
        let (general, _) = run_with(&c, &counts, true, false);
        assert!(used, "continuous data should take the one-pass path (zeros {zero_active}, frac {frac})");
        assert!(fast == general, "zeros {zero_active} frac {frac}");
        assert!(fast.0 == reference(&c, keep as usize, grow as usize, true));
        // Per layer (a third kept, as many grown), and magnitude-style keep only.
        let per: Vec<(u64, u64)> = c
            .m
            .iter()
            .map(|v| {
                let a = v.iter().filter(|&&b| b).count() as u64;
                (a / 3, (a - a / 3).min(v.len() as u64 - a / 3))
            })
            .collect();
        let (f, used) = run_with(&c, &Counts::PerLayer(per.clone()), true, true);
        assert!(used, "per layer: one-pass path");
        assert!(f == run_with(&c, &Counts::PerLayer(per.clone()), true, false).0, "per layer");
        let keep_only = Counts::Global { keep: keep / 2, grow: 0 };
        let (f, used) = run_with(&c, &keep_only, false, true);
        assert!(used && f == run_with(&c, &keep_only, false, false).0);
    }
}

#[test]
fn one_pass_path_on_ties_and_edge_counts() {
    // Quantised values (heavy ties: the bracket may miss and fall back, the answer must not change),
    // keep nothing (gradient top-k), keep everything, grow everything.
    let mut seed = 5u64;
    for levels in [3u64, 50, 5000] {
        let c = case(&mut seed, &[150_000, 9, 70_000], levels);
        let active: u64 = c.m.iter().map(|v| v.iter().filter(|&&b| b).count() as u64).sum();
        let n: u64 = c.m.iter().map(|v| v.len() as u64).sum();
        for (keep, grow) in [(active * 7 / 10, active * 3 / 10), (0, n / 10), (active, 0), (active, n - active), (1, 1)] {
            let counts = Counts::Global { keep, grow };
            let g = grow > 0;
            let (fast, _) = run_with(&c, &counts, g, true);
            let (general, _) = run_with(&c, &counts, g, false);
            assert!(fast == general, "levels {levels} keep {keep} grow {grow}");
            assert!(fast.0 == reference(&c, keep as usize, grow as usize, true), "levels {levels} keep {keep} grow {grow}");
        }
    }
}

#[test]
fn every_simd_build_gives_the_same_bits() {
    let mut seed = 21u64;
    let c = case_continuous(&mut seed, &[130_007, 65_536, 33], 0.2);
    let (keep, grow) = rigl_counts(&c, 0.3);
    let counts = Counts::Global { keep, grow };
    let runs: Vec<_> = [0u8, 1, 2]
        .iter()
        .map(|&cap| {
            simd::TEST_CAP.store(cap, std::sync::atomic::Ordering::Relaxed);
            let out = run_with(&c, &counts, true, true);
            let mut g = c.g.clone();
            let masks: Vec<&[bool]> = c.m.iter().map(|m| &m[..]).collect();
            let mut gs: Vec<&mut [f32]> = g.iter_mut().map(|x| &mut x[..]).collect();
            zero_off(&mut gs, &masks).unwrap();
            (out, g)
        })
        .collect();
    simd::TEST_CAP.store(u8::MAX, std::sync::atomic::Ordering::Relaxed);
    assert!(runs[0].0 .1, "one-pass path taken");
    assert!(runs.windows(2).all(|p| p[0] == p[1]));
    // The gradient masking writes +0.0 (not -0.0, not x * 0) everywhere off the mask.
    for (g, (m, orig)) in runs[0].1.iter().zip(c.m.iter().zip(&c.g)) {
        for i in 0..g.len() {
            assert_eq!(g[i].to_bits(), if m[i] { orig[i].to_bits() } else { 0 });
        }
    }
}

#[test]
fn one_pass_path_reports_nan_like_the_general_passes() {
    let mut seed = 9u64;
    let c = case_continuous(&mut seed, &[100_000], 0.0);
    let (keep, grow) = rigl_counts(&c, 0.3);
    let counts = Counts::Global { keep, grow };
    let on = c.m[0].iter().position(|&b| b).unwrap();
    let off = c.m[0].iter().position(|&b| !b).unwrap();
    // NaN weight among the active; NaN grow score at an eligible (inactive) connection.
    for (which, at) in [("w", on), ("g", off)] {
        let mut bad = Case { w: c.w.clone(), m: c.m.clone(), g: c.g.clone() };
        if which == "w" { bad.w[0][at] = f32::NAN } else { bad.g[0][at] = f32::NAN }
        let mut w = bad.w.clone();
        let mut m = bad.m.clone();
        let mut layers = vec![Layer { weight: &mut w[0][..], mask: &mut m[0][..], grow: Some(&bad.g[0][..]), states: vec![] }];
        let err = update(&mut layers, &counts).unwrap_err();
        let want = if which == "w" { "weights" } else { "grow scores" };
        assert_eq!(err, CoreError::NanInput { arg: want });
        drop(layers);
        assert!(m == bad.m, "nothing written");
    }
    // A NaN grow score where the connection is kept is never ranked: no error.
    let mut ok = Case { w: c.w.clone(), m: c.m.clone(), g: c.g.clone() };
    let best = (0..ok.w[0].len()).filter(|&i| ok.m[0][i]).max_by(|&a, &b| ok.w[0][a].abs().total_cmp(&ok.w[0][b].abs())).unwrap();
    ok.g[0][best] = f32::NAN;
    let (out, used) = run_with(&ok, &counts, true, true);
    assert!(used && out.0[0][best]);
}
