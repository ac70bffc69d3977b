//! `cargo xtask`: the matscale runner. One module per command.

mod bench;
mod bench_kernels;
mod ci;
mod cuda_env;
mod data;
mod eval;
mod fit;
mod label;
mod neighbors;
mod sweep;
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
    /// The scaling study: train a grid of runs, fit the laws, write the report (resumable).
    Sweep(sweep::SweepArgs),
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
    /// Install a CUDA 13.0 toolkit from NVIDIA's wheels and print the `export` lines for
    /// `--features cuda` builds (no GPU needed).
    CudaEnv(cuda_env::CudaEnvArgs),
}

fn main() -> anyhow::Result<()> {
    // Freed tensor buffers stay in the heap for reuse (no page faults and kernel zero-fills
    // on every step's fresh tensors); see the function's docs.
    matscale_equivariant::buffer::tune_allocator();
    let cli = Cli::parse();
    match cli.command {
        Command::Sweep(args) => sweep::run(args),
        Command::Data(args) => data::run(args),
        Command::Label(args) => label::run(args),
        Command::Neighbors(args) => neighbors::run(args),
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Fit(args) => fit::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Ci(args) => ci::run(args),
        Command::CudaEnv(args) => cuda_env::run(args),
    }
}
