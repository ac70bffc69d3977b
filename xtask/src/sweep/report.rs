//! After the runs: the runs table (`runs.csv`, docs/RUNS_TABLE.md), the fits
//! (matscale-scaling), `report.md`, `report.html` (plots embedded as SVG) and the exponents
//! on the terminal.
//!
//! Fits per group (family, or `family@dataset`): loss against data D and against parameters
//! N on the lower envelope (at each D the best model, at each N its best data size: the
//! study's procedure), loss against compute C on the group's compute frontier (the lowest
//! loss reached with at most C FLOPs), each as L = a·x^-b and L = E + a·x^-b with bootstrap
//! 95% intervals and the leave-the-largest-out check; the joint law L(N, D) over all runs
//! of a group; the frontier over all runs.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use matscale_scaling::analysis::{analyse, Analysis, AnalysisOptions, XVar};
use matscale_scaling::bootstrap::BootstrapOptions;
use matscale_scaling::frontier::lower_envelope;
use matscale_scaling::power_law::SingleLaw;
use matscale_scaling::report::{fmt_interval, fmt_num};
use matscale_scaling::{Run, RunsTable};
use matscale_trainer::RunResult;

use super::plan::{duration, Plan, PlannedRun};
use super::runner::write_atomic;

/// One finished run.
pub struct Finished<'a> {
    /// Its plan entry.
    pub run: &'a PlannedRun,
    /// Its `result.json`.
    pub result: RunResult,
}

/// The columns of `runs.csv` (docs/RUNS_TABLE.md, then free-form ones).
pub const COLUMNS: [&str; 17] = [
    "model",
    "params",
    "train_structures",
    "train_atoms",
    "flops",
    "val_loss",
    "val_energy",
    "val_force",
    "val_stress",
    "flops_per_param_sample",
    "family",
    "size",
    "seed",
    "epochs",
    "best_epoch",
    "wall_time_s",
    "run_id",
];

/// The `runs.csv` text: one row per finished run, in grid order; floats in shortest
/// round-trip form so the table is exact.
pub fn runs_csv(finished: &[Finished]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{}", COLUMNS.join(","));
    for f in finished {
        let r = &f.result;
        let w = &r.train.loss;
        let b = &r.best_val;
        let val_stress =
            w.stress_isotropic * b.stress_isotropic + w.stress_deviatoric * b.stress_deviatoric;
        let k = r.training_flops / (r.n_parameters as f64 * r.n_train as f64);
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            f.run.group,
            r.n_parameters,
            r.n_train,
            r.n_train_atoms,
            r.training_flops,
            r.best_val_loss,
            w.energy * b.energy,
            w.forces * b.forces,
            val_stress,
            k,
            f.run.family,
            f.run.size,
            f.run.seed,
            r.epochs,
            r.best_epoch,
            r.wall_time_s,
            f.run.id
        );
    }
    s
}

/// Fits everything (see the [module docs](self)).
pub fn fit(table: &RunsTable, plan: &Plan) -> anyhow::Result<Analysis> {
    let bootstrap = BootstrapOptions {
        resamples: plan.config.fit.bootstrap,
        seed: plan.config.fit.seed,
        level: 0.95,
    };
    let laws = vec![SingleLaw::Power, SingleLaw::PowerWithOffset];
    let mut analysis = analyse(
        table,
        &AnalysisOptions {
            xs: vec![XVar::Data, XVar::Params],
            laws: laws.clone(),
            joint: plan.config.fit.joint,
            group_by_model: true,
            bootstrap,
            envelope: true,
            ..AnalysisOptions::default()
        },
    )
    .context("fitting the laws in data and parameters")?;
    // Compute: per group, the runs on that group's frontier.
    let mut frontier_runs = Vec::new();
    for group in table.families() {
        let runs: Vec<Run> = table.family(&group).into_iter().cloned().collect();
        for p in lower_envelope(&runs) {
            let mut run = Run::new(&group, p.params, p.train_structures, p.flops, p.loss);
            run.line = p.line;
            frontier_runs.push(run);
        }
    }
    let compute_table = RunsTable::new(frontier_runs).context("the compute frontier table")?;
    let compute = analyse(
        &compute_table,
        &AnalysisOptions {
            xs: vec![XVar::Compute],
            laws,
            joint: false,
            group_by_model: true,
            bootstrap,
            envelope: false,
            ..AnalysisOptions::default()
        },
    )
    .context("fitting the laws in compute")?;
    analysis.single.extend(compute.single);
    analysis.comparisons.extend(compute.comparisons);
    analysis.skipped.extend(compute.skipped);
    analysis.warnings.extend(compute.warnings);
    Ok(analysis)
}

/// The data-law summary of one group.
pub struct GroupSummary {
    /// Group name.
    pub group: String,
    /// Exponent b of L = a·D^-b with its interval, when fitted.
    pub data_b: Option<String>,
    /// Its point estimate.
    pub data_b_value: Option<f64>,
    /// Parameter exponent.
    pub params_b: Option<String>,
    /// Compute exponent (frontier).
    pub compute_b: Option<String>,
    /// The supported form for data.
    pub data_form: String,
    /// Lowest loss at the largest D, and at the smallest D.
    pub loss_range: (f64, f64),
    /// True when the envelope loss falls from the smallest to the largest D at every step.
    pub monotone: bool,
}

fn exponent(a: &Analysis, group: &str, x: XVar, law: SingleLaw) -> Option<(String, f64)> {
    let r = a
        .single
        .iter()
        .find(|r| r.group == group && r.x == x && r.fit.law == law)?;
    let b = r.params.iter().find(|p| p.name == "b")?;
    Some((fmt_interval(&b.value), b.value.estimate))
}

/// Per-group summaries of the data law.
pub fn summaries(a: &Analysis, table: &RunsTable) -> Vec<GroupSummary> {
    table
        .families()
        .into_iter()
        .map(|g| {
            let mut env: Vec<(f64, f64)> = Vec::new();
            for r in table.family(&g) {
                match env.iter_mut().find(|(d, _)| *d == r.train_structures) {
                    Some(e) => e.1 = e.1.min(r.val_loss),
                    None => env.push((r.train_structures, r.val_loss)),
                }
            }
            env.sort_by(|x, y| x.0.total_cmp(&y.0));
            let monotone = env.windows(2).all(|w| w[1].1 < w[0].1);
            let comparison = a
                .comparisons
                .iter()
                .find(|c| c.group == g && c.x == XVar::Data);
            let data = exponent(a, &g, XVar::Data, SingleLaw::Power);
            GroupSummary {
                data_b_value: data.as_ref().map(|d| d.1),
                data_b: data.map(|d| d.0),
                params_b: exponent(a, &g, XVar::Params, SingleLaw::Power).map(|d| d.0),
                compute_b: exponent(a, &g, XVar::Compute, SingleLaw::Power).map(|d| d.0),
                data_form: comparison.map_or("not compared (too few points)".into(), |c| {
                    match c.preferred {
                        SingleLaw::Power => "L = a·D^-b".to_string(),
                        SingleLaw::PowerWithOffset => "L = E + a·D^-b".to_string(),
                    }
                }),
                loss_range: (
                    env.last().map_or(f64::NAN, |e| e.1),
                    env.first().map_or(f64::NAN, |e| e.1),
                ),
                monotone,
                group: g,
            }
        })
        .collect()
}

/// The terminal summary.
pub fn terminal(summaries: &[GroupSummary]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<18} {:<28} {:<28} {:<28} data law",
        "family", "data exponent b (95%)", "params exponent", "compute exponent"
    );
    for g in summaries {
        let _ = writeln!(
            s,
            "{:<18} {:<28} {:<28} {:<28} {}{}",
            g.group,
            g.data_b.as_deref().unwrap_or("-"),
            g.params_b.as_deref().unwrap_or("-"),
            g.compute_b.as_deref().unwrap_or("-"),
            g.data_form,
            if g.monotone {
                ""
            } else {
                "  (loss not monotone in D)"
            }
        );
    }
    s
}

/// Environment facts for the report.
pub struct ReportContext<'a> {
    /// The sweep directory.
    pub dir: &'a Path,
    /// Wall time of this invocation, s (None when only re-reporting).
    pub wall_time_s: Option<f64>,
    /// Jobs × threads.
    pub jobs: usize,
    /// Threads per job.
    pub threads: usize,
    /// Failed runs: id and error.
    pub failed: Vec<(String, String)>,
}

fn findings(summaries: &[GroupSummary]) -> String {
    let mut s = String::new();
    let fitted: Vec<&GroupSummary> = summaries
        .iter()
        .filter(|g| g.data_b_value.is_some())
        .collect();
    let falling: Vec<&str> = summaries
        .iter()
        .filter(|g| g.monotone && g.data_b_value.is_some_and(|b| b > 0.0))
        .map(|g| g.group.as_str())
        .collect();
    let _ = writeln!(
        s,
        "- **Loss falls with data** (best model at each training-set size, every step \
         lower than the last) for {} of {} {}{}.",
        falling.len(),
        summaries.len(),
        if summaries.iter().any(|g| g.group.contains('@')) {
            "family@dataset groups"
        } else {
            "families"
        },
        if falling.len() == summaries.len() {
            String::new()
        } else {
            format!(" (only {})", falling.join(", "))
        }
    );
    if let Some(best) = fitted.iter().max_by(|a, b| {
        a.data_b_value
            .unwrap_or(f64::NAN)
            .total_cmp(&b.data_b_value.unwrap_or(f64::NAN))
    }) {
        let _ = writeln!(
            s,
            "- **Steepest data scaling**: {} (b = {}).",
            best.group,
            best.data_b.as_deref().unwrap_or("-")
        );
    }
    if let Some(low) = summaries
        .iter()
        .min_by(|a, b| a.loss_range.0.total_cmp(&b.loss_range.0))
    {
        let _ = writeln!(
            s,
            "- **Lowest loss at the largest training set**: {} ({}).",
            low.group,
            fmt_num(low.loss_range.0)
        );
    }
    for g in summaries {
        let _ = writeln!(
            s,
            "- {}: the supported data law is `{}`.",
            g.group, g.data_form
        );
    }
    let _ = writeln!(
        s,
        "\nComparison with the study (Trikha et al. 2025): it reports that the validation loss \
         follows a power law in the training-set size, fitted as L = a·D^-b without an \
         irreducible term or intervals, with exponents per model family; Frey et al. (2023) \
         found data exponents of about 0.26 for equivariant potentials and 0.17 for ChemGPT. \
         The table above says, per family, whether the power law holds here, whether an \
         irreducible loss is supported, and which family scales best. These are small models \
         on small data: a check of the method, not a measurement to compare digit by digit."
    );
    s
}

/// Writes `runs.csv`, the plots, `fits.json`, `report.md` and `report.html` into
/// `ctx.dir`; returns the terminal summary.
pub fn write(plan: &Plan, finished: &[Finished], ctx: &ReportContext) -> anyhow::Result<String> {
    let dir = ctx.dir;
    let csv_path = dir.join("runs.csv");
    write_atomic(&csv_path, runs_csv(finished).as_bytes())?;
    let table = RunsTable::read(&csv_path, None)
        .with_context(|| format!("reading back {}", csv_path.display()))?;
    let analysis = fit(&table, plan)?;
    write_atomic(
        &dir.join("fits.json"),
        serde_json::to_string_pretty(&analysis)?.as_bytes(),
    )?;
    let plots = matscale_scaling::plot::write_plots(&analysis, dir).context("plotting")?;
    let names: Vec<String> = plots
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    let sums = summaries(&analysis, &table);
    let md = markdown(plan, finished, ctx, &analysis, &sums, &names);
    write_atomic(&dir.join("report.md"), md.as_bytes())?;
    write_atomic(&dir.join("report.html"), html(&md, dir).as_bytes())?;
    Ok(terminal(&sums))
}

fn markdown(
    plan: &Plan,
    finished: &[Finished],
    ctx: &ReportContext,
    analysis: &Analysis,
    sums: &[GroupSummary],
    plots: &[String],
) -> String {
    let c = &plan.config;
    let mut s = String::new();
    let _ = writeln!(s, "# Scaling sweep `{}`\n", c.name);
    if !c.description.is_empty() {
        let _ = writeln!(s, "{}\n", c.description.trim());
    }
    let _ = writeln!(
        s,
        "{} of {} runs finished{}; {} jobs × {} threads on a {}-core machine{}.\n",
        finished.len(),
        plan.runs.len(),
        if ctx.failed.is_empty() {
            String::new()
        } else {
            format!(", {} failed", ctx.failed.len())
        },
        ctx.jobs,
        ctx.threads,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        ctx.wall_time_s.map_or(String::new(), |t| format!(
            "; the runs of this invocation took {}",
            duration(t)
        ))
    );
    let _ = writeln!(s, "## Findings\n");
    s.push_str(&findings(sums));
    let _ = writeln!(
        s,
        "\n| family | data exponent b (95%) | parameter exponent | compute exponent (frontier) | data law supported | best loss at largest D |\n|---|---|---|---|---|---|"
    );
    for g in sums {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | `{}` | {} |",
            g.group,
            g.data_b.as_deref().unwrap_or("-"),
            g.params_b.as_deref().unwrap_or("-"),
            g.compute_b.as_deref().unwrap_or("-"),
            g.data_form,
            fmt_num(g.loss_range.0)
        );
    }
    let _ = writeln!(s, "\n## Grid\n");
    for (name, p) in &plan.probes {
        let _ = writeln!(
            s,
            "- data{}: training pool {} structures, {:.1} atoms and {:.0} directed edges per structure ({}).",
            name.as_ref().map_or(String::new(), |n| format!(" `{n}`")),
            p.pool.map_or("?".into(), |n| n.to_string()),
            p.mean_atoms,
            p.mean_edges,
            p.origin
        );
    }
    let data_sizes: Vec<String> = if c.train_sizes.is_empty() {
        c.train_fractions.iter().map(|f| f.to_string()).collect()
    } else {
        c.train_sizes.iter().map(|k| k.to_string()).collect()
    };
    let _ = writeln!(
        s,
        "- training sizes ({}): {} (nested prefixes of one order, split seed {}); seeds {:?}; {}; force mode {}; precision {}.",
        if c.train_sizes.is_empty() { "fractions of the pool" } else { "structures" },
        data_sizes.join(", "),
        c.dataset_list().ok().and_then(|d| d.first().map(|x| x.1.split_seed)).unwrap_or(0),
        c.seeds,
        match c.budget {
            None => format!("{} epochs", c.train.epochs),
            Some(b) => format!(
                "a budget of {} structures per run ({}–{} epochs)",
                b.structures, b.min_epochs, b.max_epochs
            ),
        },
        c.force_mode,
        c.train.precision
    );
    let _ = writeln!(
        s,
        "\n| family | sizes (target → parameters) | max LR | batch | epochs |\n|---|---|---|---|---|"
    );
    for f in &c.families {
        let mut sizes: Vec<String> = Vec::new();
        for r in plan.runs.iter().filter(|r| r.family == f.family.name()) {
            let t = format!("{} → {}", r.size, r.n_parameters);
            if !sizes.contains(&t) {
                sizes.push(t);
            }
        }
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            f.family,
            sizes.join(", "),
            f.max_lr.unwrap_or(c.train.max_lr),
            f.batch_size.unwrap_or(c.train.batch_size),
            f.epochs.map_or("as above".into(), |e| e.to_string())
        );
    }
    let _ = writeln!(s, "\n## Runs\n");
    let _ = writeln!(
        s,
        "Best validation loss (the study's 2.5·E/atom + 20·F + 5·σ_iso + 5·σ_dev, eV units) and its terms; \
         FLOPs are analytic training FLOPs. The same rows are in `runs.csv`.\n"
    );
    let _ = writeln!(
        s,
        "| run | N | D | atoms | epochs | FLOPs | val loss | energy | forces | stress | E meV/atom | F meV/Å | time |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for f in finished {
        let r = &f.result;
        let w = &r.train.loss;
        let b = &r.best_val;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.1} | {} |",
            f.run.id,
            r.n_parameters,
            r.n_train,
            r.n_train_atoms,
            r.epochs,
            fmt_num(r.training_flops),
            fmt_num(r.best_val_loss),
            fmt_num(w.energy * b.energy),
            fmt_num(w.forces * b.forces),
            fmt_num(
                w.stress_isotropic * b.stress_isotropic + w.stress_deviatoric * b.stress_deviatoric
            ),
            r.best_val_metrics.energy_mae_mev_per_atom,
            r.best_val_metrics.force_mae_mev_per_angstrom,
            duration(r.wall_time_s)
        );
    }
    if !ctx.failed.is_empty() {
        let _ = writeln!(s, "\n### Failed runs\n");
        for (id, e) in &ctx.failed {
            let _ = writeln!(s, "- `{id}`: {e}");
        }
    }
    let _ = writeln!(
        s,
        "\n## Fits\n\nSingle-variable laws use the lower envelope: for data, the best model at each \
         training-set size; for parameters, the best data size of each model; for compute, the \
         runs on the family's compute frontier. The joint law uses every run.\n"
    );
    let fits = matscale_scaling::report::markdown(analysis, plots);
    // Demote the fitter's headings under this report's "Fits".
    for line in fits.lines() {
        if line.starts_with("# ") {
            continue;
        }
        if line.starts_with('#') {
            let _ = writeln!(s, "#{line}");
        } else {
            let _ = writeln!(s, "{line}");
        }
    }
    s
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Inline Markdown: `code`, **bold**.
fn inline(text: &str) -> String {
    let mut out = String::new();
    let mut rest = escape(text);
    loop {
        let code = rest.find('`');
        let bold = rest.find("**");
        match (code, bold) {
            (Some(c), b) if b.is_none_or(|b| c < b) => {
                let Some(end) = rest[c + 1..].find('`') else {
                    out.push_str(&rest);
                    break;
                };
                out.push_str(&rest[..c]);
                let _ = write!(out, "<code>{}</code>", &rest[c + 1..c + 1 + end]);
                rest = rest[c + 2 + end..].to_string();
            }
            (_, Some(b)) => {
                let Some(end) = rest[b + 2..].find("**") else {
                    out.push_str(&rest);
                    break;
                };
                out.push_str(&rest[..b]);
                let _ = write!(out, "<strong>{}</strong>", &rest[b + 2..b + 2 + end]);
                rest = rest[b + 4 + end..].to_string();
            }
            _ => {
                out.push_str(&rest);
                break;
            }
        }
    }
    out
}

/// The report as one self-contained HTML page: the Markdown subset the report uses
/// (headings, paragraphs, lists, tables, images) with every plot embedded as inline SVG.
pub fn html(md: &str, dir: &Path) -> String {
    let mut body = String::new();
    let mut lines = md.lines().peekable();
    let mut para: Vec<String> = Vec::new();
    let flush = |para: &mut Vec<String>, body: &mut String| {
        if !para.is_empty() {
            let _ = writeln!(body, "<p>{}</p>", inline(&para.join(" ")));
            para.clear();
        }
    };
    while let Some(line) = lines.next() {
        let t = line.trim();
        if t.is_empty() {
            flush(&mut para, &mut body);
        } else if let Some(h) = t.strip_prefix('#') {
            flush(&mut para, &mut body);
            let level = 1 + h.chars().take_while(|&c| c == '#').count();
            let text = h.trim_start_matches('#').trim();
            let _ = writeln!(body, "<h{level}>{}</h{level}>", inline(text));
        } else if t.starts_with("![") {
            flush(&mut para, &mut body);
            let src = t
                .rsplit_once('(')
                .map(|(_, s)| s.trim_end_matches(')'))
                .unwrap_or("");
            let svg: PathBuf = dir.join(Path::new(src).with_extension("svg"));
            match std::fs::read_to_string(&svg) {
                Ok(text) => {
                    let start = text.find("<svg").unwrap_or(0);
                    let _ = writeln!(body, "<figure>{}</figure>", &text[start..]);
                }
                Err(_) => {
                    let _ = writeln!(body, "<p>(missing plot {})</p>", escape(src));
                }
            }
        } else if t.starts_with('|') {
            flush(&mut para, &mut body);
            let mut rows = vec![t.to_string()];
            while let Some(next) = lines.peek() {
                if next.trim().starts_with('|') {
                    rows.push(next.trim().to_string());
                    lines.next();
                } else {
                    break;
                }
            }
            let cells = |row: &str| -> Vec<String> {
                row.trim_matches('|')
                    .split('|')
                    .map(|c| inline(c.trim()))
                    .collect()
            };
            body.push_str("<table>\n");
            for (i, row) in rows.iter().enumerate() {
                if i == 1 && row.chars().all(|c| "|-: ".contains(c)) {
                    continue;
                }
                let tag = if i == 0 { "th" } else { "td" };
                body.push_str("<tr>");
                for c in cells(row) {
                    let _ = write!(body, "<{tag}>{c}</{tag}>");
                }
                body.push_str("</tr>\n");
            }
            body.push_str("</table>\n");
        } else if let Some(item) = t.strip_prefix("- ") {
            flush(&mut para, &mut body);
            body.push_str("<ul>\n");
            let _ = writeln!(body, "<li>{}</li>", inline(item));
            while let Some(next) = lines.peek() {
                if let Some(item) = next.trim().strip_prefix("- ") {
                    let _ = writeln!(body, "<li>{}</li>", inline(item));
                    lines.next();
                } else {
                    break;
                }
            }
            body.push_str("</ul>\n");
        } else {
            para.push(t.to_string());
        }
    }
    flush(&mut para, &mut body);
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>matscale sweep report</title>\n\
         <style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}\
         table{{border-collapse:collapse;font-size:0.85em}}td,th{{border:1px solid #ccc;padding:2px 6px}}\
         figure svg{{max-width:100%;height:auto}}code{{background:#f4f4f4}}</style></head>\n<body>\n{body}</body></html>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_has_tables_lists_headings_and_inline_markup() {
        let dir = std::env::temp_dir();
        let md = "# Title\n\nSome `code` and **bold** & <tags>.\n\n- one\n- two\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![missing.png](missing.png)\n";
        let h = html(md, &dir);
        assert!(h.contains("<h1>Title</h1>"));
        assert!(h.contains("<code>code</code>"));
        assert!(h.contains("<strong>bold</strong>"));
        assert!(h.contains("&amp; &lt;tags&gt;"));
        assert!(h.contains("<li>one</li>\n<li>two</li>"));
        assert!(h.contains("<tr><th>a</th><th>b</th></tr>\n<tr><td>1</td><td>2</td></tr>"));
        assert!(h.contains("missing plot"));
    }
}
