//! `cargo xtask train`: train one model on one data set (see `matscale_trainer`).

use std::path::PathBuf;

use crate::data::OrderArg;
use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use matscale_models::{Family, ForceMode, ModelConfig};
use matscale_trainer::checkpoint::TrainState;
use matscale_trainer::run::RunConfig;
use matscale_trainer::{MetricsLine, Observer, Precision, Trainer};

const ABOUT: &str = "\
Trains a model with the study's recipe (loss 2.5·energy/atom + 20·force L2 + 5·isotropic stress
+ 5·deviatoric stress; AdamW, warm-up over 1% of the steps from 0.2×, cosine to 0.01×; gradient
clipping; early stopping), validating after every epoch. The run directory receives config.json,
metrics.jsonl (one JSON line per logging step and per epoch), checkpoint/ (weights, optimiser
state; written atomically), best.safetensors (best validation weights) and result.json.

Running the same command again on an existing run directory resumes it from its last checkpoint
(after a crash or kill -9); a finished run only rewrites result.json.

Data: --data FILE (.xyz/.extxyz, .json pymatgen/mlearn, .aselmdb) or --data emt (random fcc
alloys labelled with EMT, generated in memory). Without --val-data a fraction (--val-fraction)
is held out by a seeded shuffle; --data-fraction / --train-size pick a nested training subset.

Model: --model FAMILY with --size N (size ladder: about N parameters) or --preset NAME, or a
[model] section in --config. Flags override the config file.

Examples:
  cargo xtask train --model schnet --size 1e5 --data emt --epochs 20 --out runs/schnet-1e5
  cargo xtask train --model schnet --preset pyg-default --data tests/data/real/mlearn/Si/training.json \\
      --val-data tests/data/real/mlearn/Si/test.json --epochs 200 --out runs/si
  cargo xtask train --config configs/train/schnet-emt.toml --out runs/x
  cargo xtask train --model equiformer_v2 --preset study-03 --data emt --epochs 5 --out runs/eqv2";

/// Train a model on a data set.
#[derive(clap::Args)]
#[command(after_help = ABOUT)]
pub struct TrainArgs {
    /// Run configuration (TOML with `[model]`, `force_mode`, `[data]`, `[train]`); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Model family (fcn, transformer, schnet, equiformer_v2).
    #[arg(long)]
    model: Option<Family>,
    /// Target parameter count on the family's size ladder (e.g. 1e5).
    #[arg(long)]
    size: Option<f64>,
    /// Named preset of the family (`NAME` with --model, or `FAMILY/NAME` as --list-presets
    /// prints it).
    #[arg(long)]
    preset: Option<String>,
    /// List the model presets and their parameter counts, then exit.
    #[arg(long)]
    list_presets: bool,
    /// Training data: a file or `emt`.
    #[arg(long)]
    data: Option<String>,
    /// Structures to generate with `--data emt`.
    #[arg(long)]
    emt_structures: Option<u64>,
    /// A separate validation file.
    #[arg(long)]
    val_data: Option<PathBuf>,
    /// Fraction held out for validation when there is no --val-data [default: 0.1].
    #[arg(long)]
    val_fraction: Option<f64>,
    /// Fraction of the training pool to train on (nested subsets) [default: 1].
    #[arg(long)]
    data_fraction: Option<f64>,
    /// Absolute number of training structures (overrides --data-fraction).
    #[arg(long)]
    train_size: Option<usize>,
    /// Stress order of mlearn JSON files (Si: vasp; Mo, Cu, Ni: lammps).
    #[arg(long, value_enum)]
    mlearn_stress_order: Option<OrderArg>,
    /// Neighbour-list cutoff, Å [default: 5].
    #[arg(long)]
    cutoff: Option<f64>,
    /// Epochs [default: 50].
    #[arg(long)]
    epochs: Option<u64>,
    /// Structures per batch [default: 8].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Peak learning rate [default: 1e-3].
    #[arg(long)]
    max_lr: Option<f64>,
    /// f32, bf16, f16 (mixed, f32 master weights) or f64 [default: f32].
    #[arg(long)]
    precision: Option<Precision>,
    /// direct or conservative [default: direct].
    #[arg(long)]
    force_mode: Option<ForceMode>,
    /// Seed of initialisation, batch order and augmentation [default: 0].
    #[arg(long)]
    seed: Option<u64>,
    /// Early-stopping patience in epochs, 0 = off [default: 10].
    #[arg(long)]
    patience: Option<u64>,
    /// Gradient clipping norm, 0 = off [default: 1].
    #[arg(long)]
    grad_clip: Option<f64>,
    /// EMA decay of the weights, 0 = off [default: 0].
    #[arg(long)]
    ema_decay: Option<f64>,
    /// Random-rotation augmentation.
    #[arg(long)]
    augment: bool,
    /// Compute device: auto (CUDA in a `--features cuda` build with a GPU, else the CPU), cpu
    /// or cuda; an unavailable GPU falls back to the CPU with one message.
    #[arg(long, default_value = "auto")]
    device: matscale_equivariant::device::DeviceRequest,
    /// Checkpoint every this many steps as well as at epoch ends.
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Run directory.
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Print the resolved configuration and the model size, then exit.
    #[arg(long)]
    dry_run: bool,
}

/// Builds the run configuration from the file and the flags.
fn resolve(args: &TrainArgs) -> anyhow::Result<RunConfig> {
    let mut run = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            RunConfig::from_toml(&text, &path.display().to_string())?
        }
        None => RunConfig::default(),
    };
    // `--preset family/name`, as `--list-presets` prints them, also names the family.
    let (mut model, mut preset) = (args.model, args.preset.clone());
    if let Some((prefix, name)) = args.preset.as_deref().and_then(|p| p.split_once('/')) {
        let family: Family = prefix
            .parse()
            .with_context(|| format!("--preset {prefix}/{name}"))?;
        if let Some(m) = model.filter(|&m| m != family) {
            anyhow::bail!(
                "--preset {prefix}/{name} is a {} preset, but --model is {}",
                family.name(),
                m.name()
            );
        }
        model = Some(family);
        preset = Some(name.to_string());
    }
    if let Some(f) = model {
        if run.model.config.as_ref().is_some_and(|c| c.family() != f) {
            run.model.config = None;
        }
        run.model.family = Some(f);
    }
    if args.size.is_some() || preset.is_some() {
        run.model.config = None;
        run.model.size = args.size;
        run.model.preset = preset;
    }
    if run.model.family.is_none() && run.model.config.is_none() {
        anyhow::bail!("no model: give --model FAMILY (fcn, transformer, schnet, equiformer_v2) or a [model] section in --config");
    }
    let d = &mut run.data;
    if let Some(v) = &args.data {
        d.source = v.clone();
    }
    if let Some(v) = args.emt_structures {
        d.emt_structures = v;
    }
    if let Some(v) = &args.val_data {
        d.val_source = Some(v.clone());
    }
    if let Some(v) = args.val_fraction {
        d.val_fraction = v;
    }
    if let Some(v) = args.data_fraction {
        d.train_fraction = v;
        d.train_size = None;
    }
    if let Some(v) = args.train_size {
        d.train_size = Some(v);
    }
    if let Some(v) = args.mlearn_stress_order {
        d.mlearn_stress_order = v.into();
    }
    if let Some(v) = args.cutoff {
        d.cutoff = v;
    }
    let t = &mut run.train;
    macro_rules! set {
        ($($flag:ident => $field:ident),*) => {$(if let Some(v) = args.$flag { t.$field = v; })*};
    }
    set!(epochs => epochs, batch_size => batch_size, max_lr => max_lr, precision => precision,
         seed => seed, patience => patience, grad_clip => grad_clip, ema_decay => ema_decay,
         checkpoint_every => checkpoint_every);
    if args.augment {
        t.augment_rotations = true;
    }
    if let Some(m) = args.force_mode {
        run.force_mode = m;
    }
    Ok(run)
}

/// A progress bar with loss, learning rate and throughput; epoch summaries above it.
struct Progress {
    bar: ProgressBar,
}

impl Observer for Progress {
    fn on_step(&mut self, line: &MetricsLine, done: u64, total: u64) {
        self.bar.set_length(total);
        self.bar.set_position(done);
        if let MetricsLine::Step {
            loss,
            lr,
            structures_per_s,
            ..
        } = line
        {
            self.bar.set_message(format!(
                "loss {:.4}  lr {lr:.2e}  {structures_per_s:.1} structures/s",
                loss.total
            ));
        }
    }

    fn on_epoch(&mut self, line: &MetricsLine) {
        if let MetricsLine::Epoch {
            epoch,
            train_loss,
            val,
            best_val_loss,
            ..
        } = line
        {
            self.bar.println(format!(
                "epoch {epoch:>4}  train {train_loss:.4}  val {:.4} (best {best_val_loss:.4})  \
                 E {:.1} meV/atom  F {:.1} meV/Å  σ {:.2} meV/Å³",
                val.loss.total,
                val.energy_mae_mev_per_atom,
                val.force_mae_mev_per_angstrom,
                val.stress_mae_mev_per_angstrom3
            ));
        }
    }

    fn on_resume(&mut self, state: &TrainState) {
        self.bar.println(format!(
            "resuming from the checkpoint at step {} (epoch {}, batch {})",
            state.step, state.epoch, state.batch_in_epoch
        ));
    }
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    if args.list_presets {
        println!(
            "{:<32} {:>14}  {:>14}",
            "preset", "params (direct)", "(conservative)"
        );
        for (name, config) in ModelConfig::presets() {
            println!(
                "{name:<32} {:>14}  {:>14}",
                config.n_parameters(ForceMode::Direct),
                config.n_parameters(ForceMode::Conservative)
            );
        }
        return Ok(());
    }
    let run = resolve(&args)?;
    let spec = run.resolve()?;
    eprintln!(
        "model: {} ({} parameters, {} forces); data: {}; precision {}",
        spec.model.label(),
        spec.n_parameters(),
        spec.force_mode,
        run.data.source,
        run.train.precision
    );
    for note in run.advisories(&spec) {
        eprintln!("note: {note}");
    }
    if args.dry_run {
        println!(
            "{}",
            toml::to_string_pretty(&run).context("printing the configuration")?
        );
        println!(
            "# resolved model\n{}",
            serde_json::to_string_pretty(&spec.model)?
        );
        return Ok(());
    }
    let out = args
        .out
        .clone()
        .context("no run directory: give --out DIR")?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    matscale_trainer::checkpoint::write_json(&out.join("run.json"), &run)?;
    let data = run.data.load().context("loading the data")?;
    eprintln!(
        "training on {} structures (pool {}), validating on {}",
        data.train.len(),
        data.pool,
        data.val.len()
    );
    let trainer = Trainer::new(
        spec,
        run.train.clone(),
        data.train,
        data.val,
        &out,
        matscale_equivariant::device::select_device(args.device).device,
    )?;
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps [{elapsed} < {eta}] {msg}")
            .expect("the progress template is valid"),
    );
    let mut progress = Progress { bar };
    let result = trainer
        .run(&mut progress)
        .with_context(|| format!("training in {}", out.display()))?;
    progress.bar.finish_and_clear();
    let m = &result.best_val_metrics;
    println!(
        "{}: N = {} parameters, D = {} structures, {} epochs ({}), best val loss {:.5} at epoch {}",
        result.label,
        result.n_parameters,
        result.n_train,
        result.epochs,
        if result.stopped_early {
            "early stop"
        } else {
            "all"
        },
        result.best_val_loss,
        result.best_epoch
    );
    println!(
        "validation MAE: energy {:.2} meV/atom, forces {:.1} meV/Å, stress {:.3} meV/Å³; \
         {:.3e} training FLOPs in {:.1} s",
        m.energy_mae_mev_per_atom,
        m.force_mae_mev_per_angstrom,
        m.stress_mae_mev_per_angstrom3,
        result.training_flops,
        result.wall_time_s
    );
    println!("wrote {}", out.join("result.json").display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{resolve, TrainArgs};
    use matscale_models::Family;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: TrainArgs,
    }

    fn run(flags: &[&str]) -> anyhow::Result<matscale_trainer::run::RunConfig> {
        let cli = Cli::try_parse_from(std::iter::once("train").chain(flags.iter().copied()))?;
        resolve(&cli.args)
    }

    #[test]
    fn presets_may_carry_their_family() -> anyhow::Result<()> {
        let both = run(&["--model", "transformer", "--preset", "distance-d96-l3"])?;
        let prefixed = run(&["--preset", "transformer/distance-d96-l3"])?;
        for run in [&both, &prefixed] {
            assert_eq!(run.model.family, Some(Family::Transformer));
            assert_eq!(run.model.preset.as_deref(), Some("distance-d96-l3"));
        }
        let err = run(&[
            "--model",
            "schnet",
            "--preset",
            "transformer/distance-d96-l3",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("is a transformer preset, but --model is schnet"),
            "{err}"
        );
        let err = format!("{:#}", run(&["--preset", "foo/bar"]).unwrap_err());
        assert!(
            err.contains("--preset foo/bar") && err.contains("`foo`"),
            "{err}"
        );
        let err = run(&["--preset", "distance-d96-l3"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no model"), "{err}");
        Ok(())
    }
}
