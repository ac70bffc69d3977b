//! The training loop with EquiformerV2: a tiny model (one layer, `lmax 2`, `mmax 1`, 8
//! channels) memorises a few EMT-labelled alloys, and the saved best weights reproduce the
//! recorded validation loss; mixed precision (bf16 weights, f32 compute) learns. Training on
//! conservative forces is in `training_equiformer_conservative.rs` (its own process: it
//! enables higher-order gradients, which switches EquiformerV2 off its fused kernels).

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use common::{alloys, tiny};
use matscale_models::{ForceMode, ModelConfig, ModelSpec};
use matscale_trainer::source::DataConfig;
use matscale_trainer::{evaluate, Dataset, Precision, Silent, TrainConfig, Trainer};

fn first_val_loss(run: &Path) -> f64 {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["kind"] == "epoch")
        .and_then(|v| v["val"]["loss"]["total"].as_f64())
        .expect("an epoch line in metrics.jsonl")
}

#[test]
fn a_tiny_equiformer_v2_overfits_a_few_alloys() {
    let train = Dataset::new(alloys(4, 1), DataConfig::default().graph(), "train").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = ModelSpec {
        model: ModelConfig::EquiformerV2(tiny()),
        force_mode: ForceMode::Direct,
    };
    // Validate on the training set itself: the best validation loss is the fit quality.
    let config = TrainConfig {
        epochs: 40,
        batch_size: 4,
        max_lr: 1e-2,
        grad_clip: 10.0,
        patience: 0,
        log_every: 1,
        ..Default::default()
    };
    let result = Trainer::new(
        spec,
        config,
        train.clone(),
        train.clone(),
        dir.path(),
        Device::Cpu,
    )
    .unwrap()
    .run(&mut Silent)
    .unwrap();
    let first = first_val_loss(dir.path());
    println!(
        "validation loss: first epoch {first}, best {}",
        result.best_val_loss
    );
    assert_eq!(result.nonfinite_steps, 0);
    assert!(
        result.best_val_loss < 0.05 * first,
        "best {} vs first {first}",
        result.best_val_loss
    );
    // The saved best weights reproduce the recorded validation loss.
    let (_, run_config, model) =
        matscale_trainer::load_model(dir.path(), false, DType::F32, &Device::Cpu).unwrap();
    let again = evaluate(&model, &train, 8, &run_config.loss, &Device::Cpu)
        .unwrap()
        .0
        .loss
        .total;
    assert!(
        (again - result.best_val_loss).abs() < 1e-4 * result.best_val_loss,
        "{again} vs {}",
        result.best_val_loss
    );
}

#[test]
fn bf16_weights_learn() {
    let train = Dataset::new(alloys(4, 2), DataConfig::default().graph(), "train").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = ModelSpec {
        model: ModelConfig::EquiformerV2(tiny()),
        force_mode: ForceMode::Direct,
    };
    let config = TrainConfig {
        epochs: 12,
        batch_size: 4,
        max_lr: 1e-2,
        grad_clip: 10.0,
        patience: 0,
        log_every: 1,
        precision: Precision::Bf16,
        ..Default::default()
    };
    let result = Trainer::new(spec, config, train.clone(), train, dir.path(), Device::Cpu)
        .unwrap()
        .run(&mut Silent)
        .unwrap();
    let first = first_val_loss(dir.path());
    println!("bf16: first epoch {first}, best {}", result.best_val_loss);
    assert_eq!(result.nonfinite_steps, 0);
    assert!(
        result.best_val_loss < 0.5 * first,
        "best {} vs first {first}",
        result.best_val_loss
    );
}
