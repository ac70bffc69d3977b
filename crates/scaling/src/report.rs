//! Terminal table, `fits.json` and `report.md`.
//!
//! Files are written atomically: to a temporary name in the output folder,
//! then renamed, so that a reader never sees half a report.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::analysis::{Analysis, Param};
use crate::bootstrap::Interval;
use crate::error::{Error, Result};
use crate::power_law::SingleLaw;

/// A number with 4 significant digits, in scientific form when large or small.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.3e}")
    } else {
        let digits = if a == 0.0 {
            0
        } else {
            a.log10().floor() as i32
        };
        let decimals = (3 - digits).clamp(0, 6) as usize;
        format!("{v:.decimals$}")
    }
}

/// "est [lo, hi]" or "est" without an interval.
pub fn fmt_interval(iv: &Interval) -> String {
    if iv.has_bounds() {
        format!(
            "{} [{}, {}]",
            fmt_num(iv.estimate),
            fmt_num(iv.lower),
            fmt_num(iv.upper)
        )
    } else {
        fmt_num(iv.estimate)
    }
}

fn param_line(params: &[Param]) -> String {
    params
        .iter()
        .map(|p| format!("{} = {}", p.name, fmt_interval(&p.value)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn level(a: &Analysis) -> String {
    if a.options.bootstrap.resamples > 0 {
        format!(
            "{:.0}% percentile intervals from {} bootstrap resamples (seed {})",
            100.0 * a.options.bootstrap.level,
            a.options.bootstrap.resamples,
            a.options.bootstrap.seed
        )
    } else {
        "no bootstrap: point estimates only".into()
    }
}

/// The human table printed by `cargo xtask fit`.
pub fn terminal_table(a: &Analysis) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{} runs from {}; {}", a.n_runs, a.source, level(a));
    if !a.excluded_lines.is_empty() {
        let _ = writeln!(
            s,
            "excluded the {} highest-loss runs (lines {:?})",
            a.excluded_lines.len(),
            a.excluded_lines
        );
    }
    let _ = writeln!(
        s,
        "{:<16} {:<8} {:<16} {:>5}  {:<7} {:>12}  {:<27} {:>9}",
        "group", "x", "law", "n", "param", "estimate", "95% interval", "extrap."
    );
    for r in &a.single {
        for (i, p) in r.params.iter().enumerate() {
            let iv = if p.value.has_bounds() {
                format!("[{}, {}]", fmt_num(p.value.lower), fmt_num(p.value.upper))
            } else {
                "-".into()
            };
            let (g, x, law, n, ex) = if i == 0 {
                (
                    r.group.as_str(),
                    r.x.name(),
                    r.fit.law.formula(),
                    r.fit.n_points.to_string(),
                    r.extrapolation.as_ref().map_or("-".into(), |e| {
                        format!("{:.2}%", 100.0 * e.mean_abs_rel_error)
                    }),
                )
            } else {
                ("", "", "", String::new(), String::new())
            };
            let _ = writeln!(
                s,
                "{g:<16} {x:<8} {law:<16} {n:>5}  {:<7} {:>12}  {iv:<27} {ex:>9}",
                p.name,
                fmt_num(p.value.estimate)
            );
        }
    }
    for j in &a.joint {
        let _ = writeln!(
            s,
            "\njoint {} ({} runs, {} starts, {} at the best objective {:.7}):",
            j.group, j.fit.n_points, j.fit.starts, j.fit.starts_at_best, j.fit.objective
        );
        for p in &j.params {
            let _ = writeln!(s, "  {:<6} {}", p.name, fmt_interval(&p.value));
        }
        let _ = writeln!(s, "  N_opt ∝ C^{}", fmt_interval(&j.n_opt_exponent));
        let _ = writeln!(s, "  D_opt ∝ C^{}", fmt_interval(&j.d_opt_exponent));
    }
    for c in &a.comparisons {
        let _ = writeln!(s, "{} / {}: {}", c.group, c.x.name(), c.verdict);
    }
    for k in &a.skipped {
        let _ = writeln!(s, "skipped {} / {}: {}", k.group, k.what, k.reason);
    }
    for w in &a.warnings {
        let _ = writeln!(s, "warning: {w}");
    }
    s
}

/// The Markdown report; `plots` are file names relative to the report.
pub fn markdown(a: &Analysis, plots: &[String]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Scaling-law fits\n");
    let _ = writeln!(
        s,
        "Input: `{}` ({} runs). Single-variable objective: {} least squares. {}.\n",
        a.source,
        a.n_runs,
        match a.options.objective {
            crate::power_law::Objective::Log => "log-space",
            crate::power_law::Objective::Linear => "linear-space",
        },
        level(a)
    );
    if !a.excluded_lines.is_empty() {
        let _ = writeln!(
            s,
            "Excluded before fitting: the {} highest-loss runs (source lines {:?}).\n",
            a.excluded_lines.len(),
            a.excluded_lines
        );
    }
    if !a.single.is_empty() {
        let _ = writeln!(s, "## Single-variable laws\n");
        let _ = writeln!(
            s,
            "| group | x | law | n | parameters (95% interval) | RMS log residual | AIC | BIC | leave-largest-out error | predicted L at 10× largest x |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
        for r in &a.single {
            let ex = r.extrapolation.as_ref().map_or("n/a".into(), |e| {
                format!(
                    "{:.2}% ({} held out at x = {})",
                    100.0 * e.mean_abs_rel_error,
                    e.held_out,
                    fmt_num(e.held_out_x)
                )
            });
            let pred = r.predictions.last().map_or("n/a".into(), |p| {
                format!("{} at x = {}", fmt_interval(&p.value), fmt_num(p.at))
            });
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {:.4} | {:.1} | {:.1} | {} | {pred} |",
                r.group,
                r.x.name(),
                r.fit.law.formula(),
                r.fit.n_points,
                param_line(&r.params),
                r.criteria.rms_log_residual,
                r.criteria.aic,
                r.criteria.bic,
                ex
            );
        }
        let _ = writeln!(s);
    }
    if !a.comparisons.is_empty() {
        let _ = writeln!(s, "## Which form do the data support?\n");
        let _ = writeln!(
            s,
            "AIC/BIC assume independent Gaussian residuals of ln L with a common variance (k = law parameters + 1). \
             ΔAIC = AIC(E + a·x^-b) − AIC(a·x^-b); below −2 favours the irreducible loss.\n"
        );
        for c in &a.comparisons {
            let chosen = match c.preferred {
                SingleLaw::Power => "L = a·x^-b",
                SingleLaw::PowerWithOffset => "L = E + a·x^-b",
            };
            let _ = writeln!(
                s,
                "- **{} / {}** → `{chosen}`: {}",
                c.group,
                c.x.name(),
                c.verdict
            );
        }
        let _ = writeln!(s);
    }
    for j in &a.joint {
        let _ = writeln!(
            s,
            "## Joint law L(N, D) = E + A/N^α + B/D^β ({})\n",
            j.group
        );
        let _ = writeln!(
            s,
            "Chinchilla approach 3: Huber (δ = {}) on log residuals, logsumexp parameterisation, L-BFGS from {} starts; \
             {} starts reached the best summed objective {:.7} (gradient norm {:.1e}). Bootstrap refits start from {}.\n",
            j.fit.delta,
            j.fit.starts,
            j.fit.starts_at_best,
            j.fit.objective,
            j.fit.grad_norm,
            match j.refit_starts {
                crate::chinchilla::RefitStarts::Optimum => "the full-data optimum",
                crate::chinchilla::RefitStarts::Local => "the full-data optimum and 32 nearby corners",
                crate::chinchilla::RefitStarts::Grid => "the full initialisation grid",
            }
        );
        let _ = writeln!(s, "| parameter | estimate | 95% interval |\n|---|---|---|");
        for p in &j.params {
            let iv = if p.value.has_bounds() {
                format!("[{}, {}]", fmt_num(p.value.lower), fmt_num(p.value.upper))
            } else {
                "-".into()
            };
            let _ = writeln!(s, "| {} | {} | {iv} |", p.name, fmt_num(p.value.estimate));
        }
        let _ = writeln!(
            s,
            "\nCompute-optimal allocation with C = k·N·D (k = {}): N_opt ∝ C^a with a = β/(α+β) = {}, \
             D_opt ∝ C^b with b = α/(α+β) = {}.",
            fmt_num(j.k),
            fmt_interval(&j.n_opt_exponent),
            fmt_interval(&j.d_opt_exponent)
        );
        for p in &j.predictions {
            let _ = writeln!(
                s,
                "Compute-optimal loss at C = {}: {}.",
                fmt_num(p.at),
                fmt_interval(&p.value)
            );
        }
        let _ = writeln!(
            s,
            "Log-space fit quality: RMS log residual {:.4}, AIC {:.1}, BIC {:.1}.",
            j.criteria.rms_log_residual, j.criteria.aic, j.criteria.bic
        );
        if let Some(e) = &j.extrapolation {
            let _ = writeln!(
                s,
                "Leave-the-largest-model-out: fitted on {} runs, the {} runs of the largest model (N = {}) are predicted \
                 with mean |relative error| {:.2}% (mean signed {:+.2}%).",
                e.fitted,
                e.held_out,
                fmt_num(e.held_out_x),
                100.0 * e.mean_abs_rel_error,
                100.0 * e.mean_rel_error
            );
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "## Compute-optimal frontier\n");
    let _ = writeln!(
        s,
        "Lower envelope of loss over training compute across all runs ({} runs on it):\n",
        a.frontier.len()
    );
    let _ = writeln!(
        s,
        "| C (FLOP) | loss | model | N | D ({}) |\n|---|---|---|---|---|",
        a.data_unit
    );
    for p in &a.frontier {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            fmt_num(p.flops),
            fmt_num(p.loss),
            p.model,
            fmt_num(p.params),
            fmt_num(p.train_structures)
        );
    }
    let _ = writeln!(s);
    if !a.skipped.is_empty() || !a.warnings.is_empty() {
        let _ = writeln!(s, "## Warnings and fits not made\n");
        for k in &a.skipped {
            let _ = writeln!(s, "- not fitted: {} / {}: {}", k.group, k.what, k.reason);
        }
        for w in &a.warnings {
            let _ = writeln!(s, "- {w}");
        }
        let _ = writeln!(s);
    }
    if !plots.is_empty() {
        let _ = writeln!(s, "## Plots\n");
        for p in plots.iter().filter(|p| p.ends_with(".png")) {
            let _ = writeln!(s, "![{p}]({p})\n");
        }
    }
    s
}

/// Writes `bytes` to `path` through a temporary file in the same folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or("out".into(), |n| n.to_string_lossy().into_owned());
    let tmp: PathBuf = dir.join(format!(".{name}.tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Writes `fits.json`, the plots and `report.md` into `dir` (created if
/// needed); returns the files written.
pub fn write_outputs(a: &Analysis, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut written = Vec::new();
    let json = dir.join("fits.json");
    write_atomic(&json, serde_json::to_string_pretty(a)?.as_bytes())?;
    written.push(json);
    let plots = crate::plot::write_plots(a, dir)?;
    let names: Vec<String> = plots
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    written.extend(plots);
    let md = dir.join("report.md");
    write_atomic(&md, markdown(a, &names).as_bytes())?;
    written.push(md);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_formatted_readably() {
        assert_eq!(fmt_num(0.34781), "0.3478");
        assert_eq!(fmt_num(1.8172), "1.817");
        assert_eq!(fmt_num(482.01), "482.0");
        assert_eq!(fmt_num(2.5e21), "2.500e21");
        assert_eq!(fmt_num(0.0), "0");
    }
}
