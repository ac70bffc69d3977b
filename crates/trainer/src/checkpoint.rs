//! Checkpoints: weights and optimiser moments as safetensors, everything else as JSON, written
//! so that a crash at any moment leaves the previous checkpoint intact.
//!
//! Layout inside a run directory:
//! * `checkpoint/state.json`: [`TrainState`] naming the step of the tensor files;
//! * `checkpoint/weights-<step>.safetensors`: master weights (network and normaliser);
//! * `checkpoint/optimizer-<step>.safetensors`: AdamW moments (`m.<name>`, `v.<name>`) and, with
//!   EMA, the averaged weights (`ema.<name>`);
//! * `best.safetensors`: the weights with the best validation loss so far.
//!
//! Tensor files of a new step are written (temporary name, then rename) before `state.json` is
//! replaced the same way; files of older steps are removed afterwards. A killed process
//! therefore leaves either the old or the new checkpoint, both complete.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::loss::LossValues;
use crate::precision::LossScaler;

/// Version of the checkpoint layout.
pub const CHECKPOINT_VERSION: u32 = 1;

/// Everything about a run's progress that is not a tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Layout version ([`CHECKPOINT_VERSION`]).
    pub version: u32,
    /// Optimiser steps taken.
    pub step: u64,
    /// The epoch in progress (0-based).
    pub epoch: u64,
    /// Batches of `epoch` already done.
    pub batch_in_epoch: u64,
    /// Best validation loss so far.
    pub best_val_loss: Option<f64>,
    /// Its components.
    pub best_val: Option<LossValues>,
    /// The epoch (1-based count of completed epochs) of the best validation loss.
    pub best_epoch: Option<u64>,
    /// Validations since the last improvement.
    pub validations_without_improvement: u64,
    /// Consecutive non-finite steps.
    pub nonfinite_streak: u32,
    /// Non-finite steps dropped over the run.
    pub nonfinite_total: u64,
    /// Dynamic loss scale (f16).
    pub loss_scaler: LossScaler,
    /// Training FLOPs so far (analytic).
    pub training_flops: f64,
    /// Structures processed so far.
    pub structures_seen: u64,
    /// Wall time spent training so far, seconds (summed over resumptions).
    pub wall_time_s: f64,
    /// Bytes of `metrics.jsonl` that belong to this checkpoint (later lines are dropped on
    /// resume, so the log has no duplicates).
    pub metrics_len: u64,
    /// True once training ended (all epochs or early stop).
    pub finished: bool,
    /// True when early stopping ended the run.
    pub stopped_early: bool,
}

impl TrainState {
    /// The state of a run that has not started.
    pub fn fresh() -> Self {
        Self {
            version: CHECKPOINT_VERSION,
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            best_val_loss: None,
            best_val: None,
            best_epoch: None,
            validations_without_improvement: 0,
            nonfinite_streak: 0,
            nonfinite_total: 0,
            loss_scaler: LossScaler::default(),
            training_flops: 0.0,
            structures_seen: 0,
            wall_time_s: 0.0,
            metrics_len: 0,
            finished: false,
            stopped_early: false,
        }
    }
}

/// Writes `bytes` to `path` atomically (temporary file in the same directory, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| TrainError::io(&tmp, e))?;
        f.sync_all().map_err(|e| TrainError::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}

/// Saves `tensors` as safetensors at `path` atomically.
pub fn save_tensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let tmp = temp_path(path);
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    candle_core::safetensors::save(&map, &tmp).map_err(|e| TrainError::Checkpoint {
        path: tmp.clone(),
        message: e.to_string(),
    })?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| TrainError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
}

/// Loads a safetensors file.
pub fn load_tensors(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let map = candle_core::safetensors::load(path, device).map_err(|e| TrainError::Checkpoint {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(map.into_iter().collect())
}

/// Writes `value` as pretty JSON at `path` atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| TrainError::Json {
        path: path.to_path_buf(),
        source: e,
    })?;
    write_atomic(path, text.as_bytes())
}

/// Reads JSON from `path`.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Json {
        path: path.to_path_buf(),
        source: e,
    })
}

/// The checkpoint directory of a run.
pub fn checkpoint_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoint")
}

/// A complete checkpoint as loaded.
#[derive(Debug)]
pub struct Checkpoint {
    /// The progress.
    pub state: TrainState,
    /// Master weights by name.
    pub weights: BTreeMap<String, Tensor>,
    /// Optimiser moments (and EMA weights) by name.
    pub optimizer: BTreeMap<String, Tensor>,
}

fn weights_path(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("weights-{step}.safetensors"))
}

fn optimizer_path(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("optimizer-{step}.safetensors"))
}

/// Saves a checkpoint of `state` in `run_dir` (see the [module docs](self)).
pub fn save(
    run_dir: &Path,
    state: &TrainState,
    weights: &BTreeMap<String, Tensor>,
    optimizer: &BTreeMap<String, Tensor>,
) -> Result<()> {
    let dir = checkpoint_dir(run_dir);
    std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    save_tensors(&weights_path(&dir, state.step), weights)?;
    save_tensors(&optimizer_path(&dir, state.step), optimizer)?;
    write_json(&dir.join("state.json"), state)?;
    // Remove the tensor files of other steps (and temporaries of killed writers).
    let keep = [
        weights_path(&dir, state.step),
        optimizer_path(&dir, state.step),
        dir.join("state.json"),
    ];
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if !keep.contains(&path) {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    Ok(())
}

/// Loads the checkpoint of `run_dir`, or `None` when the run has none.
pub fn load(run_dir: &Path, device: &Device) -> Result<Option<Checkpoint>> {
    let dir = checkpoint_dir(run_dir);
    let state_path = dir.join("state.json");
    if !state_path.exists() {
        return Ok(None);
    }
    let state: TrainState = read_json(&state_path)?;
    if state.version != CHECKPOINT_VERSION {
        return Err(TrainError::Checkpoint {
            path: state_path,
            message: format!(
                "layout version {} is not supported (expected {CHECKPOINT_VERSION})",
                state.version
            ),
        });
    }
    let weights = load_tensors(&weights_path(&dir, state.step), device)?;
    let optimizer = load_tensors(&optimizer_path(&dir, state.step), device)?;
    Ok(Some(Checkpoint {
        state,
        weights,
        optimizer,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_then_load_round_trips_and_cleans_old_steps() {
        let dir = tempfile::tempdir().unwrap();
        let t = |v: f32| Tensor::new(&[v, 2.0 * v], &Device::Cpu).unwrap();
        let mut state = TrainState::fresh();
        for step in [3u64, 7] {
            state.step = step;
            let weights = BTreeMap::from([("w".to_string(), t(step as f32))]);
            let opt = BTreeMap::from([("m.w".to_string(), t(0.5))]);
            save(dir.path(), &state, &weights, &opt).unwrap();
        }
        let ck = load(dir.path(), &Device::Cpu).unwrap().unwrap();
        assert_eq!(ck.state.step, 7);
        assert_eq!(ck.weights["w"].to_vec1::<f32>().unwrap(), vec![7.0, 14.0]);
        let files: Vec<_> = std::fs::read_dir(checkpoint_dir(dir.path()))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(files.len(), 3, "{files:?}");
        assert!(!files.iter().any(|f| f.contains("-3.")));
    }

    #[test]
    fn a_missing_tensor_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = TrainState::fresh();
        let weights =
            BTreeMap::from([("w".to_string(), Tensor::new(&[1f32], &Device::Cpu).unwrap())]);
        save(dir.path(), &state, &weights, &BTreeMap::new()).unwrap();
        std::fs::remove_file(checkpoint_dir(dir.path()).join("weights-0.safetensors")).unwrap();
        let err = load(dir.path(), &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("weights-0.safetensors"), "{err}");
    }
}
