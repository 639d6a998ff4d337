//! MoE load-balance counters: EMA loads, imbalance metrics, aux-loss-free bias updates.

use crate::error::CoreError;

/// Imbalance report of one count vector.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    /// max(c) / mean(c) (1 = perfect balance; 0 when nothing was routed).
    pub max_over_mean: f64,
    /// Coefficient of variation std(c) / mean(c) (population std).
    pub cv: f64,
    /// Entropy of the load distribution c / sum(c), natural log (ln E = perfect balance).
    pub entropy: f64,
    /// Experts that received no token.
    pub unused: u64,
}

/// Imbalance statistics of `counts` (non-negative).
pub fn stats(counts: &[f64]) -> Stats {
    let e = counts.len() as f64;
    let total: f64 = counts.iter().sum();
    let unused = counts.iter().filter(|&&c| c <= 0.0).count() as u64;
    if counts.is_empty() || total <= 0.0 {
        return Stats { max_over_mean: 0.0, cv: 0.0, entropy: 0.0, unused };
    }
    let mean = total / e;
    let max = counts.iter().cloned().fold(f64::MIN, f64::max);
    let var = counts.iter().map(|c| (c - mean) * (c - mean)).sum::<f64>() / e;
    let entropy = -counts.iter().filter(|&&c| c > 0.0).map(|c| c / total * (c / total).ln()).sum::<f64>();
    Stats { max_over_mean: max / mean, cv: var.sqrt() / mean, entropy, unused }
}

/// Per-expert counters: the last step's counts and their exponential moving average, routed and dropped
/// slot totals.
#[derive(Clone, Debug)]
pub struct Counters {
    pub step: Vec<f64>,
    pub ema: Vec<f64>,
    pub decay: f64,
    pub steps: u64,
    pub routed: u64,
    pub dropped: u64,
    pub last_dropped: u64,
    pub last_routed: u64,
}

impl Counters {
    /// Counters for `n_experts`; `decay` in [0, 1) is the EMA's weight on the past.
    pub fn new(n_experts: usize, decay: f64) -> Result<Self, CoreError> {
        if n_experts == 0 {
            return Err(CoreError::Invalid { arg: "n_experts", why: "must be >= 1".into() });
        }
        if !(0.0..1.0).contains(&decay) {
            return Err(CoreError::Invalid { arg: "ema", why: format!("must be in [0, 1), got {decay}") });
        }
        Ok(Counters { step: vec![0.0; n_experts], ema: vec![0.0; n_experts], decay, steps: 0, routed: 0, dropped: 0, last_dropped: 0, last_routed: 0 })
    }

    /// Record one step: kept slots per expert and the slots dropped by capacity.
    pub fn update(&mut self, counts: &[i64], dropped: u64) -> Result<(), CoreError> {
        if counts.len() != self.step.len() {
            return Err(CoreError::LengthMismatch { arg: "counts", expected: self.step.len(), got: counts.len() });
        }
        if counts.iter().any(|&c| c < 0) {
            return Err(CoreError::Invalid { arg: "counts", why: "must be non-negative".into() });
        }
        let first = self.steps == 0;
        for ((s, m), &c) in self.step.iter_mut().zip(self.ema.iter_mut()).zip(counts) {
            *s = c as f64;
            *m = if first { *s } else { self.decay * *m + (1.0 - self.decay) * *s };
        }
        let kept: i64 = counts.iter().sum();
        self.steps += 1;
        self.last_routed = kept as u64 + dropped;
        self.last_dropped = dropped;
        self.routed += self.last_routed;
        self.dropped += dropped;
        Ok(())
    }

    /// Dropped fraction of the last step (0 when nothing was routed).
    pub fn dropped_fraction(&self) -> f64 {
        if self.last_routed == 0 { 0.0 } else { self.last_dropped as f64 / self.last_routed as f64 }
    }
}

/// Aux-loss-free balancing (DeepSeek-V3): `bias[i] += rate * sign(mean(c) - c[i])` in float32, sign(0) = 0.
pub fn aux_free_update(bias: &mut [f32], counts: &[f64], rate: f32) -> Result<(), CoreError> {
    if bias.len() != counts.len() {
        return Err(CoreError::LengthMismatch { arg: "counts", expected: bias.len(), got: counts.len() });
    }
    if !rate.is_finite() || rate < 0.0 {
        return Err(CoreError::Invalid { arg: "rate", why: format!("must be finite and >= 0, got {rate}") });
    }
    if counts.is_empty() {
        return Ok(());
    }
    let mean = counts.iter().sum::<f64>() / counts.len() as f64;
    for (b, &c) in bias.iter_mut().zip(counts) {
        let d = mean - c;
        let s = if d > 0.0 { 1.0 } else if d < 0.0 { -1.0 } else { 0.0 };
        *b += rate * s;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_balanced_and_skewed_loads() {
        let s = stats(&[2.0, 2.0, 2.0, 2.0]);
        assert!((s.max_over_mean - 1.0).abs() < 1e-12 && s.cv.abs() < 1e-12 && (s.entropy - 4f64.ln()).abs() < 1e-12);
        let s = stats(&[4.0, 0.0, 0.0, 0.0]);
        assert_eq!((s.max_over_mean, s.unused, s.entropy), (4.0, 3, 0.0));
    }

    #[test]
    fn ema_and_bias() {
        let mut c = Counters::new(2, 0.5).unwrap();
        c.update(&[4, 0], 1).unwrap();
        c.update(&[0, 4], 0).unwrap();
        assert_eq!(c.ema, vec![2.0, 2.0]);
        let mut b = vec![0.0f32; 3];
        aux_free_update(&mut b, &[3.0, 1.0, 2.0], 0.5).unwrap();
        assert_eq!(b, vec![-0.5, 0.5, 0.0]);
        assert!(Counters::new(2, 1.0).is_err());
    }
}
