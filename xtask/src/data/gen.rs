//! `cargo xtask data gen`: EMT-labelled random fcc alloys (see `matscale_structures::generate`).

use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use matscale_structures::emt::Emt;
use matscale_structures::generate::AlloyGenerator;
use matscale_structures::io::{self, WriteFramesError};
use matscale_structures::Structure;

/// Structures generated (in parallel) between writes.
const CHUNK: u64 = 512;

const ABOUT: &str = "\
Each structure is a supercell of the 4-atom cubic fcc cell holding 2-4 of the EMT metals with a
random composition, at the Vegard's-law lattice constant (EMT equilibrium constants of the pure
metals), under a random symmetric strain and a Gaussian rattle, labelled with energy, forces and
stress by matscale's port of ASE's EMT. Structure i depends only on --seed and i, so the first n
structures of a larger set are the same structures. The output format follows the extension
(.extxyz, .xyz, .aselmdb); the file appears only once complete.

Example: cargo xtask data gen --n 1000 --seed 0 -o out.extxyz --supercell 2x2x2,3x3x3";

/// Generate random fcc alloys (2-4 of Al, Cu, Ag, Au, Ni, Pd, Pt) labelled with EMT.
#[derive(clap::Args)]
#[command(after_help = ABOUT)]
pub struct GenArgs {
    /// Number of structures.
    #[arg(long, default_value_t = 1000)]
    n: u64,
    /// Seed of the set.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output file (.extxyz, .xyz or .aselmdb).
    #[arg(short, long)]
    output: PathBuf,
    /// Element pool, comma-separated EMT metals [default: Al,Cu,Ag,Au,Ni,Pd,Pt].
    #[arg(long, value_delimiter = ',')]
    elements: Option<Vec<String>>,
    /// Fewest distinct elements per structure [default: 2].
    #[arg(long)]
    min_elements: Option<usize>,
    /// Most distinct elements per structure [default: 4].
    #[arg(long)]
    max_elements: Option<usize>,
    /// Supercells as repetitions of the 4-atom cubic cell, e.g. `2x2x2` (32 atoms); give several,
    /// comma-separated, to draw one per structure [default: 2x2x2].
    #[arg(long, value_delimiter = ',', value_parser = parse_supercell)]
    supercell: Option<Vec<[usize; 3]>>,
    /// Largest magnitude of each symmetric strain component [default: 0.03].
    #[arg(long)]
    max_strain: Option<f64>,
    /// Smallest standard deviation of the Gaussian rattle, Å [default: 0.05].
    #[arg(long)]
    rattle_min: Option<f64>,
    /// Largest standard deviation of the Gaussian rattle, Å (drawn uniformly per structure)
    /// [default: 0.1].
    #[arg(long)]
    rattle_max: Option<f64>,
}

fn parse_supercell(text: &str) -> Result<[usize; 3], String> {
    let parts: Vec<&str> = text.split('x').collect();
    let bad = || format!("expected a repetition like 2x2x2, got {text:?}");
    if parts.len() != 3 {
        return Err(bad());
    }
    let mut rep = [0; 3];
    for (r, p) in rep.iter_mut().zip(parts) {
        *r = p.trim().parse().map_err(|_| bad())?;
    }
    Ok(rep)
}

impl GenArgs {
    fn generator(&self) -> AlloyGenerator {
        let d = AlloyGenerator::default();
        AlloyGenerator {
            elements: self.elements.clone().unwrap_or(d.elements),
            min_elements: self.min_elements.unwrap_or(d.min_elements),
            max_elements: self.max_elements.unwrap_or(d.max_elements),
            supercells: self.supercell.clone().unwrap_or(d.supercells),
            max_strain: self.max_strain.unwrap_or(d.max_strain),
            rattle_std: [
                self.rattle_min.unwrap_or(d.rattle_std[0]),
                self.rattle_max.unwrap_or(d.rattle_std[1]),
            ],
            seed: self.seed,
        }
    }
}

/// Runs `cargo xtask data gen`.
pub fn run(args: GenArgs) -> anyhow::Result<()> {
    let generator = args
        .generator()
        .check()
        .context("invalid generator settings")?;
    let emt = Emt::new();
    let bar = ProgressBar::new(args.n).with_style(
        ProgressStyle::with_template(
            "{spinner} generating [{bar:40}] {pos}/{len} structures, {per_sec}, eta {eta}",
        )
        .expect("the progress template is valid")
        .progress_chars("=> "),
    );
    let n = args.n;
    let mut next = 0u64;
    let mut pending = Vec::new().into_iter();
    let bar_in = bar.clone();
    let frames = std::iter::from_fn(move || -> Option<anyhow::Result<Structure>> {
        if let Some(s) = pending.next() {
            bar_in.inc(1);
            return Some(Ok(s));
        }
        if next >= n {
            return None;
        }
        let end = (next + CHUNK).min(n);
        let chunk = match generator.generate_labelled(next..end, &emt) {
            Ok(chunk) => chunk,
            Err(e) => {
                let failed = next + e.index as u64;
                next = n;
                return Some(Err(anyhow::anyhow!("structure {failed}: {}", e.source)));
            }
        };
        next = end;
        pending = chunk.into_iter();
        bar_in.inc(1);
        pending.next().map(Ok)
    });
    let written = io::write_frames(&args.output, frames).map_err(|e| match e {
        WriteFramesError::Source(e) => e,
        WriteFramesError::Write(e) => anyhow::Error::from(e),
    })?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {written} EMT-labelled structures to {} in {:.1} s",
        args.output.display(),
        bar.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supercell_syntax() {
        assert_eq!(parse_supercell("2x3x4"), Ok([2, 3, 4]));
        assert!(parse_supercell("2x2").is_err());
        assert!(parse_supercell("2x2xa").unwrap_err().contains("2x2xa"));
    }

    #[test]
    fn unset_options_take_the_library_defaults() {
        let args = GenArgs {
            n: 3,
            seed: 9,
            output: "x.extxyz".into(),
            elements: None,
            min_elements: None,
            max_elements: Some(3),
            supercell: None,
            max_strain: None,
            rattle_min: None,
            rattle_max: None,
        };
        assert_eq!(
            args.generator(),
            AlloyGenerator {
                seed: 9,
                max_elements: 3,
                ..AlloyGenerator::default()
            }
        );
    }
}
