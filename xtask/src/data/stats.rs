//! `cargo xtask data stats`: what a data file holds (frames, elements, sizes, label statistics).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use matscale_structures::io::{Format, Frames};
use matscale_structures::pymatgen::{self, StressOrder};
use matscale_structures::units::EV_PER_A3_IN_GPA;
use matscale_structures::{aselmdb, elements, extxyz, Structure};
use serde::Serialize;

const ABOUT: &str = "\
Reads the file frame by frame (streaming: any size works) and prints the number of frames, the
elements with their atom and frame counts, atoms per frame, and label statistics: total energy
per atom (eV/atom), force components (RMS and largest |F|, eV/Å) and stress (eV/Å^3 and GPa,
ASE sign: compressed cells are negative). The format follows the extension: .xyz/.extxyz,
.json (pymatgen: mlearn, MPtrj, Alexandria), .aselmdb/.lmdb.

Example: cargo xtask data stats tests/data/real/mlearn/Si/training.json --json";

/// Statistics of a data file: frames, elements, atoms per frame, labels.
#[derive(clap::Args)]
#[command(after_help = ABOUT)]
pub struct StatsArgs {
    /// The data file (.xyz, .extxyz, .json, .aselmdb, .lmdb).
    file: PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Component order of mlearn's 6-value `virial_stress` (mlearn Si: vasp; Mo, Cu, Ni: lammps).
    #[arg(long, value_enum, default_value_t = OrderArg::Vasp)]
    mlearn_stress_order: OrderArg,
}

/// The `--mlearn-stress-order` values.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum OrderArg {
    /// xx yy zz xy yz zx (VASP).
    Vasp,
    /// xx yy zz xy xz yz (LAMMPS).
    Lammps,
    /// xx yy zz yz xz xy (ASE Voigt).
    Voigt,
}

impl From<OrderArg> for matscale_trainer::source::MlearnStressOrder {
    fn from(o: OrderArg) -> Self {
        use matscale_trainer::source::MlearnStressOrder as M;
        match o {
            OrderArg::Vasp => M::Vasp,
            OrderArg::Lammps => M::Lammps,
            OrderArg::Voigt => M::Voigt,
        }
    }
}

impl From<OrderArg> for StressOrder {
    fn from(o: OrderArg) -> Self {
        match o {
            OrderArg::Vasp => StressOrder::Vasp,
            OrderArg::Lammps => StressOrder::Lammps,
            OrderArg::Voigt => StressOrder::Voigt,
        }
    }
}

/// Counts the bytes read through it (for progress bars).
struct CountingRead<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for CountingRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// An input opened for streaming, with its progress bar.
pub(super) struct Input {
    /// The frames.
    pub frames: Frames,
    /// The progress bar.
    pub progress: Progress,
}

/// A progress bar over bytes (text formats) or rows (LMDB), drawn only on a terminal.
pub(super) struct Progress {
    /// The bar.
    pub bar: ProgressBar,
    /// Bytes read so far, for text formats.
    bytes: Option<Arc<AtomicU64>>,
}

impl Progress {
    /// Updates the bar after a frame.
    pub fn tick(&self) {
        match &self.bytes {
            Some(b) => self.bar.set_position(b.load(Ordering::Relaxed)),
            None => self.bar.inc(1),
        }
    }
}

/// Opens `path` for streaming with a progress bar (drawn only on a terminal).
pub(super) fn open_input(path: &Path, order: StressOrder) -> anyhow::Result<Input> {
    let format = Format::from_path(path).with_context(|| {
        format!(
            "{}: unknown format (expected .xyz, .extxyz, .json, .aselmdb or .lmdb)",
            path.display()
        )
    })?;
    let style = |template: &str| {
        ProgressStyle::with_template(template)
            .expect("the progress template is valid")
            .progress_chars("=> ")
    };
    if format == Format::AseLmdb {
        let reader =
            aselmdb::read_path(path).with_context(|| format!("opening {}", path.display()))?;
        let bar = ProgressBar::new(reader.len() as u64)
            .with_style(style("{bar:40} {pos}/{len} rows [{elapsed} < {eta}]"));
        return Ok(Input {
            frames: Frames::new(reader),
            progress: Progress { bar, bytes: None },
        });
    }
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let count = Arc::new(AtomicU64::new(0));
    let src = CountingRead {
        inner: file,
        count: Arc::clone(&count),
    };
    let frames = match format {
        Format::ExtXyz => Frames::new(extxyz::Reader::new(src, path)),
        Format::PymatgenJson => Frames::new(
            pymatgen::read_reader(
                src,
                path,
                pymatgen::Options {
                    mlearn_stress_order: order,
                },
            )
            .with_context(|| format!("opening {}", path.display()))?,
        ),
        Format::AseLmdb => unreachable!("handled above"),
    };
    let bar = ProgressBar::new(len)
        .with_style(style("{bar:40} {bytes}/{total_bytes} [{elapsed} < {eta}]"));
    Ok(Input {
        frames,
        progress: Progress {
            bar,
            bytes: Some(count),
        },
    })
}

/// Running mean, standard deviation, minimum and maximum (Welford).
#[derive(Debug, Default, Clone, Serialize)]
struct Summary {
    count: u64,
    mean: f64,
    std: f64,
    min: f64,
    max: f64,
    #[serde(skip)]
    m2: f64,
}

impl Summary {
    fn add(&mut self, x: f64) {
        if self.count == 0 {
            self.min = x;
            self.max = x;
        }
        self.count += 1;
        let d = x - self.mean;
        self.mean += d / self.count as f64;
        self.m2 += d * (x - self.mean);
        self.std = if self.count > 1 {
            (self.m2 / (self.count - 1) as f64).sqrt()
        } else {
            0.0
        };
        self.min = self.min.min(x);
        self.max = self.max.max(x);
    }
}

#[derive(Debug, Default, Serialize)]
struct ElementStats {
    atoms: u64,
    frames: u64,
}

#[derive(Debug, Default, Serialize)]
struct Stats {
    file: String,
    frames: u64,
    atoms: u64,
    periodic_frames: u64,
    elements: BTreeMap<String, ElementStats>,
    atoms_per_frame: Summary,
    frames_with_energy: u64,
    energy_per_atom_ev: Summary,
    frames_with_forces: u64,
    force_component_rms_ev_per_a: f64,
    force_max_norm_ev_per_a: f64,
    /// Largest |Σ_i F_i| component over frames (zero for DFT forces).
    max_net_force_ev_per_a: f64,
    frames_with_stress: u64,
    stress_component_ev_per_a3: Summary,
    pressure_gpa: Summary,
    #[serde(skip)]
    force_sq_sum: f64,
    #[serde(skip)]
    force_components: u64,
}

impl Stats {
    fn add(&mut self, s: &Structure) {
        self.frames += 1;
        self.atoms += s.len() as u64;
        if s.pbc().iter().any(|&p| p) {
            self.periodic_frames += 1;
        }
        self.atoms_per_frame.add(s.len() as f64);
        let mut seen = [false; 256];
        for &z in s.numbers() {
            let e = self
                .elements
                .entry(elements::symbol(z).unwrap_or("X").to_string())
                .or_default();
            e.atoms += 1;
            if !seen[z as usize] {
                seen[z as usize] = true;
                e.frames += 1;
            }
        }
        if let (Some(e), false) = (s.energy(), s.is_empty()) {
            self.frames_with_energy += 1;
            self.energy_per_atom_ev.add(e / s.len() as f64);
        }
        if let Some(forces) = s.forces() {
            self.frames_with_forces += 1;
            let mut net = [0.0f64; 3];
            for f in forces {
                let sq = f[0] * f[0] + f[1] * f[1] + f[2] * f[2];
                self.force_sq_sum += sq;
                self.force_components += 3;
                self.force_max_norm_ev_per_a = self.force_max_norm_ev_per_a.max(sq.sqrt());
                for k in 0..3 {
                    net[k] += f[k];
                }
            }
            for x in net {
                self.max_net_force_ev_per_a = self.max_net_force_ev_per_a.max(x.abs());
            }
        }
        if let Some(st) = s.stress() {
            self.frames_with_stress += 1;
            for x in st.iter().flatten() {
                self.stress_component_ev_per_a3.add(*x);
            }
            let p = -(st[0][0] + st[1][1] + st[2][2]) / 3.0;
            self.pressure_gpa.add(p * EV_PER_A3_IN_GPA);
        }
    }

    fn finish(&mut self) {
        if self.force_components > 0 {
            self.force_component_rms_ev_per_a =
                (self.force_sq_sum / self.force_components as f64).sqrt();
        }
    }

    fn print_table(&self) {
        println!("file               {}", self.file);
        println!(
            "frames             {} ({} periodic), {} atoms",
            self.frames, self.periodic_frames, self.atoms
        );
        let a = &self.atoms_per_frame;
        println!(
            "atoms per frame    min {} / mean {:.2} / max {}",
            a.min, a.mean, a.max
        );
        println!("elements           (atoms, frames containing it)");
        for (el, e) in &self.elements {
            println!("  {el:<3} {:>12} {:>10}", e.atoms, e.frames);
        }
        let e = &self.energy_per_atom_ev;
        if self.frames_with_energy > 0 {
            println!(
                "energy/atom (eV)   {} frames: mean {:.6} std {:.6} min {:.6} max {:.6}",
                self.frames_with_energy, e.mean, e.std, e.min, e.max
            );
        } else {
            println!("energy             none");
        }
        if self.frames_with_forces > 0 {
            println!(
                "forces (eV/Å)      {} frames: component RMS {:.6}, max |F| {:.6}, max |ΣF| {:.2e}",
                self.frames_with_forces,
                self.force_component_rms_ev_per_a,
                self.force_max_norm_ev_per_a,
                self.max_net_force_ev_per_a
            );
        } else {
            println!("forces             none");
        }
        if self.frames_with_stress > 0 {
            let s = &self.stress_component_ev_per_a3;
            let p = &self.pressure_gpa;
            println!(
                "stress (eV/Å^3)    {} frames: components min {:.6} max {:.6}; pressure (GPa) mean {:.3} min {:.3} max {:.3}",
                self.frames_with_stress, s.min, s.max, p.mean, p.min, p.max
            );
        } else {
            println!("stress             none");
        }
    }
}

/// Runs `cargo xtask data stats`.
pub fn run(args: StatsArgs) -> anyhow::Result<()> {
    let Input { frames, progress } = open_input(&args.file, args.mlearn_stress_order.into())?;
    let mut stats = Stats {
        file: args.file.display().to_string(),
        ..Stats::default()
    };
    for frame in frames {
        let s = frame.with_context(|| format!("reading {}", args.file.display()))?;
        stats.add(&s);
        progress.tick();
    }
    progress.bar.finish_and_clear();
    stats.finish();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
    } else {
        stats.print_table();
    }
    Ok(())
}
