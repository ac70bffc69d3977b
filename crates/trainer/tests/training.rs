//! End-to-end checks of the training loop on tiny EMT data sets: every family overfits,
//! resumption after an interruption is bit-identical, mixed precision and conservative forces
//! train, a diverging run stops with its last checkpoint intact.

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use common::alloys;
use matscale_models::{Family, ForceMode, ModelConfig, ModelSpec};
use matscale_structures::Structure;
use matscale_trainer::checkpoint;
use matscale_trainer::source::DataConfig;
use matscale_trainer::train::fit_normalizer;
use matscale_trainer::{
    evaluate, Dataset, Observer, Precision, Silent, TrainConfig, TrainError, Trainer,
};

fn dataset(structures: Vec<Structure>) -> Dataset {
    Dataset::new(structures, DataConfig::default().graph(), "test").unwrap()
}

fn spec(family: Family, params: usize, mode: ForceMode) -> ModelSpec {
    ModelSpec {
        model: ModelConfig::for_parameters(family, params, mode).unwrap(),
        force_mode: mode,
    }
}

fn quick_config(epochs: u64) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 4,
        max_lr: 3e-3,
        patience: 0,
        log_every: 1,
        ..Default::default()
    }
}

/// The study's loss of the run's best weights on `data`.
fn loss_on(run: &Path, data: &Dataset) -> f64 {
    let (_, config, model) =
        matscale_trainer::load_model(run, false, DType::F32, &Device::Cpu).unwrap();
    evaluate(&model, data, 8, &config.loss, &Device::Cpu)
        .unwrap()
        .0
        .loss
        .total
}

#[test]
fn every_family_overfits_a_tiny_data_set() {
    let train = alloys(4, 1);
    // EquiformerV2 is left out until its CPU speed work (issue 8): at its smallest ladder size
    // the same 300 steps take over two minutes here.
    for family in Family::ALL
        .into_iter()
        .filter(|f| *f != Family::EquiformerV2)
    {
        let dir = tempfile::tempdir().unwrap();
        // Large enough to memorise 16 atoms; the one-body FCN needs the most width.
        let params = match family {
            Family::Fcn => 20_000,
            Family::Transformer => 10_000,
            Family::Schnet => 3_000,
            Family::EquiformerV2 => unreachable!("filtered out above"),
        };
        let spec = spec(family, params, ForceMode::Direct);
        // Validate on the training set itself: the best validation loss is the fit quality.
        let trainer = Trainer::new(
            spec,
            TrainConfig {
                max_lr: 1e-2,
                grad_clip: 10.0,
                ..quick_config(300)
            },
            dataset(train.clone()),
            dataset(train.clone()),
            dir.path(),
            Device::Cpu,
        )
        .unwrap();
        let result = trainer.run(&mut Silent).unwrap();
        let first_epoch_loss = first_val_loss(dir.path());
        assert!(
            result.best_val_loss < 0.02 * first_epoch_loss,
            "{family}: best {} vs first {first_epoch_loss}",
            result.best_val_loss
        );
    }
}

fn first_val_loss(run: &Path) -> f64 {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["kind"] == "epoch" {
            return v["val"]["loss"]["total"].as_f64().unwrap();
        }
    }
    panic!("no epoch line in metrics.jsonl");
}

/// Stops the run (like `kill -9`: no checkpoint is written) after `at` steps.
struct StopAt {
    at: u64,
    steps: u64,
}

impl Observer for StopAt {
    fn on_step(&mut self, _: &matscale_trainer::MetricsLine, done: u64, _: u64) {
        self.steps = done;
    }
    fn should_stop(&mut self) -> bool {
        self.steps >= self.at
    }
}

fn tensors_bytes(path: &Path) -> Vec<(String, Vec<u8>)> {
    let map = checkpoint::load_tensors(path, &Device::Cpu).unwrap();
    map.into_iter()
        .map(|(k, t)| {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            (k, v.iter().flat_map(|x| x.to_le_bytes()).collect())
        })
        .collect()
}

#[test]
fn a_resumed_run_is_bit_identical_to_an_uninterrupted_one() {
    let train = dataset(alloys(10, 2));
    let val = dataset(alloys(4, 3));
    let config = TrainConfig {
        checkpoint_every: 2,
        ema_decay: 0.9,
        augment_rotations: true,
        ..quick_config(3)
    };
    let spec = spec(Family::Schnet, 5_000, ForceMode::Direct);
    let whole = tempfile::tempdir().unwrap();
    let a = Trainer::new(
        spec.clone(),
        config.clone(),
        train.clone(),
        val.clone(),
        whole.path(),
        Device::Cpu,
    )
    .unwrap()
    .run(&mut Silent)
    .unwrap();

    let broken = tempfile::tempdir().unwrap();
    let trainer = Trainer::new(spec, config, train, val, broken.path(), Device::Cpu).unwrap();
    // Interrupt mid-epoch (step 5: after the checkpoint of step 4) and at an epoch boundary.
    for at in [5, 6] {
        let err = trainer.run(&mut StopAt { at, steps: 0 }).unwrap_err();
        assert!(matches!(err, TrainError::Interrupted { .. }), "{err}");
    }
    let b = trainer.run(&mut Silent).unwrap();
    assert_eq!(a.steps, b.steps);
    assert_eq!(a.best_val_loss.to_bits(), b.best_val_loss.to_bits());
    assert_eq!(a.training_flops, b.training_flops);
    assert_eq!(
        tensors_bytes(&whole.path().join("best.safetensors")),
        tensors_bytes(&broken.path().join("best.safetensors"))
    );
    let ck = |p: &Path| {
        let dir = checkpoint::checkpoint_dir(p);
        let name = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_string_lossy().contains("weights-"))
            .unwrap();
        tensors_bytes(&name)
    };
    assert_eq!(ck(whole.path()), ck(broken.path()));
    // The metrics log has no duplicated steps after the resumptions.
    let steps = |p: &Path| -> Vec<u64> {
        std::fs::read_to_string(p.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["kind"] == "step")
            .map(|v| v["step"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(steps(whole.path()), steps(broken.path()));
}

#[test]
fn mixed_precision_and_conservative_runs_learn() {
    let train = dataset(alloys(8, 4));
    let val = dataset(alloys(4, 5));
    for (precision, mode) in [
        (Precision::Bf16, ForceMode::Direct),
        (Precision::F16, ForceMode::Direct),
        (Precision::F32, ForceMode::Conservative),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = TrainConfig {
            precision,
            ..quick_config(15)
        };
        let result = Trainer::new(
            spec(Family::Schnet, 3_000, mode),
            config,
            train.clone(),
            val.clone(),
            dir.path(),
            Device::Cpu,
        )
        .unwrap()
        .run(&mut Silent)
        .unwrap();
        let first = first_val_loss(dir.path());
        assert!(result.best_val_loss.is_finite());
        assert!(
            result.best_val_loss < 0.7 * first,
            "{precision} {mode}: best {} vs first {first}",
            result.best_val_loss
        );
        // f16 skips the first steps while the loss scale backs off from 2^16; nothing else may
        // be dropped.
        let allowed = if precision == Precision::F16 { 8 } else { 0 };
        assert!(
            result.nonfinite_steps <= allowed,
            "{precision} {mode}: {}",
            result.nonfinite_steps
        );
        // The saved best weights reproduce the recorded validation loss.
        let again = loss_on(dir.path(), &val);
        assert!(
            (again - result.best_val_loss).abs() < 1e-4 * result.best_val_loss,
            "{again} vs {}",
            result.best_val_loss
        );
    }
}

#[test]
fn a_diverging_run_stops_with_a_clear_error_and_a_loadable_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        max_lr: 1e30,
        grad_clip: 0.0,
        checkpoint_every: 1,
        ..quick_config(20)
    };
    let trainer = Trainer::new(
        spec(Family::Schnet, 3_000, ForceMode::Direct),
        config,
        dataset(alloys(12, 6)),
        dataset(alloys(4, 7)),
        dir.path(),
        Device::Cpu,
    )
    .unwrap();
    let err = trainer.run(&mut Silent).unwrap_err();
    assert!(
        matches!(err, TrainError::NonFinite { count: 5, .. }),
        "{err}"
    );
    assert!(checkpoint::load(dir.path(), &Device::Cpu)
        .unwrap()
        .is_some());
}

#[test]
fn the_normaliser_references_are_the_least_squares_fit() {
    let data = dataset(alloys(30, 8));
    let values = fit_normalizer(&data, ForceMode::Direct).unwrap();
    let reference = matscale_structures::dataset::LinearReference::fit(data.structures()).unwrap();
    for (z, e) in reference.per_element() {
        assert_eq!(values.reference[z as usize], e);
    }
    assert!(values.force_scale > 0.01 && values.force_scale < 10.0);
    let conservative = fit_normalizer(&data, ForceMode::Conservative).unwrap();
    assert_eq!(conservative.energy_scale, conservative.force_scale);
}

#[test]
fn resuming_with_other_settings_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let train = dataset(alloys(4, 9));
    let val = dataset(alloys(2, 10));
    let spec = spec(Family::Schnet, 3_000, ForceMode::Direct);
    Trainer::new(
        spec.clone(),
        quick_config(1),
        train.clone(),
        val.clone(),
        dir.path(),
        Device::Cpu,
    )
    .unwrap()
    .run(&mut Silent)
    .unwrap();
    let other = TrainConfig {
        max_lr: 1e-4,
        ..quick_config(1)
    };
    let err = Trainer::new(spec, other, train, val, dir.path(), Device::Cpu)
        .unwrap()
        .run(&mut Silent)
        .unwrap_err()
        .to_string();
    assert!(err.contains("train.max_lr"), "{err}");
}
