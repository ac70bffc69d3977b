//! Training and inference throughput (structures/s) on the CPU, measured the way PyG users
//! measure theirs: full optimiser steps on fixed batches of the mlearn Si training set.
//!
//! `RAYON_NUM_THREADS=2 cargo bench -p matscale-trainer --bench throughput [-- OPTIONS]`
//!
//! Options (all optional): `--structures S` structures per repetition (default 48, rounded
//! up to whole batches), `--reps R` timed repetitions (default 3), `--warmup W` untimed
//! batches before them (default 2), `--cases a,b,...` a subset of `schnet-conservative`,
//! `schnet-direct`, `transformer-direct` (default all three), `--phases a,b,...` a subset of
//! `train`, `infer`, `infer_frozen` (default all; `infer_frozen` only runs for
//! `schnet-conservative`).
//!
//! Setup, identical to `throughput_torch.py` (the PyG / PyTorch side):
//! * data: `tests/data/real/mlearn/Si/training.json` (214 structures), neighbour lists at
//!   5 Å computed once; structure `k` of the order is `(97·k) mod 214` (a fixed permutation
//!   both sides compute), batches of 8 in that order; all batches are moved to tensors
//!   before timing (data loading is not timed on either side);
//! * models: SchNet `study_medium` (H = F = 128, 6 interactions, 50 Gaussians, 5 Å), in
//!   conservative mode (forces = −∂E/∂r by autograd, a loss on them needs second
//!   derivatives) and in direct mode (the edge head); the Transformer `adit-d96-l3`
//!   (d 96, 1 head, 3 layers, dropout 0) in direct mode;
//! * a training step: forward, loss 2.5·energy-per-atom MAE + 20·force L2-MAE (stress weights
//!   0; the models still compute stress), backward, gradient clipping at global norm 1,
//!   AdamW (lr 1e-3, weight decay 1e-3); f32;
//! * inference: energies and forces of the same batches (conservative forces by autograd),
//!   no optimiser; for conservative SchNet also `infer_frozen`, the same with the weights
//!   loaded as plain tensors instead of `Var`s, so that the backward pass skips the weight
//!   gradients (what PyTorch's `autograd.grad(E, positions)` does).
//!
//! Each (case, phase) runs on its own thread with a freshly built model, so that candle's
//! per-thread switch for higher-order gradients is on only where a conservative model is
//! trained (as in `Trainer`); inference keeps candle's default (gradients detached).
//! Output: one JSON line per (case, phase) with every repetition's seconds and the best and
//! median structures/s; `throughput_compare.sh` runs this and the Python side back to back.

use std::collections::HashMap;
use std::error::Error;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use matscale_models::model::Normalizer;
use matscale_models::schnet::SchNetConfig;
use matscale_models::transformer::TransformerConfig;
use matscale_models::{seeded_var_builder, AtomisticModel, ForceMode, ModelConfig, ModelSpec};
use matscale_structures::batch::GraphOptions;
use matscale_trainer::data::DeviceBatch;
use matscale_trainer::loss::{loss, LossWeights};
use matscale_trainer::optim::{clip_by_global_norm, AdamW, AdamWConfig};
use matscale_trainer::source::{read_file, MlearnStressOrder};
use matscale_trainer::train::{fit_normalizer, sorted_vars};
use matscale_trainer::Dataset;

type BenchResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

const DATA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/data/real/mlearn/Si/training.json"
);
const BATCH: usize = 8;
const CUTOFF: f64 = 5.0;
const LR: f64 = 1e-3;
const SEED: u64 = 1024;

/// Command-line options.
struct Options {
    structures: usize,
    reps: usize,
    warmup: usize,
    cases: Vec<String>,
    phases: Vec<String>,
}

fn parse_options() -> BenchResult<Options> {
    let mut o = Options {
        structures: 48,
        reps: 3,
        warmup: 2,
        cases: ["schnet-conservative", "schnet-direct", "transformer-direct"]
            .map(String::from)
            .to_vec(),
        phases: ["train", "infer", "infer_frozen"]
            .map(String::from)
            .to_vec(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> BenchResult<String> {
            args.next()
                .ok_or_else(|| format!("{name} needs a value").into())
        };
        match a.as_str() {
            "--structures" => o.structures = value("--structures")?.parse()?,
            "--reps" => o.reps = value("--reps")?.parse()?,
            "--warmup" => o.warmup = value("--warmup")?.parse()?,
            "--cases" => o.cases = value("--cases")?.split(',').map(str::to_string).collect(),
            "--phases" => o.phases = value("--phases")?.split(',').map(str::to_string).collect(),
            // `cargo bench` passes `--bench`.
            "--bench" => {}
            // `cargo xtask bench --quick`: fewer structures and repetitions.
            "--quick" => {
                o.structures = o.structures.min(16);
                o.reps = 1;
            }
            other => return Err(format!("unknown option `{other}`").into()),
        }
    }
    if let Some(p) = o
        .phases
        .iter()
        .find(|p| !["train", "infer", "infer_frozen"].contains(&p.as_str()))
    {
        return Err(format!("unknown phase `{p}`").into());
    }
    if o.reps == 0 || o.structures == 0 {
        return Err("--reps and --structures must be positive".into());
    }
    Ok(o)
}

/// The case's model specification.
fn spec(case: &str) -> BenchResult<ModelSpec> {
    let (model, force_mode) = match case {
        "schnet-conservative" => (
            ModelConfig::Schnet(SchNetConfig::with_width(128, 6)),
            ForceMode::Conservative,
        ),
        "schnet-direct" => (
            ModelConfig::Schnet(SchNetConfig::with_width(128, 6)),
            ForceMode::Direct,
        ),
        "transformer-direct" => (
            ModelConfig::Transformer(TransformerConfig::adit(96, 1, 3)),
            ForceMode::Direct,
        ),
        other => return Err(format!("unknown case `{other}`").into()),
    };
    Ok(ModelSpec { model, force_mode })
}

/// Seconds of each timed repetition, as structures/s summary.
fn summary(seconds: &[f64], structures: usize) -> (f64, f64) {
    let mut rates: Vec<f64> = seconds.iter().map(|s| structures as f64 / s).collect();
    rates.sort_by(f64::total_cmp);
    let best = rates[rates.len() - 1];
    let n = rates.len();
    let median = if n % 2 == 1 {
        rates[n / 2]
    } else {
        0.5 * (rates[n / 2 - 1] + rates[n / 2])
    };
    (best, median)
}

fn run_case(case: &str, phase: &str, data: &Dataset, o: &Options) -> BenchResult<()> {
    let spec = spec(case)?;
    let device = Device::Cpu;
    let n = data.len();
    let order: Vec<usize> = (0..n).map(|k| (97 * k) % n).collect();
    let n_batches = o.structures.div_ceil(BATCH).min(n.div_ceil(BATCH));
    let batches = order
        .chunks(BATCH)
        .take(n_batches)
        .map(|idx| Ok(DeviceBatch::new(data.batch(idx)?, DType::F32, &device)?))
        .collect::<BenchResult<Vec<_>>>()?;
    let structures: usize = batches.iter().map(|b| b.host.n_structures()).sum();
    let atoms: usize = batches.iter().map(|b| b.host.n_nodes()).sum();
    let edges: usize = batches.iter().map(|b| b.host.n_edges()).sum();

    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, SEED, DType::F32, &device);
    let model = AtomisticModel::new(&spec, vb.clone(), vb)?;
    Normalizer::assign(&varmap, &fit_normalizer(data, spec.force_mode)?)?;
    // `infer_frozen`: the same weights as plain tensors, so that a conservative model's
    // backward pass computes gradients with respect to positions and strain only (with `Var`
    // weights candle differentiates every weight too).
    let model = if phase == "infer_frozen" {
        let frozen: HashMap<String, Tensor> = sorted_vars(&varmap)
            .into_iter()
            .map(|(name, var)| (name, var.as_tensor().detach()))
            .collect();
        let vb = VarBuilder::from_tensors(frozen, DType::F32, &device);
        AtomisticModel::new(&spec, vb.clone(), vb)?
    } else {
        model
    };
    let trained: Vec<_> = sorted_vars(&varmap)
        .into_iter()
        .filter(|(name, _)| !name.starts_with(Normalizer::PREFIX))
        .collect();
    let weights = LossWeights {
        stress_isotropic: 0.0,
        stress_deviatoric: 0.0,
        ..LossWeights::default()
    };
    let mut optimizer = AdamW::new(trained.clone(), AdamWConfig::default())?;

    let train_step = |optimizer: &mut AdamW, b: &DeviceBatch| -> BenchResult<f64> {
        let prediction = model.predict(&b.tensors, true)?;
        let terms = loss(&prediction, &b.labels, &weights)?;
        let grads = terms.total.backward()?;
        let mut list: Vec<Option<Tensor>> = trained
            .iter()
            .map(|(_, v)| grads.get(v.as_tensor()).map(Tensor::detach))
            .collect();
        clip_by_global_norm(&mut list, 1.0)?;
        optimizer.step(&list, LR)?;
        Ok(terms.total.to_dtype(DType::F64)?.to_scalar::<f64>()?)
    };
    let infer = |b: &DeviceBatch| -> BenchResult<()> {
        let p = model.predict(&b.tensors, false)?;
        // Reading the results back waits for them (a no-op on the CPU, kept for symmetry).
        let _ = (p.energy.sum_all()?.to_scalar::<f32>()?, p.forces.dims2()?);
        Ok(())
    };

    let report = |phase: &str, seconds: &[f64], extra: String| {
        let (best, median) = summary(seconds, structures);
        let secs: Vec<String> = seconds.iter().map(|s| format!("{s:.4}")).collect();
        println!(
            "{{\"impl\":\"matscale\",\"case\":\"{case}\",\"phase\":\"{phase}\",\
             \"parameters\":{},\"structures\":{structures},\"atoms\":{atoms},\
             \"edges\":{edges},\"batch\":{BATCH},\"threads\":{},\"seconds\":[{}],\
             \"best_structures_per_s\":{best:.3},\"median_structures_per_s\":{median:.3}{extra}}}",
            spec.n_parameters(),
            rayon::current_num_threads(),
            secs.join(",")
        );
    };

    if phase == "train" {
        let mut loss_first = f64::NAN;
        for k in 0..o.warmup {
            let l = train_step(&mut optimizer, &batches[k % batches.len()])?;
            if k == 0 {
                loss_first = l;
            }
        }
        let mut seconds = Vec::with_capacity(o.reps);
        let mut loss_last = f64::NAN;
        for _ in 0..o.reps {
            let t = Instant::now();
            for b in &batches {
                loss_last = train_step(&mut optimizer, b)?;
            }
            seconds.push(t.elapsed().as_secs_f64());
        }
        if !loss_last.is_finite() {
            return Err(format!("{case}: non-finite training loss").into());
        }
        report(
            "train",
            &seconds,
            format!(",\"loss_first\":{loss_first:.4},\"loss_last\":{loss_last:.4}"),
        );
        return Ok(());
    }
    for k in 0..o.warmup {
        infer(&batches[k % batches.len()])?;
    }
    let mut seconds = Vec::with_capacity(o.reps);
    for _ in 0..o.reps {
        let t = Instant::now();
        for b in &batches {
            infer(b)?;
        }
        seconds.push(t.elapsed().as_secs_f64());
    }
    report(phase, &seconds, String::new());
    Ok(())
}

fn main() -> BenchResult<()> {
    let o = parse_options()?;
    let structures = read_file(Path::new(DATA), MlearnStressOrder::Vasp)?;
    let data = Dataset::new(structures, GraphOptions::new(CUTOFF), DATA)?;
    for (case, phase) in o
        .cases
        .iter()
        .flat_map(|c| o.phases.iter().map(move |p| (c.as_str(), p.as_str())))
        // `infer_frozen` differs from `infer` only for conservative forces.
        .filter(|&(c, p)| p != "infer_frozen" || c == "schnet-conservative")
    {
        // Higher-order gradients only where a loss on conservative forces is trained.
        let conservative = phase == "train" && spec(case)?.force_mode == ForceMode::Conservative;
        // candle reads the higher-order-gradient switch once per thread, at the thread's first
        // backward pass: set it (or clear it) before starting the case's thread.
        if conservative {
            std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1");
        } else {
            std::env::remove_var("CANDLE_GRAD_DO_NOT_DETACH");
        }
        let handle = std::thread::scope(|s| {
            s.spawn(|| -> BenchResult<()> {
                if conservative {
                    matscale_models::enable_higher_order_gradients()?;
                }
                run_case(case, phase, &data, &o)
            })
            .join()
        });
        match handle {
            Ok(result) => result?,
            Err(_) => return Err(format!("{case}: the benchmark thread panicked").into()),
        }
    }
    Ok(())
}
