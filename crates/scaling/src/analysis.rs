//! From a runs table to every fit, interval, comparison and frontier.
//!
//! [`analyse`] runs, for each group (model family, or all runs together):
//! the single-variable laws for each requested x, their bootstrap intervals,
//! AIC/BIC and the leave-the-largest-out check; the joint law when asked;
//! and the compute-optimal frontier. A fit that cannot be made (too few
//! points, degenerate design, no convergence) does not abort the analysis:
//! it is listed in [`Analysis::skipped`] with the reason, and the report
//! shows it.

use serde::{Deserialize, Serialize};

use crate::bootstrap::{Bootstrap, BootstrapOptions, Interval};
use crate::chinchilla::{
    self, fit_joint, InitGrid, JointFit, JointFitOptions, JointParams, RefitStarts,
};
use crate::error::Result;
use crate::frontier::{lower_envelope, FrontierPoint};
use crate::power_law::{
    bootstrap_power_law, fit_power_law, Objective, PowerFit, PowerParams, SingleLaw,
};
use crate::table::{Run, RunsTable};
use crate::validation::{information_criteria, InformationCriteria};

/// Independent variable of a single-variable law.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XVar {
    /// Training-set size D (structures; tokens for the Chinchilla import).
    Data,
    /// Training-set size in atoms.
    Atoms,
    /// Parameter count N.
    Params,
    /// Training compute C (FLOP).
    Compute,
}

impl XVar {
    /// The value for a run (`None` when the table lacks it, e.g. atoms).
    pub fn value(self, run: &Run) -> Option<f64> {
        match self {
            XVar::Data => Some(run.train_structures),
            XVar::Atoms => run.train_atoms,
            XVar::Params => Some(run.params),
            XVar::Compute => Some(run.flops),
        }
    }

    /// Short name ("data", "params", ...).
    pub fn name(self) -> &'static str {
        match self {
            XVar::Data => "data",
            XVar::Atoms => "atoms",
            XVar::Params => "params",
            XVar::Compute => "compute",
        }
    }

    /// Axis label with units; `data_unit` names what D counts.
    pub fn label(self, data_unit: &str) -> String {
        match self {
            XVar::Data => format!("training-set size D ({data_unit})"),
            XVar::Atoms => "training-set size (atoms)".into(),
            XVar::Params => "parameters N".into(),
            XVar::Compute => "training compute C (FLOP)".into(),
        }
    }
}

/// What to fit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AnalysisOptions {
    /// Variables for single-variable laws.
    pub xs: Vec<XVar>,
    /// Laws to fit for each x.
    pub laws: Vec<SingleLaw>,
    /// Objective of the single-variable fits.
    pub objective: Objective,
    /// Fit the joint law L(N, D).
    pub joint: bool,
    /// Fit each model family separately (otherwise all runs together).
    pub group_by_model: bool,
    /// Bootstrap settings (resamples 0 = no intervals).
    pub bootstrap: BootstrapOptions,
    /// Joint fit settings (grid, Huber δ).
    pub joint_options: JointFitOptions,
    /// Starts of the joint bootstrap refits.
    pub refit_starts: RefitStarts,
    /// Drop this many highest-loss runs before fitting (Besiroglu et al. drop 5).
    pub exclude_top_loss: usize,
    /// Single-variable fits use, for each distinct x in a group, only the
    /// lowest loss (the best model at that x), as the study did for its
    /// data-size fits. Off: every run is a point.
    pub envelope: bool,
}

impl Default for AnalysisOptions {
    fn default() -> Self {
        AnalysisOptions {
            xs: vec![XVar::Data, XVar::Params, XVar::Compute],
            laws: vec![SingleLaw::Power, SingleLaw::PowerWithOffset],
            objective: Objective::Log,
            joint: true,
            group_by_model: true,
            bootstrap: BootstrapOptions::default(),
            joint_options: JointFitOptions::default(),
            refit_starts: RefitStarts::Optimum,
            exclude_top_loss: 0,
            envelope: false,
        }
    }
}

/// A named parameter with its interval.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Param {
    /// Name ("a", "b", "E", "alpha", ...).
    pub name: String,
    /// Estimate and interval.
    #[serde(flatten)]
    pub value: Interval,
}

/// A prediction of the fitted law with its interval.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prediction {
    /// Where (x, or C for the joint law's compute-optimal loss).
    pub at: f64,
    /// Predicted loss and interval.
    #[serde(flatten)]
    pub value: Interval,
}

/// Leave-the-largest-out check: fit without the points at the largest x,
/// predict them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Extrapolation {
    /// The held-out x (the largest).
    pub held_out_x: f64,
    /// Points held out.
    pub held_out: usize,
    /// Points fitted.
    pub fitted: usize,
    /// Mean |predicted/observed − 1| on the held-out points.
    pub mean_abs_rel_error: f64,
    /// Mean of predicted/observed − 1 (sign says over- or under-prediction).
    pub mean_rel_error: f64,
}

/// One single-variable fit with everything derived from it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SingleFitReport {
    /// Model family or "all".
    pub group: String,
    /// Independent variable.
    pub x: XVar,
    /// The fit.
    pub fit: PowerFit,
    /// a, b (and E) with intervals.
    pub params: Vec<Param>,
    /// Log-space Gaussian AIC/BIC.
    pub criteria: InformationCriteria,
    /// Leave-the-largest-out check (None when too few distinct x remain).
    pub extrapolation: Option<Extrapolation>,
    /// Predictions at the largest x and at 10× it.
    pub predictions: Vec<Prediction>,
    /// Bootstrap resamples that failed.
    pub bootstrap_failed: usize,
    /// Bootstrap samples (a, b, E), kept for bands; not serialised.
    #[serde(skip)]
    pub bootstrap: Option<Bootstrap>,
    /// The points (x, loss) fitted.
    #[serde(skip)]
    pub points: Vec<(f64, f64)>,
}

/// Which single-variable form the data support, per group and x.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    /// Group.
    pub group: String,
    /// Variable.
    pub x: XVar,
    /// AIC(E + a·x^-b) − AIC(a·x^-b): negative favours the irreducible term.
    pub delta_aic: f64,
    /// Same for BIC.
    pub delta_bic: f64,
    /// Preferred form.
    pub preferred: SingleLaw,
    /// One sentence for the report.
    pub verdict: String,
}

/// The joint fit of one group with intervals and the compute-optimal allocation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JointReport {
    /// Group.
    pub group: String,
    /// The fit.
    pub fit: JointFit,
    /// E, A, B, α, β with intervals.
    pub params: Vec<Param>,
    /// k in C = k·N·D (median over the group's runs).
    pub k: f64,
    /// Exponent of N_opt ∝ C^a, a = β/(α+β).
    pub n_opt_exponent: Interval,
    /// Exponent of D_opt ∝ C^b, b = α/(α+β).
    pub d_opt_exponent: Interval,
    /// Compute-optimal loss at the largest C and at 10× it.
    pub predictions: Vec<Prediction>,
    /// Log-space Gaussian AIC/BIC (5 parameters + σ).
    pub criteria: InformationCriteria,
    /// Fit without the largest model (largest N), predicting its runs.
    pub extrapolation: Option<Extrapolation>,
    /// Bootstrap resamples that failed.
    pub bootstrap_failed: usize,
    /// How bootstrap refits were started.
    pub refit_starts: RefitStarts,
    /// Bootstrap samples (E, A, B, α, β); not serialised.
    #[serde(skip)]
    pub bootstrap: Option<Bootstrap>,
    /// The runs fitted as (N, D, C, loss).
    #[serde(skip)]
    pub points: Vec<[f64; 4]>,
}

/// A fit that was not made, and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Skipped {
    /// Group.
    pub group: String,
    /// What was attempted ("params / L = E + a·x^-b", "joint").
    pub what: String,
    /// The error.
    pub reason: String,
}

/// Everything [`analyse`] found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Analysis {
    /// Input file.
    pub source: String,
    /// Runs analysed (after exclusions).
    pub n_runs: usize,
    /// Source lines of the runs excluded by `exclude_top_loss`.
    pub excluded_lines: Vec<u64>,
    /// What D counts ("structures", "tokens").
    pub data_unit: String,
    /// Options used.
    pub options: AnalysisOptions,
    /// Single-variable fits.
    pub single: Vec<SingleFitReport>,
    /// Form comparisons.
    pub comparisons: Vec<Comparison>,
    /// Joint fits.
    pub joint: Vec<JointReport>,
    /// Lower envelope of loss over compute across all runs.
    pub frontier: Vec<FrontierPoint>,
    /// Fits not made.
    pub skipped: Vec<Skipped>,
    /// Warnings collected from the fits.
    pub warnings: Vec<String>,
    /// Every run as (model, C, loss), for the frontier plot; not serialised.
    #[serde(skip)]
    pub runs: Vec<(String, f64, f64)>,
}

fn params_with_intervals(
    names: &[&str],
    estimates: &[f64],
    boot: Option<&Bootstrap>,
) -> Vec<Param> {
    names
        .iter()
        .zip(estimates)
        .enumerate()
        .map(|(i, (name, &est))| Param {
            name: name.to_string(),
            value: boot.map_or(Interval::point(est), |b| b.interval(i, est)),
        })
        .collect()
}

fn single_extrapolation(
    x: &[f64],
    y: &[f64],
    law: SingleLaw,
    objective: Objective,
) -> Option<Extrapolation> {
    let xmax = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (mut xt, mut yt, mut held) = (Vec::new(), Vec::new(), Vec::new());
    for (&xi, &yi) in x.iter().zip(y) {
        if xi == xmax {
            held.push(yi);
        } else {
            xt.push(xi);
            yt.push(yi);
        }
    }
    let fit = fit_power_law(&xt, &yt, law, objective).ok()?;
    let pred = fit.params.predict(xmax);
    let rel: Vec<f64> = held.iter().map(|y| pred / y - 1.0).collect();
    Some(Extrapolation {
        held_out_x: xmax,
        held_out: held.len(),
        fitted: xt.len(),
        mean_abs_rel_error: rel.iter().map(|r| r.abs()).sum::<f64>() / rel.len() as f64,
        mean_rel_error: rel.iter().sum::<f64>() / rel.len() as f64,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// For each distinct x, the lowest y; sorted by x.
fn lowest_per_x(x: &[f64], y: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let mut pairs: Vec<(f64, f64)> = x.iter().copied().zip(y.iter().copied()).collect();
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    pairs.dedup_by(|later, first| later.0 == first.0);
    pairs.into_iter().unzip()
}

fn analyse_single(
    group: &str,
    runs: &[&Run],
    xvar: XVar,
    law: SingleLaw,
    options: &AnalysisOptions,
) -> Result<SingleFitReport> {
    let mut x = Vec::new();
    let mut y = Vec::new();
    for r in runs {
        if let Some(v) = xvar.value(r) {
            x.push(v);
            y.push(r.val_loss);
        }
    }
    if options.envelope {
        (x, y) = lowest_per_x(&x, &y);
    }
    let fit = fit_power_law(&x, &y, law, options.objective)?;
    let boot = if options.bootstrap.resamples > 0 {
        Some(bootstrap_power_law(&x, &y, &fit, options.bootstrap)?)
    } else {
        None
    };
    let names: &[&str] = match law {
        SingleLaw::Power => &PowerParams::NAMES[..2],
        SingleLaw::PowerWithOffset => &PowerParams::NAMES,
    };
    let params = params_with_intervals(names, &fit.params.to_vec(), boot.as_ref());
    let criteria = information_criteria(&x, &y, |x| fit.params.predict(x), law.n_params());
    let xmax = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let predictions = [xmax, 10.0 * xmax]
        .iter()
        .map(|&at| {
            let est = fit.params.predict(at);
            Prediction {
                at,
                value: boot.as_ref().map_or(Interval::point(est), |b| {
                    b.interval_of_fn(|s| s[2] + s[0] * at.powf(-s[1]), est)
                }),
            }
        })
        .collect();
    Ok(SingleFitReport {
        group: group.to_string(),
        x: xvar,
        extrapolation: single_extrapolation(&x, &y, law, options.objective),
        params,
        criteria,
        predictions,
        bootstrap_failed: boot.as_ref().map_or(0, |b| b.failed),
        bootstrap: boot,
        points: x.into_iter().zip(y).collect(),
        fit,
    })
}

fn analyse_joint(group: &str, runs: &[&Run], options: &AnalysisOptions) -> Result<JointReport> {
    let n: Vec<f64> = runs.iter().map(|r| r.params).collect();
    let d: Vec<f64> = runs.iter().map(|r| r.train_structures).collect();
    let c: Vec<f64> = runs.iter().map(|r| r.flops).collect();
    let l: Vec<f64> = runs.iter().map(|r| r.val_loss).collect();
    let opts = &options.joint_options;
    let fit = fit_joint(&n, &d, &l, opts)?;
    let starts = chinchilla::refit_starts(&fit.params, options.refit_starts, &opts.grid);
    let boot = if options.bootstrap.resamples > 0 {
        Some(chinchilla::bootstrap_joint(
            &n,
            &d,
            &l,
            &starts,
            opts,
            options.bootstrap,
        )?)
    } else {
        None
    };
    let p = fit.params;
    let params = params_with_intervals(&JointParams::NAMES, &p.to_vec(), boot.as_ref());
    let k = median(runs.iter().map(|r| r.k()).collect());
    let (ea, eb) = p.allocation_exponents();
    let exponent = |which: usize, est: f64| {
        boot.as_ref().map_or(Interval::point(est), |b| {
            b.interval_of_fn(
                |s| {
                    if which == 0 {
                        s[4] / (s[3] + s[4])
                    } else {
                        s[3] / (s[3] + s[4])
                    }
                },
                est,
            )
        })
    };
    let cmax = c.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let optimal_loss = |q: &JointParams, at: f64| {
        q.optimal_allocation(at, k)
            .map_or(f64::NAN, |(nn, dd)| q.predict(nn, dd))
    };
    let predictions = [cmax, 10.0 * cmax]
        .iter()
        .map(|&at| {
            let est = optimal_loss(&p, at);
            Prediction {
                at,
                value: boot.as_ref().map_or(Interval::point(est), |b| {
                    b.interval_of_fn(|s| optimal_loss(&params_from_vec(s), at), est)
                }),
            }
        })
        .collect();
    let criteria = {
        let pred: Vec<f64> = n.iter().zip(&d).map(|(n, d)| p.predict(*n, *d)).collect();
        crate::validation::information_criteria_from_predictions(&l, &pred, 5)
    };
    Ok(JointReport {
        group: group.to_string(),
        extrapolation: joint_extrapolation(&n, &d, &l, &p, opts),
        params,
        k,
        n_opt_exponent: exponent(0, ea),
        d_opt_exponent: exponent(1, eb),
        predictions,
        criteria,
        bootstrap_failed: boot.as_ref().map_or(0, |b| b.failed),
        refit_starts: options.refit_starts,
        bootstrap: boot,
        points: (0..n.len()).map(|i| [n[i], d[i], c[i], l[i]]).collect(),
        fit,
    })
}

pub(crate) fn params_from_vec(s: &[f64]) -> JointParams {
    JointParams {
        e: s[0],
        a: s[1],
        b: s[2],
        alpha: s[3],
        beta: s[4],
    }
}

/// Refit without the runs of the largest model (largest N) from the
/// full-data optimum and its local box, then predict the held-out runs.
fn joint_extrapolation(
    n: &[f64],
    d: &[f64],
    l: &[f64],
    p: &JointParams,
    opts: &JointFitOptions,
) -> Option<Extrapolation> {
    let nmax = n.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let keep: Vec<usize> = (0..n.len()).filter(|&i| n[i] < nmax).collect();
    let held: Vec<usize> = (0..n.len()).filter(|&i| n[i] == nmax).collect();
    let pick = |v: &[f64]| keep.iter().map(|&i| v[i]).collect::<Vec<f64>>();
    let grid = chinchilla::refit_starts(p, RefitStarts::Local, &InitGrid::single(p));
    let local = JointFitOptions {
        grid: InitGrid::single(p),
        ..opts.clone()
    };
    let data = chinchilla::JointData::new(&pick(n), &pick(d), &pick(l)).ok()?;
    let (best, _, _) =
        chinchilla::best_of_starts(&data, None, local.delta, &grid, local.max_iters, true);
    let q = chinchilla::params_of(&best?.theta);
    let rel: Vec<f64> = held
        .iter()
        .map(|&i| q.predict(n[i], d[i]) / l[i] - 1.0)
        .collect();
    Some(Extrapolation {
        held_out_x: nmax,
        held_out: held.len(),
        fitted: keep.len(),
        mean_abs_rel_error: rel.iter().map(|r| r.abs()).sum::<f64>() / rel.len() as f64,
        mean_rel_error: rel.iter().sum::<f64>() / rel.len() as f64,
    })
}

fn compare(group: &str, x: XVar, power: &SingleFitReport, offset: &SingleFitReport) -> Comparison {
    let delta_aic = offset.criteria.aic - power.criteria.aic;
    let delta_bic = offset.criteria.bic - power.criteria.bic;
    let at_bound = offset.fit.warnings.iter().any(|w| w.contains("bound 0"));
    let (preferred, verdict) = if at_bound {
        (
            SingleLaw::Power,
            "E went to 0: the data show no irreducible loss; the pure power law is the supported form".to_string(),
        )
    } else if delta_aic < -2.0 {
        (
            SingleLaw::PowerWithOffset,
            format!("ΔAIC = {delta_aic:.1} (ΔBIC = {delta_bic:.1}): the data support an irreducible loss E"),
        )
    } else if delta_aic > 2.0 {
        (
            SingleLaw::Power,
            format!("ΔAIC = {delta_aic:+.1}: the extra parameter E is not supported; the pure power law is preferred"),
        )
    } else {
        (
            SingleLaw::Power,
            format!("|ΔAIC| = {:.1} < 2: the data cannot distinguish the forms; the simpler pure power law is kept", delta_aic.abs()),
        )
    };
    Comparison {
        group: group.to_string(),
        x,
        delta_aic,
        delta_bic,
        preferred,
        verdict,
    }
}

/// Runs every requested fit on `table`.
pub fn analyse(table: &RunsTable, options: &AnalysisOptions) -> Result<Analysis> {
    let (kept, excluded);
    let table = if options.exclude_top_loss > 0 {
        (kept, excluded) = table.exclude_top_loss(options.exclude_top_loss)?;
        &kept
    } else {
        excluded = Vec::new();
        table
    };
    let groups: Vec<(String, Vec<&Run>)> = if options.group_by_model {
        table
            .families()
            .into_iter()
            .map(|f| {
                let runs = table.family(&f);
                (f, runs)
            })
            .collect()
    } else {
        vec![("all".to_string(), table.runs().iter().collect())]
    };
    let mut single = Vec::new();
    let mut comparisons = Vec::new();
    let mut joint = Vec::new();
    let mut skipped = Vec::new();
    let mut warnings = Vec::new();
    for (group, runs) in &groups {
        for &x in &options.xs {
            let mut fitted: Vec<SingleFitReport> = Vec::new();
            for &law in &options.laws {
                match analyse_single(group, runs, x, law, options) {
                    Ok(rep) => {
                        for w in &rep.fit.warnings {
                            warnings.push(format!("{group} / {}: {w}", x.name()));
                        }
                        fitted.push(rep);
                    }
                    Err(e) => skipped.push(Skipped {
                        group: group.clone(),
                        what: x.name().to_string(),
                        reason: e.to_string(),
                    }),
                }
            }
            let power = fitted.iter().find(|r| r.fit.law == SingleLaw::Power);
            let offset = fitted
                .iter()
                .find(|r| r.fit.law == SingleLaw::PowerWithOffset);
            if let (Some(p), Some(o)) = (power, offset) {
                comparisons.push(compare(group, x, p, o));
            }
            single.extend(fitted);
        }
        if options.joint {
            match analyse_joint(group, runs, options) {
                Ok(rep) => {
                    let p = rep.fit.params;
                    let min_loss = runs
                        .iter()
                        .map(|r| r.val_loss)
                        .fold(f64::INFINITY, f64::min);
                    if p.e < 1e-6 * min_loss {
                        warnings.push(format!(
                            "{group} / joint: E went to its bound 0 (E = {:.3e}); the data do not resolve an irreducible loss",
                            p.e
                        ));
                    }
                    if p.alpha <= 0.0 || p.beta <= 0.0 {
                        warnings.push(format!(
                            "{group} / joint: non-positive exponent (α = {:.4}, β = {:.4}); no compute-optimal allocation exists",
                            p.alpha, p.beta
                        ));
                    }
                    if rep.fit.grad_norm > 1e-5 {
                        warnings.push(format!(
                            "{group} / joint: weak convergence (gradient norm {:.2e})",
                            rep.fit.grad_norm
                        ));
                    }
                    if rep.fit.starts_at_best < 2 {
                        warnings.push(format!(
                            "{group} / joint: only {} of {} starts reached the best objective; the optimum may be fragile",
                            rep.fit.starts_at_best, rep.fit.starts
                        ));
                    }
                    joint.push(rep)
                }
                Err(e) => skipped.push(Skipped {
                    group: group.clone(),
                    what: "joint".into(),
                    reason: e.to_string(),
                }),
            }
        }
    }
    Ok(Analysis {
        source: table.source().display().to_string(),
        n_runs: table.len(),
        excluded_lines: excluded.iter().map(|r| r.line).collect(),
        data_unit: table.data_unit().to_string(),
        options: options.clone(),
        single,
        comparisons,
        joint,
        frontier: lower_envelope(table.runs()),
        skipped,
        warnings,
        runs: table
            .runs()
            .iter()
            .map(|r| (r.model.clone(), r.flops, r.val_loss))
            .collect(),
    })
}
