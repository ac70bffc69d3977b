//! `cargo xtask`: the matscale runner. One module per command.

mod bench;
mod ci;
mod data;
mod eval;
mod fit;
mod label;
mod neighbors;
mod train;

use clap::{Parser, Subcommand};

/// matscale: scaling laws for neural material models.
#[derive(Parser)]
#[command(name = "cargo xtask", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate, inspect and convert data sets.
    Data(data::DataArgs),
    /// Re-label structures with a reference potential (EMT).
    Label(label::LabelArgs),
    /// Periodic neighbour lists as JSON lines.
    Neighbors(neighbors::NeighborsArgs),
    /// Train one model on one data set (resumable).
    Train(train::TrainArgs),
    /// Evaluate a trained model on a data file.
    Eval(eval::EvalArgs),
    /// Fit scaling laws to a table of finished runs.
    Fit(fit::FitArgs),
    /// Run benchmarks (kernels, readers, neighbour lists, EMT).
    Bench(bench::BenchArgs),
    /// Run what CI runs: fmt, clippy and the tests.
    Ci(ci::CiArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Data(args) => data::run(args),
        Command::Label(args) => label::run(args),
        Command::Neighbors(args) => neighbors::run(args),
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Fit(args) => fit::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Ci(args) => ci::run(args),
    }
}
