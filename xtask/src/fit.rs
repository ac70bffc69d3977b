//! `cargo xtask fit`: scaling laws with intervals, frontier, plots and a report.

use std::path::PathBuf;

use anyhow::Context;
use clap::ValueEnum;
use matscale_scaling::analysis::{analyse, AnalysisOptions, XVar};
use matscale_scaling::bootstrap::BootstrapOptions;
use matscale_scaling::chinchilla::RefitStarts;
use matscale_scaling::power_law::{Objective, SingleLaw};
use matscale_scaling::report::{terminal_table, write_outputs};
use matscale_scaling::{RunsTable, TableFormat};

/// Which variable to fit against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum XArg {
    /// Training-set size D.
    Data,
    /// Training-set size in atoms.
    Atoms,
    /// Parameter count N.
    Params,
    /// Training compute C.
    Compute,
    /// The joint law L(N, D) only.
    Joint,
    /// data, params and compute, and the joint law.
    All,
}

/// Which laws to fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LawArg {
    /// L = a·x^-b.
    Power,
    /// L = E + a·x^-b.
    #[value(name = "power+e")]
    PowerE,
    /// L = E + A/N^α + B/D^β (Chinchilla approach 3).
    Chinchilla,
    /// All of them.
    All,
}

/// How runs are grouped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GroupArg {
    /// One fit per model family.
    Model,
    /// All runs together.
    None,
}

/// Input format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// Native CSV (docs/RUNS_TABLE.md).
    Csv,
    /// Native JSON lines.
    Jsonl,
    /// Besiroglu et al.'s Chinchilla extraction (Model Size, Training FLOP, loss).
    Chinchilla,
}

/// Objective of single-variable fits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ObjectiveArg {
    /// Least squares of ln L (default).
    Log,
    /// Least squares of L (scipy curve_fit on raw losses, as the study did).
    Linear,
}

/// Starts of the joint bootstrap refits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RefitArg {
    /// The full-data optimum only.
    Optimum,
    /// The optimum and 32 nearby corners.
    Local,
    /// The full initialisation grid (slow).
    Grid,
}

/// Arguments of `cargo xtask fit`.
#[derive(clap::Args)]
pub struct FitArgs {
    /// Runs table: CSV, JSON lines, or the Chinchilla extraction.
    #[arg(long)]
    input: PathBuf,
    /// Input format (detected from the extension and header when absent).
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// Independent variable.
    #[arg(long, value_enum, default_value = "all")]
    x: XArg,
    /// Grouping of runs.
    #[arg(long, value_enum, default_value = "model")]
    group: GroupArg,
    /// Laws to fit.
    #[arg(long, value_enum, default_value = "all")]
    law: LawArg,
    /// Objective of single-variable fits.
    #[arg(long, value_enum, default_value = "log")]
    objective: ObjectiveArg,
    /// Bootstrap resamples (0: no intervals).
    #[arg(long, default_value_t = 1000)]
    bootstrap: usize,
    /// Seed of the bootstrap.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Drop the K highest-loss runs first (Besiroglu et al. drop 5 Chinchilla points).
    #[arg(long, default_value_t = 0)]
    exclude_top_loss: usize,
    /// Single-variable fits keep only the lowest loss at each distinct x
    /// (the best model at that size, as the study did).
    #[arg(long)]
    envelope: bool,
    /// Starts of the joint bootstrap refits.
    #[arg(long, value_enum, default_value = "optimum")]
    refit_starts: RefitArg,
    /// Output folder for fits.json, report.md and the plots.
    #[arg(long)]
    out: PathBuf,
    /// Print fits.json to stdout instead of the table.
    #[arg(long)]
    json: bool,
}

/// Runs `cargo xtask fit`.
pub fn run(args: FitArgs) -> anyhow::Result<()> {
    let format = args.format.map(|f| match f {
        FormatArg::Csv => TableFormat::Csv,
        FormatArg::Jsonl => TableFormat::Jsonl,
        FormatArg::Chinchilla => TableFormat::Chinchilla,
    });
    let table = RunsTable::read(&args.input, format)
        .with_context(|| format!("reading the runs table {}", args.input.display()))?;
    let xs = match args.x {
        XArg::Data => vec![XVar::Data],
        XArg::Atoms => vec![XVar::Atoms],
        XArg::Params => vec![XVar::Params],
        XArg::Compute => vec![XVar::Compute],
        XArg::Joint => vec![],
        XArg::All => vec![XVar::Data, XVar::Params, XVar::Compute],
    };
    let laws = match args.law {
        LawArg::Power => vec![SingleLaw::Power],
        LawArg::PowerE => vec![SingleLaw::PowerWithOffset],
        LawArg::Chinchilla => vec![],
        LawArg::All => vec![SingleLaw::Power, SingleLaw::PowerWithOffset],
    };
    let joint = matches!(args.x, XArg::Joint | XArg::All)
        && matches!(args.law, LawArg::Chinchilla | LawArg::All);
    let options = AnalysisOptions {
        xs: if laws.is_empty() { vec![] } else { xs },
        laws,
        objective: match args.objective {
            ObjectiveArg::Log => Objective::Log,
            ObjectiveArg::Linear => Objective::Linear,
        },
        joint,
        group_by_model: args.group == GroupArg::Model,
        bootstrap: BootstrapOptions {
            resamples: args.bootstrap,
            seed: args.seed,
            level: 0.95,
        },
        refit_starts: match args.refit_starts {
            RefitArg::Optimum => RefitStarts::Optimum,
            RefitArg::Local => RefitStarts::Local,
            RefitArg::Grid => RefitStarts::Grid,
        },
        exclude_top_loss: args.exclude_top_loss,
        envelope: args.envelope,
        ..AnalysisOptions::default()
    };
    if options.xs.is_empty() && !options.joint {
        anyhow::bail!("--x {:?} with --law {:?} asks for no fit", args.x, args.law);
    }
    let start = std::time::Instant::now();
    let analysis = analyse(&table, &options).context("fitting")?;
    let elapsed = start.elapsed();
    let written = write_outputs(&analysis, &args.out)
        .with_context(|| format!("writing the report to {}", args.out.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&analysis)?);
    } else {
        print!("{}", terminal_table(&analysis));
        println!(
            "fitted in {:.2} s; wrote {} files to {} (report.md, fits.json, plots)",
            elapsed.as_secs_f64(),
            written.len(),
            args.out.display()
        );
    }
    Ok(())
}
