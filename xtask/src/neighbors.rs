//! `cargo xtask neighbors`: periodic neighbour lists of every frame of a file, as JSON lines.

use std::io::{BufWriter, ErrorKind, Write};
use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use matscale_structures::batch::GraphOptions;
use matscale_structures::io;

const ABOUT: &str = "\
Reads any format matscale reads (.extxyz/.xyz, pymatgen .json, .aselmdb) frame by frame and
prints one JSON object per pair and line:

  {\"frame\":0,\"i\":0,\"j\":1,\"shift\":[0,0,-1],\"distance\":2.5526}

with the pairs of ASE's neighbor_list('ijdDS', atoms, cutoff): full list (i->j and j->i),
strict distance < cutoff, D = pos[j] - pos[i] + shift.cell, sorted by frame, i, j, shift.
--vector adds \"vector\":[Dx,Dy,Dz] (Å). Distances are printed in the shortest form that reads
back to the same f64.

Examples:
  cargo xtask neighbors train.extxyz --cutoff 6
  cargo xtask neighbors train.extxyz --cutoff 12 --max-neighbors 20 -o graphs.jsonl";

/// Arguments of `cargo xtask neighbors`.
#[derive(clap::Args)]
#[command(after_help = ABOUT)]
pub struct NeighborsArgs {
    /// Input file (.extxyz, .xyz, pymatgen .json or .aselmdb).
    input: PathBuf,
    /// Cutoff radius, Å (pairs at exactly the cutoff are excluded).
    #[arg(long)]
    cutoff: f64,
    /// Keep at most K neighbours per atom: the nearest, ties broken by (distance, j, shift).
    #[arg(long, value_name = "K")]
    max_neighbors: Option<usize>,
    /// Also print the pair vector D (Å).
    #[arg(long)]
    vector: bool,
    /// Output file (JSON lines); standard output if absent.
    #[arg(short, long)]
    output: Option<PathBuf>,
}

/// Runs `cargo xtask neighbors`.
pub fn run(args: NeighborsArgs) -> anyhow::Result<()> {
    let options = GraphOptions {
        cutoff: args.cutoff,
        max_neighbors: args.max_neighbors,
        degeneracy_tolerance: None,
    };
    let frames = io::read_frames(&args.input)
        .with_context(|| format!("cannot read {}", args.input.display()))?;
    let sink: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        ),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut out = BufWriter::with_capacity(1 << 20, sink);
    let bar = ProgressBar::new_spinner().with_style(
        ProgressStyle::with_template(
            "{spinner} neighbours: {pos} frames, {msg} {per_sec}, {elapsed}",
        )
        .expect("the progress template is valid"),
    );
    let mut pairs_total = 0usize;
    let result = (|| -> anyhow::Result<()> {
        for (k, frame) in frames.enumerate() {
            let structure = frame?;
            let list = options
                .neighbor_list(&structure)
                .with_context(|| format!("{}: frame {k}", args.input.display()))?;
            for p in 0..list.len() {
                let s = list.shifts()[p];
                write!(
                    out,
                    "{{\"frame\":{k},\"i\":{},\"j\":{},\"shift\":[{},{},{}],\"distance\":{}",
                    list.first()[p],
                    list.second()[p],
                    s[0],
                    s[1],
                    s[2],
                    list.distances()[p]
                )?;
                if args.vector {
                    let v = list.vectors()[p];
                    write!(out, ",\"vector\":[{},{},{}]", v[0], v[1], v[2])?;
                }
                out.write_all(b"}\n")?;
            }
            pairs_total += list.len();
            bar.set_message(format!("{pairs_total} pairs,"));
            bar.inc(1);
        }
        out.flush()?;
        Ok(())
    })();
    bar.finish_and_clear();
    match result {
        // A closed pipe (`| head`) is a normal way for a reader to stop.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == ErrorKind::BrokenPipe) =>
        {
            Ok(())
        }
        other => other,
    }
}
