//! Joint law L(N, D) = E + A/N^α + B/D^β fitted by Chinchilla's "approach 3".
//!
//! Following Hoffmann et al. (2022) and the replication by Besiroglu et al.
//! (2024), the fit works on log losses with log-parameters a = ln A,
//! b = ln B, e = ln E (so A, B, E > 0 by construction):
//!
//! ```text
//! r_i(θ) = LSE(a − α ln N_i, b − β ln D_i, e) − ln L_i
//! f(θ)   = Σ_i w_i · Huber_δ(r_i),  δ = 1e-3
//! ```
//!
//! with `LSE` the log-sum-exp (evaluated stably by shifting by its largest
//! argument), `Huber_δ(r) = r²/2` for |r| ≤ δ and `δ(|r| − δ/2)` beyond (the
//! same convention as `scipy.special.huber`), and `w_i` the bootstrap counts
//! (all 1 for a plain fit). The objective is the **sum** over points, so its
//! value is comparable with the 0.0010183 of the reference scipy run.
//!
//! The gradient is analytic: ∂r/∂a = s₁, ∂r/∂α = −s₁ ln N, ∂r/∂b = s₂,
//! ∂r/∂β = −s₂ ln D, ∂r/∂e = s₃ with s the softmax weights of the three
//! terms, and Huber′(r) = clamp(r, −δ, δ). L-BFGS (argmin) runs from every
//! point of an initialisation grid in parallel (rayon); the best final
//! objective wins (ties broken by grid order, so results are deterministic).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::optim::{lbfgs, LbfgsSettings, Smooth};

/// Name of the law in messages and reports.
pub const LAW_NAME: &str = "L = E + A/N^α + B/D^β";

/// Parameters of the joint law in natural form.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct JointParams {
    /// Irreducible loss E.
    pub e: f64,
    /// Coefficient A of the parameter term.
    pub a: f64,
    /// Coefficient B of the data term.
    pub b: f64,
    /// Parameter exponent α.
    pub alpha: f64,
    /// Data exponent β.
    pub beta: f64,
}

impl JointParams {
    /// Parameter names in the order of [`JointParams::to_vec`].
    pub const NAMES: [&'static str; 5] = ["E", "A", "B", "alpha", "beta"];

    /// L(N, D).
    pub fn predict(&self, n: f64, d: f64) -> f64 {
        self.e + self.a * n.powf(-self.alpha) + self.b * d.powf(-self.beta)
    }

    /// (E, A, B, α, β).
    pub fn to_vec(&self) -> Vec<f64> {
        vec![self.e, self.a, self.b, self.alpha, self.beta]
    }

    fn from_theta(t: &[f64]) -> Self {
        JointParams {
            a: t[0].exp(),
            b: t[1].exp(),
            e: t[2].exp(),
            alpha: t[3],
            beta: t[4],
        }
    }

    /// Compute-optimal allocation under C = k·N·D: minimising L at fixed C
    /// gives N_opt = G·(C/k)^(β/(α+β)) and D_opt = (C/k)^(α/(α+β))/G with
    /// G = (αA/(βB))^(1/(α+β)). Returns `None` when α or β is not positive.
    pub fn optimal_allocation(&self, compute: f64, k: f64) -> Option<(f64, f64)> {
        if !(self.alpha > 0.0 && self.beta > 0.0) {
            return None;
        }
        let s = self.alpha + self.beta;
        let g = (self.alpha * self.a / (self.beta * self.b)).powf(1.0 / s);
        let ck = compute / k;
        Some((g * ck.powf(self.beta / s), ck.powf(self.alpha / s) / g))
    }

    /// Exponents (a, b) of N_opt ∝ C^a and D_opt ∝ C^b: a = β/(α+β), b = α/(α+β).
    pub fn allocation_exponents(&self) -> (f64, f64) {
        let s = self.alpha + self.beta;
        (self.beta / s, self.alpha / s)
    }
}

/// Grid of initial points for the log-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InitGrid {
    /// Values of α.
    pub alpha: Vec<f64>,
    /// Values of β.
    pub beta: Vec<f64>,
    /// Values of e = ln E.
    pub log_e: Vec<f64>,
    /// Values of a = ln A.
    pub log_a: Vec<f64>,
    /// Values of b = ln B.
    pub log_b: Vec<f64>,
}

impl InitGrid {
    /// The grid of Besiroglu et al. (2024): α, β ∈ {0, 0.5, …, 2},
    /// e ∈ {−1, −0.5, …, 1}, a, b ∈ {0, 5, …, 25}: 5·5·5·6·6 = 4500 starts.
    pub fn besiroglu() -> Self {
        let steps =
            |start: f64, step: f64, n: usize| (0..n).map(|i| start + step * i as f64).collect();
        InitGrid {
            alpha: steps(0.0, 0.5, 5),
            beta: steps(0.0, 0.5, 5),
            log_e: steps(-1.0, 0.5, 5),
            log_a: steps(0.0, 5.0, 6),
            log_b: steps(0.0, 5.0, 6),
        }
    }

    /// A single start.
    pub fn single(p: &JointParams) -> Self {
        InitGrid {
            alpha: vec![p.alpha],
            beta: vec![p.beta],
            log_e: vec![p.e.ln()],
            log_a: vec![p.a.ln()],
            log_b: vec![p.b.ln()],
        }
    }

    /// Number of starts.
    pub fn len(&self) -> usize {
        self.alpha.len() * self.beta.len() * self.log_e.len() * self.log_a.len() * self.log_b.len()
    }

    /// True when the grid has no starts.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts as θ = (a, b, e, α, β), in a fixed order.
    pub(crate) fn starts(&self) -> Vec<[f64; 5]> {
        let mut out = Vec::with_capacity(self.len());
        for &alpha in &self.alpha {
            for &beta in &self.beta {
                for &e in &self.log_e {
                    for &a in &self.log_a {
                        for &b in &self.log_b {
                            out.push([a, b, e, alpha, beta]);
                        }
                    }
                }
            }
        }
        out
    }
}

/// Options of the joint fit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JointFitOptions {
    /// Huber threshold δ on log residuals.
    pub delta: f64,
    /// Initialisation grid.
    pub grid: InitGrid,
    /// L-BFGS iteration cap per start.
    pub max_iters: u64,
}

impl Default for JointFitOptions {
    fn default() -> Self {
        JointFitOptions {
            delta: 1e-3,
            grid: InitGrid::besiroglu(),
            max_iters: 1000,
        }
    }
}

/// Result of a joint fit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JointFit {
    /// Best parameters.
    pub params: JointParams,
    /// Summed Huber objective at `params`.
    pub objective: f64,
    /// ‖∇f‖₂ in log-parameters at `params`.
    pub grad_norm: f64,
    /// Number of data points.
    pub n_points: usize,
    /// Starts run.
    pub starts: usize,
    /// Starts that ended within 1e-9 (relative) of the best objective.
    pub starts_at_best: usize,
    /// Starts that produced no finite point.
    pub starts_failed: usize,
    /// Huber δ used.
    pub delta: f64,
}

/// Data of a joint fit in log form.
#[derive(Debug, Clone)]
pub(crate) struct JointData {
    pub ln_n: Vec<f64>,
    pub ln_d: Vec<f64>,
    pub ln_l: Vec<f64>,
}

impl JointData {
    pub(crate) fn new(n: &[f64], d: &[f64], loss: &[f64]) -> Result<Self> {
        if n.len() != d.len() || n.len() != loss.len() {
            return Err(Error::InvalidArgument(format!(
                "N, D and loss have lengths {}, {}, {}",
                n.len(),
                d.len(),
                loss.len()
            )));
        }
        for (name, v) in [("N", n), ("D", d), ("loss", loss)] {
            if let Some(i) = v.iter().position(|x| !x.is_finite() || *x <= 0.0) {
                return Err(Error::NonFinite(format!(
                    "{name}[{i}] = {} (the joint fit needs finite positive values)",
                    v[i]
                )));
            }
        }
        if n.len() < 5 {
            return Err(Error::TooFewPoints {
                law: LAW_NAME.into(),
                points: n.len(),
                params: 5,
            });
        }
        for (name, v) in [("N", n), ("D", d)] {
            if v.iter().all(|x| *x == v[0]) {
                return Err(Error::DegenerateDesign {
                    law: LAW_NAME.into(),
                    message: format!(
                        "every {name} equals {}; its exponent cannot be identified",
                        v[0]
                    ),
                });
            }
        }
        Ok(JointData {
            ln_n: n.iter().map(|x| x.ln()).collect(),
            ln_d: d.iter().map(|x| x.ln()).collect(),
            ln_l: loss.iter().map(|x| x.ln()).collect(),
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.ln_n.len()
    }
}

/// Huber loss (scipy's convention) and its derivative.
#[inline]
pub(crate) fn huber(r: f64, delta: f64) -> (f64, f64) {
    let abs = r.abs();
    if abs <= delta {
        (0.5 * r * r, r)
    } else {
        (delta * (abs - 0.5 * delta), delta * r.signum())
    }
}

pub(crate) struct JointObjective<'a> {
    pub data: &'a JointData,
    pub weights: Option<&'a [f64]>,
    pub delta: f64,
}

impl Smooth for JointObjective<'_> {
    fn eval(&self, t: &[f64], g: &mut [f64]) -> f64 {
        let (a, b, e, alpha, beta) = (t[0], t[1], t[2], t[3], t[4]);
        let mut f = 0.0;
        let mut grad = [0.0; 5];
        let d = self.data;
        for i in 0..d.len() {
            let w = self.weights.map_or(1.0, |w| w[i]);
            if w == 0.0 {
                continue;
            }
            let u1 = a - alpha * d.ln_n[i];
            let u2 = b - beta * d.ln_d[i];
            let m = u1.max(u2).max(e);
            let (x1, x2, x3) = ((u1 - m).exp(), (u2 - m).exp(), (e - m).exp());
            let s = x1 + x2 + x3;
            let lse = m + s.ln();
            let (h, dh) = huber(lse - d.ln_l[i], self.delta);
            f += w * h;
            let c = w * dh / s;
            grad[0] += c * x1;
            grad[1] += c * x2;
            grad[2] += c * x3;
            grad[3] -= c * x1 * d.ln_n[i];
            grad[4] -= c * x2 * d.ln_d[i];
        }
        g.copy_from_slice(&grad);
        f
    }
}

pub(crate) struct StartResult {
    pub theta: Vec<f64>,
    pub cost: f64,
    pub grad_norm: f64,
}

/// Runs L-BFGS from every start in parallel; returns the best, the number of
/// starts at the best objective and the number of failed starts.
pub(crate) fn best_of_starts(
    data: &JointData,
    weights: Option<&[f64]>,
    delta: f64,
    starts: &[[f64; 5]],
    max_iters: u64,
    parallel: bool,
) -> (Option<StartResult>, usize, usize) {
    let objective = JointObjective {
        data,
        weights,
        delta,
    };
    let settings = LbfgsSettings {
        tol_grad: 1e-9,
        tol_cost: 1e-15,
        max_iters,
        memory: 10,
    };
    let run = |s: &[f64; 5]| {
        lbfgs(&objective, s, settings).map(|o| StartResult {
            theta: o.x,
            cost: o.cost,
            grad_norm: o.grad_norm,
        })
    };
    let results: Vec<Option<StartResult>> = if parallel {
        starts.par_iter().map(run).collect()
    } else {
        starts.iter().map(run).collect()
    };
    let failed = results.iter().filter(|r| r.is_none()).count();
    let mut best: Option<StartResult> = None;
    for r in results.iter().flatten() {
        if best.as_ref().is_none_or(|b| r.cost < b.cost) {
            best = Some(StartResult {
                theta: r.theta.clone(),
                cost: r.cost,
                grad_norm: r.grad_norm,
            });
        }
    }
    let at_best = best.as_ref().map_or(0, |b| {
        results
            .iter()
            .flatten()
            .filter(|r| r.cost <= b.cost * (1.0 + 1e-9))
            .count()
    });
    (best, at_best, failed)
}

/// Fits L(N, D) = E + A/N^α + B/D^β to runs with parameter counts `n`,
/// training-set sizes `d` and losses `loss` (all finite and positive).
///
/// Errors: [`Error::TooFewPoints`] below 5 points, [`Error::DegenerateDesign`]
/// when every N (or every D) is equal, [`Error::NonFinite`],
/// [`Error::NotConverged`] when no start reaches a finite optimum.
pub fn fit_joint(
    n: &[f64],
    d: &[f64],
    loss: &[f64],
    options: &JointFitOptions,
) -> Result<JointFit> {
    let data = JointData::new(n, d, loss)?;
    if options.grid.is_empty() {
        return Err(Error::InvalidArgument("empty initialisation grid".into()));
    }
    if !(options.delta > 0.0 && options.delta.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "Huber delta {} must be positive",
            options.delta
        )));
    }
    let starts = options.grid.starts();
    let (best, at_best, failed) =
        best_of_starts(&data, None, options.delta, &starts, options.max_iters, true);
    let best = best.ok_or_else(|| Error::NotConverged {
        law: LAW_NAME.into(),
        message: format!("none of {} starts reached a finite objective", starts.len()),
    })?;
    let params = JointParams::from_theta(&best.theta);
    if !params.to_vec().iter().all(|v| v.is_finite()) {
        return Err(Error::NotConverged {
            law: LAW_NAME.into(),
            message: format!("best start ended at non-finite parameters {params:?}"),
        });
    }
    Ok(JointFit {
        params,
        objective: best.cost,
        grad_norm: best.grad_norm,
        n_points: data.len(),
        starts: starts.len(),
        starts_at_best: at_best,
        starts_failed: failed,
        delta: options.delta,
    })
}

/// How bootstrap refits are started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RefitStarts {
    /// Only the full-data optimum.
    Optimum,
    /// The full-data optimum and the 32 corners of a box around it
    /// (±0.5 in a, b, e; ±0.05 in α, β): best of 33.
    Local,
    /// The whole initialisation grid (slow: as many starts as the full fit).
    Grid,
}

/// Starts of the bootstrap refits around the full-data optimum `p`.
pub fn refit_starts(p: &JointParams, mode: RefitStarts, grid: &InitGrid) -> Vec<[f64; 5]> {
    let t = theta_of(p);
    match mode {
        RefitStarts::Optimum => vec![t],
        RefitStarts::Grid => grid.starts(),
        RefitStarts::Local => {
            let step = [0.5, 0.5, 0.5, 0.05, 0.05];
            let mut out = vec![t];
            for corner in 0..32u32 {
                let mut s = t;
                for (k, h) in step.iter().enumerate() {
                    s[k] += if corner >> k & 1 == 1 { *h } else { -*h };
                }
                out.push(s);
            }
            out
        }
    }
}

/// Bootstrap of the joint fit: each resample is refitted from `starts`
/// (sequentially within a resample, resamples in parallel). Samples are
/// (E, A, B, α, β).
pub fn bootstrap_joint(
    n: &[f64],
    d: &[f64],
    loss: &[f64],
    starts: &[[f64; 5]],
    options: &JointFitOptions,
    bootstrap: crate::bootstrap::BootstrapOptions,
) -> Result<crate::bootstrap::Bootstrap> {
    let data = JointData::new(n, d, loss)?;
    Ok(crate::bootstrap::run(data.len(), bootstrap, |w| {
        let (best, _, _) = best_of_starts(
            &data,
            Some(w),
            options.delta,
            starts,
            options.max_iters,
            false,
        );
        best.map(|b| JointParams::from_theta(&b.theta).to_vec())
    }))
}

/// The summed Huber objective of `params` on the data (for comparing with
/// published parameter values).
pub fn joint_objective(
    n: &[f64],
    d: &[f64],
    loss: &[f64],
    params: &JointParams,
    delta: f64,
) -> Result<f64> {
    let data = JointData::new(n, d, loss)?;
    let obj = JointObjective {
        data: &data,
        weights: None,
        delta,
    };
    let theta = [
        params.a.ln(),
        params.b.ln(),
        params.e.ln(),
        params.alpha,
        params.beta,
    ];
    let mut g = [0.0; 5];
    Ok(obj.eval(&theta, &mut g))
}

pub(crate) fn theta_of(p: &JointParams) -> [f64; 5] {
    [p.a.ln(), p.b.ln(), p.e.ln(), p.alpha, p.beta]
}

pub(crate) fn params_of(theta: &[f64]) -> JointParams {
    JointParams::from_theta(theta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synthetic() -> (Vec<f64>, Vec<f64>, Vec<f64>, JointParams) {
        let truth = JointParams {
            e: 1.7,
            a: 400.0,
            b: 900.0,
            alpha: 0.34,
            beta: 0.3,
        };
        let mut n = Vec::new();
        let mut d = Vec::new();
        let mut l = Vec::new();
        for i in 0..6 {
            for j in 0..6 {
                let ni = 1e7 * 4f64.powi(i);
                let dj = 1e8 * 4f64.powi(j);
                n.push(ni);
                d.push(dj);
                l.push(truth.predict(ni, dj));
            }
        }
        (n, d, l, truth)
    }

    #[test]
    fn gradient_matches_central_differences() {
        let (n, d, l, _) = synthetic();
        let data = JointData::new(&n, &d, &l).unwrap();
        let w: Vec<f64> = (0..n.len()).map(|i| (i % 3) as f64).collect();
        for delta in [1e-3, 10.0] {
            let obj = JointObjective {
                data: &data,
                weights: Some(&w),
                delta,
            };
            let t = [5.5, 6.0, 0.3, 0.3, 0.28];
            let mut g = [0.0; 5];
            obj.eval(&t, &mut g);
            for k in 0..5 {
                let h = 1e-6;
                let mut tp = t;
                let mut tm = t;
                tp[k] += h;
                tm[k] -= h;
                let mut s = [0.0; 5];
                let fd = (obj.eval(&tp, &mut s) - obj.eval(&tm, &mut s)) / (2.0 * h);
                assert!(
                    (fd - g[k]).abs() <= 1e-6 * g[k].abs().max(1e-3),
                    "k={k} fd={fd} g={}",
                    g[k]
                );
            }
        }
    }

    #[test]
    fn recovers_exact_synthetic_law_from_a_small_grid() {
        let (n, d, l, truth) = synthetic();
        let options = JointFitOptions {
            grid: InitGrid {
                alpha: vec![0.5],
                beta: vec![0.5],
                log_e: vec![0.0, 1.0],
                log_a: vec![5.0],
                log_b: vec![5.0],
            },
            ..Default::default()
        };
        let fit = fit_joint(&n, &d, &l, &options).unwrap();
        let p = fit.params;
        assert!((p.alpha - truth.alpha).abs() < 1e-4, "{p:?}");
        assert!((p.beta - truth.beta).abs() < 1e-4, "{p:?}");
        assert!((p.e / truth.e - 1.0).abs() < 1e-4, "{p:?}");
        assert!(fit.objective < 1e-10);
    }

    #[test]
    fn rejects_degenerate_inputs() {
        let (n, d, l, _) = synthetic();
        let same_n = vec![1e8; n.len()];
        assert!(matches!(
            fit_joint(&same_n, &d, &l, &JointFitOptions::default()),
            Err(Error::DegenerateDesign { .. })
        ));
        assert!(matches!(
            fit_joint(&n[..4], &d[..4], &l[..4], &JointFitOptions::default()),
            Err(Error::TooFewPoints { .. })
        ));
        let mut bad = l.clone();
        bad[3] = f64::NAN;
        assert!(matches!(
            fit_joint(&n, &d, &bad, &JointFitOptions::default()),
            Err(Error::NonFinite(_))
        ));
    }

    #[test]
    fn optimal_allocation_spends_the_budget() {
        let p = JointParams {
            e: 1.8,
            a: 482.0,
            b: 2085.0,
            alpha: 0.3478,
            beta: 0.3659,
        };
        let (nopt, dopt) = p.optimal_allocation(1e21, 6.0).unwrap();
        assert!((6.0 * nopt * dopt / 1e21 - 1.0).abs() < 1e-12);
        // Stationarity: moving along the budget line increases the loss.
        let l0 = p.predict(nopt, dopt);
        for f in [0.9, 1.1] {
            assert!(p.predict(nopt * f, dopt / f) > l0);
        }
        let (ea, eb) = p.allocation_exponents();
        assert!((ea + eb - 1.0).abs() < 1e-15);
    }
}
