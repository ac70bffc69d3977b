//! Information criteria for choosing between functional forms.
//!
//! Likelihood assumption: log-loss residuals rᵢ = ln Lᵢ − ln L̂ᵢ are
//! independent Gaussian with a common variance σ² (estimated by maximum
//! likelihood, σ̂² = RSS/n). The maximised log-likelihood is then
//! ln ℒ = −n/2 · (ln(2π·RSS/n) + 1), and with k = (law parameters + 1 for σ):
//! AIC = 2k − 2 ln ℒ, BIC = k ln n − 2 ln ℒ. The same log-space residuals are
//! used whatever objective fitted the law, so forms fitted with either
//! objective are compared on one scale (for linear-objective or Huber fits the
//! criteria are evaluated at those estimates, not at the Gaussian MLE).

use serde::{Deserialize, Serialize};

/// AIC and BIC of a fitted law.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct InformationCriteria {
    /// Sum of squared log residuals.
    pub log_rss: f64,
    /// Root-mean-square log residual (≈ typical relative error).
    pub rms_log_residual: f64,
    /// Number of estimated quantities (law parameters + σ).
    pub k: usize,
    /// Akaike information criterion.
    pub aic: f64,
    /// Bayesian information criterion.
    pub bic: f64,
}

/// Criteria of predictions `pred` for observations `obs` with `n_params` law parameters.
pub fn information_criteria_from_predictions(
    obs: &[f64],
    pred: &[f64],
    n_params: usize,
) -> InformationCriteria {
    let n = obs.len() as f64;
    let rss: f64 = obs
        .iter()
        .zip(pred)
        .map(|(o, p)| {
            let r = o.ln() - p.ln();
            r * r
        })
        .sum();
    // An exact fit would give −∞; floor the variance at a relative 1e-300.
    let sigma2 = (rss / n).max(1e-300);
    let log_lik = -0.5 * n * ((2.0 * std::f64::consts::PI * sigma2).ln() + 1.0);
    let k = n_params + 1;
    InformationCriteria {
        log_rss: rss,
        rms_log_residual: (rss / n).sqrt(),
        k,
        aic: 2.0 * k as f64 - 2.0 * log_lik,
        bic: k as f64 * n.ln() - 2.0 * log_lik,
    }
}

/// Criteria of a single-variable law `f` on points (x, loss).
pub fn information_criteria<F: Fn(f64) -> f64>(
    x: &[f64],
    loss: &[f64],
    f: F,
    n_params: usize,
) -> InformationCriteria {
    let pred: Vec<f64> = x.iter().map(|x| f(*x)).collect();
    information_criteria_from_predictions(loss, &pred, n_params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_closed_form() {
        let obs = [1.0, 2.0, 3.0, 4.0];
        let pred = [1.1, 1.9, 3.2, 3.9];
        let ic = information_criteria_from_predictions(&obs, &pred, 2);
        let rss: f64 = obs
            .iter()
            .zip(&pred)
            .map(|(o, p): (&f64, &f64)| (o.ln() - p.ln()).powi(2))
            .sum();
        let ll = -2.0 * ((2.0 * std::f64::consts::PI * rss / 4.0).ln() + 1.0);
        assert!((ic.aic - (6.0 - 2.0 * ll)).abs() < 1e-12);
        assert!((ic.bic - (3.0 * 4f64.ln() - 2.0 * ll)).abs() < 1e-12);
    }
}
