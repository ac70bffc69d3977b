//! Nonparametric bootstrap over runs with percentile intervals.
//!
//! A resample draws n runs with replacement; it is represented by the count
//! of each run (its weight in the objective), so no data are copied. Each
//! resample has its own ChaCha8 stream (`seed`, stream = resample index), so
//! the result does not depend on the number of threads or on scheduling.
//! Resamples whose refit fails (too few distinct points, no convergence) are
//! counted in [`Bootstrap::failed`] and left out of the intervals.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Options of a bootstrap.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BootstrapOptions {
    /// Number of resamples (0 disables the bootstrap).
    pub resamples: usize,
    /// Seed of the ChaCha8 generator.
    pub seed: u64,
    /// Coverage of the percentile intervals (0.95 for 95%).
    pub level: f64,
}

impl Default for BootstrapOptions {
    fn default() -> Self {
        BootstrapOptions {
            resamples: 1000,
            seed: 0,
            level: 0.95,
        }
    }
}

/// A point estimate with its percentile interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// Estimate from the full data.
    pub estimate: f64,
    /// Lower end of the interval (NaN without a bootstrap).
    pub lower: f64,
    /// Upper end of the interval (NaN without a bootstrap).
    pub upper: f64,
}

impl Interval {
    /// An estimate without an interval.
    pub fn point(estimate: f64) -> Self {
        Interval {
            estimate,
            lower: f64::NAN,
            upper: f64::NAN,
        }
    }

    /// True when both ends are finite.
    pub fn has_bounds(&self) -> bool {
        self.lower.is_finite() && self.upper.is_finite()
    }
}

/// Parameter vectors refitted on resamples.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bootstrap {
    /// Options used.
    pub options: BootstrapOptions,
    /// Resamples whose refit failed (excluded from intervals).
    pub failed: usize,
    /// One parameter vector per successful resample.
    pub samples: Vec<Vec<f64>>,
}

impl Bootstrap {
    /// Percentile interval of parameter `index`, around `estimate`.
    pub fn interval(&self, index: usize, estimate: f64) -> Interval {
        let values: Vec<f64> = self.samples.iter().map(|s| s[index]).collect();
        self.interval_of(values, estimate)
    }

    /// Percentile interval of any function of the parameters (a prediction,
    /// a derived exponent), around `estimate`. Non-finite values are dropped.
    pub fn interval_of_fn<F: Fn(&[f64]) -> f64>(&self, f: F, estimate: f64) -> Interval {
        let values: Vec<f64> = self.samples.iter().map(|s| f(s)).collect();
        self.interval_of(values, estimate)
    }

    fn interval_of(&self, mut values: Vec<f64>, estimate: f64) -> Interval {
        values.retain(|v| v.is_finite());
        if values.len() < 2 {
            return Interval::point(estimate);
        }
        values.sort_by(f64::total_cmp);
        let tail = 0.5 * (1.0 - self.options.level);
        Interval {
            estimate,
            lower: percentile(&values, tail),
            upper: percentile(&values, 1.0 - tail),
        }
    }
}

/// Quantile `q` ∈ [0, 1] of sorted values with linear interpolation between
/// order statistics (numpy's default "linear" method: position q·(n−1)).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    let frac = pos - lo as f64;
    sorted[lo] + frac * (sorted[hi] - sorted[lo])
}

/// Multiplicities of one resample of `n` points.
pub(crate) fn resample_counts(n: usize, seed: u64, index: usize) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index as u64);
    let mut counts = vec![0.0; n];
    for _ in 0..n {
        counts[rng.gen_range(0..n)] += 1.0;
    }
    counts
}

/// Runs `refit(weights)` on every resample in parallel.
pub(crate) fn run<F>(n: usize, options: BootstrapOptions, refit: F) -> Bootstrap
where
    F: Fn(&[f64]) -> Option<Vec<f64>> + Sync,
{
    let results: Vec<Option<Vec<f64>>> = (0..options.resamples)
        .into_par_iter()
        .map(|i| {
            let w = resample_counts(n, options.seed, i);
            refit(&w).filter(|p| p.iter().all(|v| v.is_finite()))
        })
        .collect();
    let failed = results.iter().filter(|r| r.is_none()).count();
    Bootstrap {
        options,
        failed,
        samples: results.into_iter().flatten().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_matches_numpy_linear() {
        // numpy.percentile([1, 2, 3, 4], [2.5, 50, 97.5]) = [1.075, 2.5, 3.925]
        let v = [1.0, 2.0, 3.0, 4.0];
        assert!((percentile(&v, 0.025) - 1.075).abs() < 1e-12);
        assert!((percentile(&v, 0.5) - 2.5).abs() < 1e-12);
        assert!((percentile(&v, 0.975) - 3.925).abs() < 1e-12);
    }

    #[test]
    fn resamples_are_reproducible_and_sum_to_n() {
        let a = resample_counts(50, 7, 3);
        let b = resample_counts(50, 7, 3);
        let c = resample_counts(50, 7, 4);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.iter().sum::<f64>(), 50.0);
    }

    #[test]
    fn bootstrap_of_the_mean_has_the_textbook_width() {
        // Mean of 200 standard-normal-ish points: the 95% interval half-width
        // is about 1.96·σ/√n.
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let x: Vec<f64> = (0..200)
            .map(|_| rng.gen_range(-1.0..1.0f64) * 3f64.sqrt())
            .collect();
        let mean = x.iter().sum::<f64>() / 200.0;
        let b = run(
            200,
            BootstrapOptions {
                resamples: 2000,
                seed: 2,
                level: 0.95,
            },
            |w| {
                Some(vec![
                    w.iter().zip(&x).map(|(w, x)| w * x).sum::<f64>() / 200.0,
                ])
            },
        );
        let iv = b.interval(0, mean);
        let half = 0.5 * (iv.upper - iv.lower);
        let expected = 1.96 / 200f64.sqrt();
        assert!((half / expected - 1.0).abs() < 0.1, "{half} vs {expected}");
        assert!(iv.lower < mean && mean < iv.upper);
    }
}
