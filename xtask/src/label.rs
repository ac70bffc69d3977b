//! `cargo xtask label`: re-label structures with a reference potential, streaming.

use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use matscale_structures::emt::Emt;
use matscale_structures::io::{self, WriteFramesError};
use matscale_structures::Structure;

/// Frames labelled (in parallel) between reads and writes.
const CHUNK: usize = 512;

/// The reference potentials `cargo xtask label` offers.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Potential {
    /// Effective medium theory, the port of ASE's EMT (Al, Cu, Ag, Au, Ni, Pd, Pt; H, C, N, O).
    Emt,
}

const ABOUT: &str = "\
Replaces energy, forces and stress of every structure. Reads any format matscale reads
(.extxyz/.xyz, pymatgen .json, .aselmdb) frame by frame, labels the frames in parallel in chunks
and writes them in order to OUTPUT (.extxyz, .xyz or .aselmdb by extension), keeping atoms, cell,
pbc and metadata. The output appears only once complete; a structure the potential cannot handle
(an element without EMT parameters, coinciding atoms) stops the run with an error naming the
frame.

Example: cargo xtask label --potential emt train.extxyz -o train_emt.extxyz";

/// Re-label structures with a reference potential.
#[derive(clap::Args)]
#[command(after_help = ABOUT)]
pub struct LabelArgs {
    /// The potential.
    #[arg(long, value_enum, default_value_t = Potential::Emt)]
    potential: Potential,
    /// Input file.
    input: PathBuf,
    /// Output file (.extxyz, .xyz or .aselmdb).
    #[arg(short, long)]
    output: PathBuf,
}

/// Runs `cargo xtask label`.
pub fn run(args: LabelArgs) -> anyhow::Result<()> {
    let Potential::Emt = args.potential;
    let emt = Emt::new();
    let mut reader = io::read_frames(&args.input)
        .with_context(|| format!("cannot read {}", args.input.display()))?;
    let bar = ProgressBar::new_spinner().with_style(
        ProgressStyle::with_template("{spinner} labelling: {pos} frames, {per_sec}, {elapsed}")
            .expect("the progress template is valid"),
    );
    let input = args.input.clone();
    let bar_in = bar.clone();
    let mut first_frame = 0usize;
    let mut done = false;
    let mut pending = Vec::new().into_iter();
    let frames = std::iter::from_fn(move || -> Option<anyhow::Result<Structure>> {
        if let Some(s) = pending.next() {
            bar_in.inc(1);
            return Some(Ok(s));
        }
        if done {
            return None;
        }
        let mut chunk = Vec::with_capacity(CHUNK);
        for frame in reader.by_ref().take(CHUNK) {
            match frame {
                Ok(s) => chunk.push(s),
                Err(e) => {
                    done = true;
                    return Some(Err(e.into()));
                }
            }
        }
        if chunk.len() < CHUNK {
            done = true;
        }
        if let Err(e) = emt.label_all(&mut chunk) {
            done = true;
            return Some(Err(anyhow::anyhow!(
                "{}, frame {}: {}",
                input.display(),
                first_frame + e.index,
                e.source
            )));
        }
        first_frame += chunk.len();
        pending = chunk.into_iter();
        let s = pending.next()?;
        bar_in.inc(1);
        Some(Ok(s))
    });
    let written = io::write_frames(&args.output, frames).map_err(|e| match e {
        WriteFramesError::Source(e) => e,
        WriteFramesError::Write(e) => anyhow::Error::from(e),
    })?;
    bar.finish_and_clear();
    eprintln!(
        "labelled {written} structures with EMT: {} -> {} in {:.1} s",
        args.input.display(),
        args.output.display(),
        bar.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use matscale_structures::generate::AlloyGenerator;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("matscale-xtask-label-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    #[test]
    fn relabels_every_frame_in_order() {
        let generator = AlloyGenerator::default().check().unwrap();
        let mut frames = generator.generate(0..5);
        // Stale labels must be replaced.
        frames[2].set_energy(123.0).unwrap();
        let input = scratch("in.extxyz");
        let output = scratch("out.extxyz");
        io::write_all(&input, &frames).unwrap();
        run(LabelArgs {
            potential: Potential::Emt,
            input,
            output: output.clone(),
        })
        .unwrap();
        let labelled = io::read_all(&output).unwrap();
        assert_eq!(labelled.len(), frames.len());
        let emt = Emt::new();
        for (s, original) in labelled.iter().zip(&frames) {
            assert_eq!(s.positions(), original.positions());
            let r = emt.calculate(original).unwrap();
            assert_eq!(s.energy(), Some(r.energy));
            assert_eq!(s.forces(), Some(r.forces.as_slice()));
        }
    }

    #[test]
    fn unsupported_element_names_the_frame() {
        let cell = [[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]];
        let cu = Structure::from_symbols(&["Cu"], vec![[0.0; 3]], cell, [true; 3]).unwrap();
        let fe = Structure::from_symbols(&["Cu", "Fe"], vec![[0.0; 3], [2.0; 3]], cell, [true; 3])
            .unwrap();
        let input = scratch("bad.extxyz");
        let output = scratch("bad_out.extxyz");
        io::write_all(&input, &[cu.clone(), cu, fe]).unwrap();
        let err = run(LabelArgs {
            potential: Potential::Emt,
            input,
            output: output.clone(),
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("frame 2") && err.contains("Fe"), "{err}");
        assert!(!output.exists(), "no output file after an error");
    }
}
