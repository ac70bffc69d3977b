//! The learning-rate schedule of the study: linear warm-up over the first 1% of the steps from
//! `0.2·max_lr` to `max_lr`, then cosine decay to `0.01·max_lr` at the last step.
//!
//! The study's code evaluates the cosine at `step / total` without shifting it by the
//! warm-up; matscale starts the cosine where the warm-up ends, so the peak is reached exactly
//! (the two differ by under 1% of a period).

use serde::{Deserialize, Serialize};

/// Warm-up plus cosine schedule, stepped once per optimiser step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Peak learning rate.
    pub max_lr: f64,
    /// Total optimiser steps of the run.
    pub total_steps: u64,
    /// Fraction of the steps spent warming up (study: 0.01).
    pub warmup_fraction: f64,
    /// Start of the warm-up as a fraction of `max_lr` (study: 0.2).
    pub warmup_start: f64,
    /// End of the cosine as a fraction of `max_lr` (study: 0.01).
    pub final_fraction: f64,
}

impl Schedule {
    /// The study's schedule for `total_steps` steps peaking at `max_lr`.
    pub fn study(max_lr: f64, total_steps: u64) -> Self {
        Self {
            max_lr,
            total_steps,
            warmup_fraction: 0.01,
            warmup_start: 0.2,
            final_fraction: 0.01,
        }
    }

    /// Warm-up steps: `max(1, ⌊fraction·total⌋)`.
    pub fn warmup_steps(&self) -> u64 {
        ((self.total_steps as f64 * self.warmup_fraction).floor() as u64).max(1)
    }

    /// The learning rate of step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        let warmup = self.warmup_steps();
        if step < warmup {
            let t = step as f64 / warmup as f64;
            return self.max_lr * (self.warmup_start + (1.0 - self.warmup_start) * t);
        }
        let span = self.total_steps.saturating_sub(warmup).max(1) as f64;
        let t = ((step - warmup) as f64 / span).min(1.0);
        let low = self.final_fraction;
        self.max_lr * (low + (1.0 - low) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_peak_and_floor() {
        let s = Schedule::study(1e-3, 1000);
        assert_eq!(s.warmup_steps(), 10);
        assert!((s.lr(0) - 2e-4).abs() < 1e-15);
        assert!((s.lr(5) - 6e-4).abs() < 1e-15);
        assert!((s.lr(10) - 1e-3).abs() < 1e-15);
        assert!((s.lr(1000) - 1e-5).abs() < 1e-15);
        // Monotone decay after the peak.
        let lrs: Vec<f64> = (10..=1000).map(|k| s.lr(k)).collect();
        assert!(lrs.windows(2).all(|w| w[1] <= w[0]));
        // Half-way through the cosine the rate is the mean of peak and floor.
        assert!((s.lr(505) - 1e-3 * (0.01 + 0.99 * 0.5)).abs() < 1e-12);
    }

    #[test]
    fn tiny_runs_warm_up_for_one_step() {
        let s = Schedule::study(1.0, 3);
        assert_eq!(s.warmup_steps(), 1);
        assert!((s.lr(0) - 0.2).abs() < 1e-15);
        assert!((s.lr(1) - 1.0).abs() < 1e-15);
    }
}
