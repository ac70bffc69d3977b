//! Training EquiformerV2 on conservative forces (`F = −∂E/∂r`, stress by the strain
//! derivative): the trainer enables higher-order gradients, the model composes its layers from
//! differentiable ops, and a tiny model fits a few EMT-labelled alloys. (The exactness of the
//! second derivatives is checked against finite differences in
//! `crates/models/tests/equiformer_v2_conservative_training.rs`.)
//!
//! Its own test binary: enabling higher-order gradients is process-wide.

mod common;

use candle_core::Device;
use matscale_models::{ForceMode, ModelConfig, ModelSpec};
use matscale_trainer::source::DataConfig;
use matscale_trainer::{Dataset, Silent, TrainConfig, Trainer};

#[test]
fn a_tiny_conservative_equiformer_v2_learns_forces() {
    let structures = common::alloys(4, 1);
    let train = Dataset::new(structures, DataConfig::default().graph(), "train").unwrap();
    let spec = ModelSpec {
        model: ModelConfig::EquiformerV2(common::tiny()),
        force_mode: ForceMode::Conservative,
    };
    let dir = tempfile::tempdir().unwrap();
    let result = Trainer::new(
        spec,
        TrainConfig {
            epochs: 25,
            batch_size: 4,
            max_lr: 1e-2,
            grad_clip: 10.0,
            patience: 0,
            log_every: 1,
            ..Default::default()
        },
        train.clone(),
        train,
        dir.path(),
        Device::Cpu,
    )
    .unwrap()
    .run(&mut Silent)
    .unwrap();
    let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let epochs: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "epoch")
        .collect();
    let force = |v: &serde_json::Value| v["val"]["loss"]["forces"].as_f64().unwrap();
    let (first, best) = (
        force(&epochs[0]),
        epochs.iter().map(force).fold(f64::INFINITY, f64::min),
    );
    println!(
        "force loss: first epoch {first}, best {best}; total best {}",
        result.best_val_loss
    );
    assert_eq!(result.nonfinite_steps, 0);
    assert!(
        best < 0.3 * first,
        "force loss best {best} vs first {first}"
    );
}
