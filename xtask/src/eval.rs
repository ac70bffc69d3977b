//! `cargo xtask eval`: evaluate a trained run on a data file.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::{DType, Device};
use matscale_structures::batch::GraphOptions;
use matscale_structures::io;
use matscale_structures::{InfoValue, PerAtomArray, PerAtomData};
use matscale_trainer::run::RunConfig;
use matscale_trainer::source::read_file;

use crate::data::OrderArg;
use matscale_trainer::{evaluate, load_model, Dataset};

const ABOUT: &str = "\
Loads the best weights of a run (best.safetensors, or the latest checkpoint with --latest),
predicts every structure of --data and prints the mean absolute errors (energy per atom in
meV/atom, force components in meV/Å, stress Voigt components in meV/Å^3). Writes eval.json and
predictions.extxyz (each frame with the predicted energy, forces and stress, and the reference
labels as REF_energy, REF_forces, REF_stress) into --out (default: the run directory).

Example: cargo xtask eval --checkpoint runs/si --data tests/data/real/mlearn/Si/test.json";

/// Evaluate a trained model on a data set.
#[derive(clap::Args)]
#[command(after_help = ABOUT)]
pub struct EvalArgs {
    /// The run directory of `cargo xtask train`.
    #[arg(long)]
    checkpoint: PathBuf,
    /// The data file.
    #[arg(long)]
    data: PathBuf,
    /// Output directory [default: the run directory].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Use the latest checkpoint instead of the best validation weights.
    #[arg(long)]
    latest: bool,
    /// Structures per batch.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Stress order of mlearn JSON files (Si: vasp; Mo, Cu, Ni: lammps).
    #[arg(long, value_enum, default_value_t = OrderArg::Vasp)]
    mlearn_stress_order: OrderArg,
    /// Compute device: auto, cpu or cuda (falls back to the CPU with one message).
    #[arg(long, default_value = "auto")]
    device: matscale_equivariant::device::DeviceRequest,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let order = args.mlearn_stress_order.into();
    let device: Device = matscale_equivariant::device::select_device(args.device).device;
    let (spec, config, model) = load_model(&args.checkpoint, args.latest, DType::F32, &device)
        .with_context(|| format!("loading the model of {}", args.checkpoint.display()))?;
    let structures = read_file(&args.data, order)?;
    let data = Dataset::new(
        structures,
        graph_of(&args.checkpoint)?,
        &args.data.display().to_string(),
    )?;
    let (metrics, predictions) = evaluate(&model, &data, args.batch_size, &config.loss, &device)?;
    println!(
        "{} on {} ({} structures)",
        spec.model.label(),
        args.data.display(),
        metrics.n_structures
    );
    println!(
        "  energy MAE  {:>10.3} meV/atom   (RMSE {:.3})",
        metrics.energy_mae_mev_per_atom, metrics.energy_rmse_mev_per_atom
    );
    println!(
        "  force MAE   {:>10.3} meV/Å      (RMSE {:.3}, L2 {:.3})",
        metrics.force_mae_mev_per_angstrom,
        metrics.force_rmse_mev_per_angstrom,
        metrics.force_l2_mae_mev_per_angstrom
    );
    println!(
        "  stress MAE  {:>10.4} meV/Å³",
        metrics.stress_mae_mev_per_angstrom3
    );
    println!("  study loss  {:>10.5}", metrics.loss.total);
    let out = args.out.unwrap_or_else(|| args.checkpoint.clone());
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    matscale_trainer::checkpoint::write_json(&out.join("eval.json"), &metrics)?;
    let frames: Vec<_> = data
        .structures()
        .iter()
        .zip(&predictions)
        .map(|(s, p)| -> anyhow::Result<_> {
            let mut f = s.clone();
            f.clear_labels();
            if let Some(e) = s.energy() {
                f.info_mut()
                    .insert("REF_energy".into(), InfoValue::Float(e));
            }
            if let Some(forces) = s.forces() {
                f.set_array(
                    "REF_forces",
                    PerAtomArray {
                        width: 3,
                        data: PerAtomData::Real(forces.iter().flatten().copied().collect()),
                    },
                )?;
            }
            if let Some(stress) = s.stress() {
                let voigt = [
                    stress[0][0],
                    stress[1][1],
                    stress[2][2],
                    stress[1][2],
                    stress[0][2],
                    stress[0][1],
                ];
                f.info_mut()
                    .insert("REF_stress".into(), InfoValue::FloatArray(voigt.to_vec()));
            }
            f.set_energy(p.energy)?;
            f.set_forces(p.forces.clone())?;
            if s.volume() > 0.0 {
                f.set_stress(p.stress)?;
            }
            Ok(f)
        })
        .collect::<anyhow::Result<_>>()?;
    let path = out.join("predictions.extxyz");
    io::write_all(&path, &frames).with_context(|| format!("writing {}", path.display()))?;
    println!(
        "wrote {} and {}",
        out.join("eval.json").display(),
        path.display()
    );
    Ok(())
}

/// The neighbour-list options the run was trained with (from its `run.json`).
fn graph_of(run_dir: &std::path::Path) -> anyhow::Result<GraphOptions> {
    let path = run_dir.join("run.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let run: RunConfig =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(run.data.graph())
}
