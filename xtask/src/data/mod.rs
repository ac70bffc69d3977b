//! `cargo xtask data`: generate, inspect and convert data sets.

mod convert;
mod gen;
mod stats;

pub(crate) use stats::OrderArg;

/// Arguments of `cargo xtask data`.
#[derive(clap::Args)]
pub struct DataArgs {
    #[command(subcommand)]
    command: DataCommand,
}

#[derive(clap::Subcommand)]
enum DataCommand {
    /// Generate EMT-labelled random FCC alloy structures.
    Gen(gen::GenArgs),
    /// Print statistics of a data file: frames, elements, atoms per frame, labels.
    Stats(stats::StatsArgs),
    /// Convert between formats (extxyz, pymatgen JSON, ASE LMDB) by file extension.
    Convert(convert::ConvertArgs),
}

/// Runs `cargo xtask data`.
pub fn run(args: DataArgs) -> anyhow::Result<()> {
    match args.command {
        DataCommand::Gen(a) => gen::run(a),
        DataCommand::Stats(a) => stats::run(a),
        DataCommand::Convert(a) => convert::run(a),
    }
}
