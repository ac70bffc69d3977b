//! Single-variable laws L(x) = a·x^(−b) and L(x) = E + a·x^(−b).
//!
//! # Objectives
//! Two least-squares objectives are supported ([`Objective`]):
//! - [`Objective::Log`] (matscale's default, REFERENCE §8): Σ wᵢ (ln L̂(xᵢ) − ln Lᵢ)².
//!   Relative errors count equally at every scale, which suits losses that
//!   span decades. For L = a·x^(−b) this is ordinary least squares of ln L
//!   on ln x (solved in closed form).
//! - [`Objective::Linear`]: Σ wᵢ (L̂(xᵢ) − Lᵢ)², what scipy's `curve_fit`
//!   minimises when given the raw losses, and what the study did (L = a·x^(−b)
//!   from p0 = (1, 1)).
//!
//! Both minima agree with `curve_fit` run on the same objective
//! (`tests/data/scaling/make_fixtures.py`) to relative 1e-6.
//!
//! # Parameterisation
//! Internally x is centred, t = ln(x/x₀) with x₀ the geometric mean of x,
//! and the parameters are θ = (c, b[, e]) with a·x^(−b) = exp(c − b·t) and
//! E = exp(e). This keeps a > 0 and E ≥ 0 (E = 0 is approached as e → −∞,
//! which the fit reports as a boundary warning) and makes the problem well
//! scaled whatever the magnitude of x. a is recovered as exp(c + b·ln x₀).
//!
//! # Optimiser
//! argmin's L-BFGS with the analytic gradient, from a few starts (E₀ at
//! fractions of min L, then (c, b) by log-linear regression of L − E₀),
//! followed by damped Gauss–Newton (Levenberg–Marquardt) steps on the same
//! objective to converge to rounding level. The best start wins.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::optim::{lbfgs, LbfgsSettings, Smooth};

/// Functional form of a single-variable law.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SingleLaw {
    /// L = a·x^(−b).
    Power,
    /// L = E + a·x^(−b), E ≥ 0.
    PowerWithOffset,
}

impl SingleLaw {
    /// Number of free parameters.
    pub fn n_params(self) -> usize {
        match self {
            SingleLaw::Power => 2,
            SingleLaw::PowerWithOffset => 3,
        }
    }

    /// Formula for reports.
    pub fn formula(self) -> &'static str {
        match self {
            SingleLaw::Power => "L = a·x^-b",
            SingleLaw::PowerWithOffset => "L = E + a·x^-b",
        }
    }
}

/// Least-squares objective of a single-variable fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    /// Squared residuals of ln L.
    Log,
    /// Squared residuals of L (scipy `curve_fit` on raw losses).
    Linear,
}

/// Parameters of a single-variable law (E = 0 for [`SingleLaw::Power`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PowerParams {
    /// Coefficient a.
    pub a: f64,
    /// Exponent b.
    pub b: f64,
    /// Irreducible loss E.
    pub e: f64,
}

impl PowerParams {
    /// L(x).
    pub fn predict(&self, x: f64) -> f64 {
        self.e + self.a * x.powf(-self.b)
    }

    /// (a, b, E).
    pub fn to_vec(&self) -> Vec<f64> {
        vec![self.a, self.b, self.e]
    }

    /// Parameter names in the order of [`PowerParams::to_vec`].
    pub const NAMES: [&'static str; 3] = ["a", "b", "E"];
}

/// Result of a single-variable fit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PowerFit {
    /// Functional form.
    pub law: SingleLaw,
    /// Objective minimised.
    pub objective: Objective,
    /// Best parameters.
    pub params: PowerParams,
    /// Objective value (sum of squared residuals in the objective's space).
    pub sse: f64,
    /// Number of points.
    pub n_points: usize,
    /// Problems a reader should know about (boundary E, weak convergence).
    pub warnings: Vec<String>,
}

/// Points of a single-variable fit, validated and centred.
#[derive(Debug, Clone)]
pub(crate) struct SingleData {
    t: Vec<f64>,
    y: Vec<f64>,
    ln_y: Vec<f64>,
    ln_x0: f64,
}

impl SingleData {
    pub(crate) fn new(x: &[f64], y: &[f64], law: SingleLaw) -> Result<Self> {
        if x.len() != y.len() {
            return Err(Error::InvalidArgument(format!(
                "x has {} values, loss has {}",
                x.len(),
                y.len()
            )));
        }
        for (name, v) in [("x", x), ("loss", y)] {
            if let Some(i) = v.iter().position(|x| !x.is_finite() || *x <= 0.0) {
                return Err(Error::NonFinite(format!(
                    "{name}[{i}] = {} (power-law fits need finite positive values)",
                    v[i]
                )));
            }
        }
        let p = law.n_params();
        if x.len() < p {
            return Err(Error::TooFewPoints {
                law: law.formula().into(),
                points: x.len(),
                params: p,
            });
        }
        let mut distinct = x.to_vec();
        distinct.sort_by(f64::total_cmp);
        distinct.dedup();
        if distinct.len() < p {
            return Err(Error::DegenerateDesign {
                law: law.formula().into(),
                message: if distinct.len() == 1 {
                    format!(
                        "every x equals {}; the exponent cannot be identified",
                        distinct[0]
                    )
                } else {
                    format!(
                        "{} distinct x values cannot determine {p} parameters",
                        distinct.len()
                    )
                },
            });
        }
        let ln_x0 = x.iter().map(|v| v.ln()).sum::<f64>() / x.len() as f64;
        Ok(SingleData {
            t: x.iter().map(|v| v.ln() - ln_x0).collect(),
            y: y.to_vec(),
            ln_y: y.iter().map(|v| v.ln()).collect(),
            ln_x0,
        })
    }

    fn len(&self) -> usize {
        self.t.len()
    }
}

/// Objective in θ = (c, b[, e]).
struct SingleObjective<'a> {
    data: &'a SingleData,
    weights: Option<&'a [f64]>,
    law: SingleLaw,
    objective: Objective,
}

impl SingleObjective<'_> {
    /// Residual and its θ-derivatives at point i.
    #[inline]
    fn residual(&self, theta: &[f64], i: usize, jac: &mut [f64; 3]) -> f64 {
        let t = self.data.t[i];
        let p = (theta[0] - theta[1] * t).exp();
        let big_e = if self.law == SingleLaw::PowerWithOffset {
            theta[2].exp()
        } else {
            0.0
        };
        let m = p + big_e;
        // dm/dθ
        jac[0] = p;
        jac[1] = -t * p;
        jac[2] = big_e;
        match self.objective {
            Objective::Linear => m - self.data.y[i],
            Objective::Log => {
                for j in jac.iter_mut() {
                    *j /= m;
                }
                m.ln() - self.data.ln_y[i]
            }
        }
    }

    fn dim(&self) -> usize {
        self.law.n_params()
    }
}

impl Smooth for SingleObjective<'_> {
    fn eval(&self, theta: &[f64], g: &mut [f64]) -> f64 {
        let p = self.dim();
        let mut f = 0.0;
        g.iter_mut().for_each(|v| *v = 0.0);
        let mut jac = [0.0; 3];
        for i in 0..self.data.len() {
            let w = self.weights.map_or(1.0, |w| w[i]);
            if w == 0.0 {
                continue;
            }
            let r = self.residual(theta, i, &mut jac);
            f += w * r * r;
            for k in 0..p {
                g[k] += 2.0 * w * r * jac[k];
            }
        }
        f
    }
}

/// Solves the symmetric positive (semi)definite system `a·x = b` (p ≤ 3) by
/// Cholesky; `None` when not positive definite.
fn solve_spd(a: &[[f64; 3]; 3], b: &[f64; 3], p: usize) -> Option<[f64; 3]> {
    let mut l = [[0.0; 3]; 3];
    for i in 0..p {
        for j in 0..=i {
            let mut s = a[i][j];
            for k in 0..j {
                s -= l[i][k] * l[j][k];
            }
            if i == j {
                if s <= 0.0 || !s.is_finite() {
                    return None;
                }
                l[i][i] = s.sqrt();
            } else {
                l[i][j] = s / l[j][j];
            }
        }
    }
    let mut z = [0.0; 3];
    for i in 0..p {
        let mut s = b[i];
        for k in 0..i {
            s -= l[i][k] * z[k];
        }
        z[i] = s / l[i][i];
    }
    let mut x = [0.0; 3];
    for i in (0..p).rev() {
        let mut s = z[i];
        for k in i + 1..p {
            s -= l[k][i] * x[k];
        }
        x[i] = s / l[i][i];
    }
    Some(x)
}

/// Levenberg–Marquardt refinement from `theta`; returns the refined point
/// and its objective. Stops when a step no longer lowers the objective.
fn polish(obj: &SingleObjective, theta: &[f64]) -> (Vec<f64>, f64) {
    let p = obj.dim();
    let mut theta = theta.to_vec();
    let mut g = vec![0.0; p];
    let mut f = obj.eval(&theta, &mut g);
    let mut lambda = 1e-6;
    for _ in 0..200 {
        let mut jtj = [[0.0; 3]; 3];
        let mut jtr = [0.0; 3];
        let mut jac = [0.0; 3];
        for i in 0..obj.data.len() {
            let w = obj.weights.map_or(1.0, |w| w[i]);
            if w == 0.0 {
                continue;
            }
            let r = obj.residual(&theta, i, &mut jac);
            for a in 0..p {
                jtr[a] -= w * jac[a] * r;
                for b in 0..p {
                    jtj[a][b] += w * jac[a] * jac[b];
                }
            }
        }
        let mut improved = false;
        for _ in 0..30 {
            let mut damped = jtj;
            for a in 0..p {
                damped[a][a] += lambda * jtj[a][a].max(1e-300);
            }
            let Some(step) = solve_spd(&damped, &jtr, p) else {
                lambda *= 10.0;
                continue;
            };
            let trial: Vec<f64> = (0..p).map(|k| theta[k] + step[k]).collect();
            let ft = obj.eval(&trial, &mut g);
            if ft.is_finite() && ft <= f {
                let small = (0..p).all(|k| step[k].abs() <= 1e-15 * (1.0 + theta[k].abs()));
                let stalled = f - ft <= 1e-16 * f;
                theta = trial;
                f = ft;
                lambda = (lambda * 0.1).max(1e-12);
                improved = !(small || stalled);
                break;
            }
            lambda *= 10.0;
        }
        if !improved {
            break;
        }
    }
    (theta, f)
}

/// Ordinary least squares of ln(y − shift) on t: returns (c, b).
fn log_linear_start(data: &SingleData, shift: f64) -> Option<(f64, f64)> {
    let n = data.len() as f64;
    let z: Vec<f64> = data.y.iter().map(|y| (y - shift).ln()).collect();
    if z.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let mt = data.t.iter().sum::<f64>() / n;
    let mz = z.iter().sum::<f64>() / n;
    let stt: f64 = data.t.iter().map(|t| (t - mt) * (t - mt)).sum();
    let stz: f64 = data
        .t
        .iter()
        .zip(&z)
        .map(|(t, z)| (t - mt) * (z - mz))
        .sum();
    let slope = stz / stt;
    Some((mz - slope * mt, -slope))
}

fn starts(data: &SingleData, law: SingleLaw) -> Vec<Vec<f64>> {
    let min_y = data.y.iter().copied().fold(f64::INFINITY, f64::min);
    match law {
        SingleLaw::Power => {
            let (c, b) = log_linear_start(data, 0.0).expect("losses validated positive");
            vec![vec![c, b]]
        }
        SingleLaw::PowerWithOffset => [0.0, 0.5, 0.8, 0.95, 0.99]
            .iter()
            .filter_map(|frac| {
                let e0 = frac * min_y;
                let (c, b) = log_linear_start(data, e0)?;
                Some(vec![c, b, e0.max(1e-3 * min_y).ln()])
            })
            .collect(),
    }
}

fn to_params(theta: &[f64], law: SingleLaw, ln_x0: f64) -> PowerParams {
    PowerParams {
        a: (theta[0] + theta[1] * ln_x0).exp(),
        b: theta[1],
        e: if law == SingleLaw::PowerWithOffset {
            theta[2].exp()
        } else {
            0.0
        },
    }
}

fn theta_from(params: &PowerParams, law: SingleLaw, ln_x0: f64) -> Vec<f64> {
    let mut t = vec![params.a.ln() - params.b * ln_x0, params.b];
    if law == SingleLaw::PowerWithOffset {
        t.push(params.e.max(1e-300).ln());
    }
    t
}

/// Minimises from the given starts; returns (θ, objective).
fn minimise(
    data: &SingleData,
    weights: Option<&[f64]>,
    law: SingleLaw,
    objective: Objective,
    starts: &[Vec<f64>],
) -> Option<(Vec<f64>, f64)> {
    let obj = SingleObjective {
        data,
        weights,
        law,
        objective,
    };
    // L-BFGS brings each start into the basin; the Levenberg–Marquardt polish
    // that follows converges to rounding level, so L-BFGS may stop early.
    let settings = LbfgsSettings {
        tol_grad: 1e-10,
        tol_cost: 1e-16,
        max_iters: 2000,
        memory: 10,
    };
    let mut best: Option<(Vec<f64>, f64)> = None;
    for s in starts {
        let Some(out) = lbfgs(&obj, s, settings) else {
            continue;
        };
        let (theta, f) = polish(&obj, &out.x);
        if f.is_finite() && best.as_ref().is_none_or(|b| f < b.1) {
            best = Some((theta, f));
        }
    }
    best
}

/// Fits `law` to points (x, loss) by minimising `objective`.
///
/// Errors: [`Error::TooFewPoints`], [`Error::DegenerateDesign`] (fewer
/// distinct x than parameters), [`Error::NonFinite`] (non-finite or
/// non-positive input), [`Error::NotConverged`].
pub fn fit_power_law(
    x: &[f64],
    loss: &[f64],
    law: SingleLaw,
    objective: Objective,
) -> Result<PowerFit> {
    let data = SingleData::new(x, loss, law)?;
    let st = starts(&data, law);
    let (theta, sse) =
        minimise(&data, None, law, objective, &st).ok_or_else(|| Error::NotConverged {
            law: law.formula().into(),
            message: "no start reached a finite objective".into(),
        })?;
    let params = to_params(&theta, law, data.ln_x0);
    if !params.to_vec().iter().all(|v| v.is_finite()) {
        return Err(Error::NotConverged {
            law: law.formula().into(),
            message: format!("ended at non-finite parameters {params:?}"),
        });
    }
    let mut warnings = Vec::new();
    // Stationarity check in θ, relative to the size of the gradient terms.
    let obj = SingleObjective {
        data: &data,
        weights: None,
        law,
        objective,
    };
    let mut g = vec![0.0; law.n_params()];
    obj.eval(&theta, &mut g);
    let gnorm = g.iter().map(|v| v * v).sum::<f64>().sqrt();
    let scale = match objective {
        Objective::Log => data.len() as f64,
        Objective::Linear => data.y.iter().map(|y| y * y).sum::<f64>(),
    };
    if gnorm > 1e-6 * scale.max(sse) {
        warnings.push(format!(
            "{}: weak convergence (gradient norm {gnorm:.2e}); treat the estimates with care",
            law.formula()
        ));
    }
    if law == SingleLaw::PowerWithOffset {
        let min_y = data.y.iter().copied().fold(f64::INFINITY, f64::min);
        if params.e < 1e-6 * min_y {
            warnings.push(format!(
                "{}: E went to its bound 0 (E = {:.3e}); the data do not resolve an irreducible loss",
                law.formula(),
                params.e
            ));
        }
    }
    Ok(PowerFit {
        law,
        objective,
        params,
        sse,
        n_points: data.len(),
        warnings,
    })
}

/// Bootstrap of a single-variable fit; samples are (a, b, E). Each resample
/// is refitted from the full-data optimum and from the log-linear start with
/// E₀ = 0 (which reaches the E → 0 boundary when a resample has no
/// irreducible loss); the better of the two is kept.
pub fn bootstrap_power_law(
    x: &[f64],
    loss: &[f64],
    fit: &PowerFit,
    options: crate::bootstrap::BootstrapOptions,
) -> Result<crate::bootstrap::Bootstrap> {
    let data = SingleData::new(x, loss, fit.law)?;
    let p = fit.law.n_params();
    let mut st = starts(&data, fit.law);
    st.truncate(1);
    st.insert(0, theta_from(&fit.params, fit.law, data.ln_x0));
    Ok(crate::bootstrap::run(data.len(), options, |w| {
        // A resample needs as many distinct x as parameters.
        let mut xs: Vec<f64> = (0..data.len())
            .filter(|&i| w[i] > 0.0)
            .map(|i| data.t[i])
            .collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        if xs.len() < p {
            return None;
        }
        let (theta, _) = minimise(&data, Some(w), fit.law, fit.objective, &st)?;
        Some(to_params(&theta, fit.law, data.ln_x0).to_vec())
    }))
}

/// Sum of squared log residuals of `params` on (x, loss).
pub fn log_rss(x: &[f64], loss: &[f64], params: &PowerParams) -> f64 {
    x.iter()
        .zip(loss)
        .map(|(x, y)| {
            let r = params.predict(*x).ln() - y.ln();
            r * r
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xs() -> Vec<f64> {
        (0..12).map(|i| 10f64.powf(2.0 + 0.5 * i as f64)).collect()
    }

    #[test]
    fn exact_data_are_recovered_by_every_objective() {
        let x = xs();
        let truth = PowerParams {
            a: 40.0,
            b: 0.3,
            e: 0.7,
        };
        let y: Vec<f64> = x.iter().map(|x| truth.predict(*x)).collect();
        for objective in [Objective::Log, Objective::Linear] {
            let fit = fit_power_law(&x, &y, SingleLaw::PowerWithOffset, objective).unwrap();
            for (got, want) in fit.params.to_vec().iter().zip(truth.to_vec()) {
                assert!(
                    (got / want - 1.0).abs() < 1e-8,
                    "{objective:?}: {:?}",
                    fit.params
                );
            }
        }
        let pure: Vec<f64> = x.iter().map(|x| 3.0 * x.powf(-0.25)).collect();
        let fit = fit_power_law(&x, &pure, SingleLaw::Power, Objective::Linear).unwrap();
        assert!((fit.params.b - 0.25).abs() < 1e-10 && (fit.params.a / 3.0 - 1.0).abs() < 1e-10);
        assert_eq!(fit.params.e, 0.0);
    }

    #[test]
    fn gradient_matches_central_differences() {
        let x = xs();
        let y: Vec<f64> = x
            .iter()
            .enumerate()
            .map(|(i, x)| 2.0 + 9.0 * x.powf(-0.4) * (1.0 + 0.01 * (i as f64).sin()))
            .collect();
        let data = SingleData::new(&x, &y, SingleLaw::PowerWithOffset).unwrap();
        for objective in [Objective::Log, Objective::Linear] {
            let obj = SingleObjective {
                data: &data,
                weights: None,
                law: SingleLaw::PowerWithOffset,
                objective,
            };
            let t = [0.1, 0.35, 0.5];
            let mut g = [0.0; 3];
            obj.eval(&t, &mut g);
            for k in 0..3 {
                let (mut tp, mut tm) = (t, t);
                tp[k] += 1e-6;
                tm[k] -= 1e-6;
                let mut s = [0.0; 3];
                let fd = (obj.eval(&tp, &mut s) - obj.eval(&tm, &mut s)) / 2e-6;
                assert!(
                    (fd - g[k]).abs() < 1e-6 * g[k].abs().max(1e-6),
                    "{fd} {}",
                    g[k]
                );
            }
        }
    }

    #[test]
    fn errors_instead_of_wrong_numbers() {
        assert!(matches!(
            fit_power_law(
                &[1.0, 1.0, 1.0],
                &[2.0, 2.1, 1.9],
                SingleLaw::Power,
                Objective::Log
            ),
            Err(Error::DegenerateDesign { .. })
        ));
        assert!(matches!(
            fit_power_law(
                &[1.0, 2.0],
                &[2.0, 1.9],
                SingleLaw::PowerWithOffset,
                Objective::Log
            ),
            Err(Error::TooFewPoints { .. })
        ));
        assert!(matches!(
            fit_power_law(
                &[1.0, 2.0, 2.0, 1.0],
                &[2.0, 1.9, 1.8, 2.1],
                SingleLaw::PowerWithOffset,
                Objective::Log
            ),
            Err(Error::DegenerateDesign { .. })
        ));
        assert!(matches!(
            fit_power_law(
                &[1.0, 2.0, f64::NAN],
                &[2.0, 1.9, 1.8],
                SingleLaw::Power,
                Objective::Log
            ),
            Err(Error::NonFinite(_))
        ));
    }

    #[test]
    fn pure_power_data_put_e_on_its_bound_with_a_warning() {
        // Exact L = 5·x^-0.2: the best E is the bound 0, which the
        // exp-parameterisation approaches without reaching.
        let x = xs();
        let y: Vec<f64> = x.iter().map(|x| 5.0 * x.powf(-0.2)).collect();
        let fit = fit_power_law(&x, &y, SingleLaw::PowerWithOffset, Objective::Log).unwrap();
        assert!(fit.params.to_vec().iter().all(|v| v.is_finite()));
        assert!(fit.params.e < 1e-6, "{:?}", fit.params);
        assert!((fit.params.b - 0.2).abs() < 1e-4, "{:?}", fit.params);
        assert!(
            fit.warnings.iter().any(|w| w.contains("bound 0")),
            "{:?}",
            fit.warnings
        );
    }
}
