//! `cargo xtask data convert`: convert between extxyz, pymatgen JSON and ASE LMDB.

use std::path::PathBuf;

use anyhow::Context;
use matscale_structures::io::{self, WriteFramesError};

use super::stats::{open_input, Input, OrderArg};

const ABOUT: &str = "\
Streams the input frame by frame into the output; formats follow the extensions. Inputs: .xyz,
.extxyz, .json (pymatgen: mlearn rows, MPtrj, Alexandria entries, Structure dicts), .aselmdb,
.lmdb. Outputs: .xyz/.extxyz (full-precision floats: ase.io.read gets the same numbers back) or
.aselmdb/.lmdb (ASE database rows, as fairchem's LMDBDatabase stores them). Units and signs are
converted to ASE's on reading (kBar with the VASP sign becomes eV/Å^3 with the ASE sign). The
output appears only once complete: an interrupted run leaves no partial file.

Example: cargo xtask data convert tests/data/real/mlearn/Mo/test.json --mlearn-stress-order lammps -o mo.extxyz";

/// Convert a data file to another format (chosen by the output extension).
#[derive(clap::Args)]
#[command(after_help = ABOUT)]
pub struct ConvertArgs {
    /// Input file (.xyz, .extxyz, .json, .aselmdb, .lmdb).
    input: PathBuf,
    /// Output file (.xyz, .extxyz, .aselmdb, .lmdb).
    #[arg(short, long)]
    output: PathBuf,
    /// Component order of mlearn's 6-value `virial_stress` (mlearn Si: vasp; Mo, Cu, Ni: lammps).
    #[arg(long, value_enum, default_value_t = OrderArg::Vasp)]
    mlearn_stress_order: OrderArg,
}

/// Runs `cargo xtask data convert`.
pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    let Input { frames, progress } = open_input(&args.input, args.mlearn_stress_order.into())?;
    let frames = frames.inspect(|_| progress.tick());
    let n = match io::write_frames(&args.output, frames) {
        Ok(n) => n,
        Err(WriteFramesError::Source(e)) => {
            return Err(e).with_context(|| format!("reading {}", args.input.display()))
        }
        Err(WriteFramesError::Write(e)) => {
            return Err(e).with_context(|| format!("writing {}", args.output.display()))
        }
    };
    progress.bar.finish_and_clear();
    eprintln!(
        "wrote {n} frames from {} to {}",
        args.input.display(),
        args.output.display()
    );
    Ok(())
}
