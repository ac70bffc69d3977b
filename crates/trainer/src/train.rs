//! The training loop.
//!
//! [`Trainer::run`] trains a model on a training [`Dataset`], validates on a fixed validation
//! set after every epoch, keeps the best validation loss and its weights, checkpoints, and
//! writes `metrics.jsonl` and `result.json` into the run directory. Calling it again on the
//! same directory resumes from the last checkpoint; on the CPU in f32 a resumed run is bit for
//! bit the run that was never interrupted (epoch orders and augmentation rotations are derived
//! from the seed and the step, weights and moments are restored exactly).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use matscale_models::model::Normalizer;
use matscale_models::{
    seeded_var_builder, AtomisticModel, BatchShape, ForceMode, ModelSpec, NormalizerValues,
};
use matscale_structures::dataset::{LabelStats, LinearReference};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, TrainState};
use crate::data::{augment_rotations, epoch_order, Dataset, DeviceBatch};
use crate::error::{Result, TrainError};
use crate::eval::{evaluate, EvalMetrics};
use crate::loss::{loss, LossValues, LossWeights};
use crate::optim::{clip_factor, AdamW, AdamWConfig, Ema};
use crate::precision::Precision;
use crate::schedule::Schedule;

/// Settings of a training run (TOML/JSON; missing fields take the defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Passes over the training set (default 50).
    pub epochs: u64,
    /// Structures per batch (default 8).
    pub batch_size: usize,
    /// Peak learning rate (default 1e-3).
    pub max_lr: f64,
    /// Fraction of the steps spent warming up (study: 0.01).
    pub warmup_fraction: f64,
    /// AdamW settings (weight decay 1e-3 by default).
    pub optimizer: AdamWConfig,
    /// Gradient clipping by global norm; 0 turns it off (default 1.0, as the study).
    pub grad_clip: f64,
    /// Stop after this many validations without improvement; 0 turns early stopping off
    /// (default 10).
    pub patience: u64,
    /// Minimum decrease of the validation loss that counts as an improvement (default 0).
    pub min_improvement: f64,
    /// Decay of an exponential moving average of the weights used for validation and the
    /// saved best weights; 0 turns it off (default 0).
    pub ema_decay: f64,
    /// Rotate every training structure by a random rotation each time it is seen.
    pub augment_rotations: bool,
    /// Compute precision.
    pub precision: Precision,
    /// Loss weights (study: 2.5, 20, 5, 5).
    pub loss: LossWeights,
    /// Seed of weight initialisation, epoch orders and augmentation.
    pub seed: u64,
    /// Fit per-element reference energies and output scales on the training set.
    pub normalize: bool,
    /// Log one metrics line every this many steps (and at every epoch end).
    pub log_every: u64,
    /// Also checkpoint every this many steps inside an epoch; 0 checkpoints at epoch ends only.
    pub checkpoint_every: u64,
    /// Consecutive non-finite steps tolerated before the run stops with an error (default 5).
    pub max_nonfinite_steps: u32,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 50,
            batch_size: 8,
            max_lr: 1e-3,
            warmup_fraction: 0.01,
            optimizer: AdamWConfig::default(),
            grad_clip: 1.0,
            patience: 10,
            min_improvement: 0.0,
            ema_decay: 0.0,
            augment_rotations: false,
            precision: Precision::F32,
            loss: LossWeights::default(),
            seed: 0,
            normalize: true,
            log_every: 10,
            checkpoint_every: 0,
            max_nonfinite_steps: 5,
        }
    }
}

impl TrainConfig {
    /// Checks every field.
    pub fn check(&self) -> Result<()> {
        let positive = |name: &str, v: f64| -> Result<()> {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(TrainError::config(
                    name,
                    format!("is {v}; it must be positive"),
                ))
            }
        };
        if self.epochs == 0 {
            return Err(TrainError::config(
                "epochs",
                "is 0; train for at least one epoch",
            ));
        }
        if self.batch_size == 0 {
            return Err(TrainError::config("batch_size", "is 0"));
        }
        positive("max_lr", self.max_lr)?;
        if !(0.0..1.0).contains(&self.warmup_fraction) {
            return Err(TrainError::config("warmup_fraction", "must lie in [0, 1)"));
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return Err(TrainError::config(
                "ema_decay",
                "must lie in [0, 1) (0 = off)",
            ));
        }
        if !(self.grad_clip.is_finite() && self.grad_clip >= 0.0) {
            return Err(TrainError::config("grad_clip", "must be ≥ 0 (0 = off)"));
        }
        for (name, w) in [
            ("loss.energy", self.loss.energy),
            ("loss.forces", self.loss.forces),
            ("loss.stress_isotropic", self.loss.stress_isotropic),
            ("loss.stress_deviatoric", self.loss.stress_deviatoric),
        ] {
            if !(w.is_finite() && w >= 0.0) {
                return Err(TrainError::config(name, format!("is {w}; it must be ≥ 0")));
            }
        }
        let o = &self.optimizer;
        if !(0.0..1.0).contains(&o.beta1) || !(0.0..1.0).contains(&o.beta2) {
            return Err(TrainError::config(
                "optimizer.beta1/beta2",
                "must lie in [0, 1)",
            ));
        }
        positive("optimizer.eps", o.eps)?;
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return Err(TrainError::config("optimizer.weight_decay", "must be ≥ 0"));
        }
        if self.max_nonfinite_steps == 0 {
            return Err(TrainError::config(
                "max_nonfinite_steps",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MetricsLine {
    /// A training step.
    Step {
        /// Optimiser step (1-based, after the update).
        step: u64,
        /// Epoch (0-based).
        epoch: u64,
        /// Learning rate used.
        lr: f64,
        /// Loss of the batch.
        loss: LossValues,
        /// Global gradient norm before clipping.
        grad_norm: f64,
        /// Training throughput since the previous line, structures per second.
        structures_per_s: f64,
    },
    /// The end of an epoch with its validation.
    Epoch {
        /// Completed epochs (1-based).
        epoch: u64,
        /// Optimiser steps so far.
        step: u64,
        /// Mean training loss over the epoch's batches.
        train_loss: f64,
        /// Validation metrics.
        val: EvalMetrics,
        /// Best validation loss so far.
        best_val_loss: f64,
        /// Training FLOPs so far.
        training_flops: f64,
        /// Wall time so far, s.
        wall_time_s: f64,
    },
    /// A dropped step whose loss or gradients were not finite.
    NonFinite {
        /// The step that would have been taken.
        step: u64,
        /// The loss value seen.
        loss: f64,
    },
}

/// What `result.json` holds: everything the sweep and the fitter need.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// Model family.
    pub family: String,
    /// Model label (family or variant).
    pub label: String,
    /// The model specification.
    pub model: ModelSpec,
    /// Trained parameters N.
    pub n_parameters: usize,
    /// Training structures D.
    pub n_train: usize,
    /// Validation structures.
    pub n_val: usize,
    /// Training atoms.
    pub n_train_atoms: usize,
    /// Analytic training FLOPs per structure (mean over the training set).
    pub flops_per_structure: f64,
    /// Analytic training FLOPs of the whole run.
    pub training_flops: f64,
    /// Epochs completed.
    pub epochs: u64,
    /// Optimiser steps.
    pub steps: u64,
    /// Best validation loss.
    pub best_val_loss: f64,
    /// Epoch of the best validation loss (1-based).
    pub best_epoch: u64,
    /// Components of the best validation loss.
    pub best_val: LossValues,
    /// Validation metrics of the best weights.
    pub best_val_metrics: EvalMetrics,
    /// True when early stopping ended the run.
    pub stopped_early: bool,
    /// Non-finite steps dropped.
    pub nonfinite_steps: u64,
    /// Wall time, s.
    pub wall_time_s: f64,
    /// Training settings.
    pub train: TrainConfig,
    /// The output normalisation fitted on the training set.
    pub normalizer: NormalizerValues,
}

/// Receives progress events (a progress bar, a log).
pub trait Observer {
    /// Called after each optimiser step.
    fn on_step(&mut self, _line: &MetricsLine, _steps_done: u64, _total_steps: u64) {}
    /// Called after each epoch's validation.
    fn on_epoch(&mut self, _line: &MetricsLine) {}
    /// Called when a run resumes from a checkpoint.
    fn on_resume(&mut self, _state: &TrainState) {}
    /// Asked after every step: `true` abandons the run at once, without a checkpoint, as if
    /// the process had been killed (the run resumes from its last checkpoint).
    fn should_stop(&mut self) -> bool {
        false
    }
}

/// An observer that ignores everything.
#[derive(Debug, Default)]
pub struct Silent;
impl Observer for Silent {}

/// Fits the output normalisation on the training structures: linear per-element references,
/// energy scale (force RMS in conservative mode, else the per-atom energy spread), force RMS
/// and stress spread. Elements absent from the training set get reference 0.
pub fn fit_normalizer(train: &Dataset, mode: ForceMode) -> Result<NormalizerValues> {
    let structures = train.structures();
    let mut values = NormalizerValues::default();
    let with_energy: Vec<_> = structures.iter().filter(|s| s.energy().is_some()).collect();
    let reference = if with_energy.is_empty() {
        None
    } else {
        Some(LinearReference::fit(&with_energy)?)
    };
    if let Some(r) = &reference {
        for (&z, &e) in r.per_element().iter() {
            values.reference[z as usize] = e;
        }
    }
    let stats = LabelStats::compute(structures, reference.as_ref(), None)?;
    let or_one = |v: f64| if v.is_finite() && v > 1e-12 { v } else { 1.0 };
    values.force_scale = or_one(stats.force_rms);
    values.stress_scale = or_one(stats.stress_std);
    values.energy_scale = match mode {
        ForceMode::Conservative if stats.n_forces > 0 => values.force_scale,
        _ => or_one(stats.energy_per_atom_std),
    };
    Ok(values)
}

/// A training run bound to its directory.
pub struct Trainer {
    spec: ModelSpec,
    config: TrainConfig,
    train: Dataset,
    val: Dataset,
    run_dir: PathBuf,
    device: Device,
}

struct Models {
    master: VarMap,
    /// The model on the master weights (f32/f64): validation, saving.
    model: AtomisticModel,
    /// The low-precision working copy (mixed precision only).
    working: Option<(VarMap, AtomisticModel)>,
    /// Trained variables of the master map, sorted by name.
    trained: Vec<(String, Var)>,
}

impl Trainer {
    /// A run of `spec` with `config` on `train`, validated on `val`, written to `run_dir`.
    pub fn new(
        spec: ModelSpec,
        config: TrainConfig,
        train: Dataset,
        val: Dataset,
        run_dir: impl Into<PathBuf>,
        device: Device,
    ) -> Result<Self> {
        spec.check()?;
        config.check()?;
        if spec.force_mode == ForceMode::Conservative {
            matscale_models::enable_higher_order_gradients()?;
        }
        Ok(Self {
            spec,
            config,
            train,
            val,
            run_dir: run_dir.into(),
            device,
        })
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    fn build_models(&self) -> Result<Models> {
        let p = self.config.precision;
        let master = VarMap::new();
        let vb = seeded_var_builder(&master, self.config.seed, p.master(), &self.device);
        let model = AtomisticModel::new(&self.spec, vb.clone(), vb.clone())?;
        let working = if p.is_mixed() {
            let map = VarMap::new();
            let net_vb = seeded_var_builder(&map, self.config.seed, p.compute(), &self.device);
            let m = AtomisticModel::new(&self.spec, net_vb, vb)?;
            Some((map, m))
        } else {
            None
        };
        let trained = sorted_vars(&master)
            .into_iter()
            .filter(|(name, _)| !name.starts_with(Normalizer::PREFIX))
            .collect();
        Ok(Models {
            master,
            model,
            working,
            trained,
        })
    }

    /// Trains (or resumes) to the end and writes `result.json`.
    pub fn run(&self, observer: &mut dyn Observer) -> Result<RunResult> {
        std::fs::create_dir_all(&self.run_dir).map_err(|e| TrainError::io(&self.run_dir, e))?;
        let models = self.build_models()?;
        let dtype = self.config.precision.master();
        let steps_per_epoch = self.train.len().div_ceil(self.config.batch_size) as u64;
        let total_steps = steps_per_epoch * self.config.epochs;
        let schedule = Schedule {
            warmup_fraction: self.config.warmup_fraction,
            ..Schedule::study(self.config.max_lr, total_steps)
        };
        let mut optimizer = AdamW::new(models.trained.clone(), self.config.optimizer)?;
        let mut ema = if self.config.ema_decay > 0.0 {
            Some(Ema::new(&models.trained, self.config.ema_decay)?)
        } else {
            None
        };
        let metrics_path = self.run_dir.join("metrics.jsonl");

        let checkpoint = checkpoint::load(&self.run_dir, &self.device)?;
        if checkpoint.is_some() {
            self.check_same_run()?;
        }
        let mut state = match checkpoint {
            Some(ck) => {
                restore_weights(&models.master, &ck.weights, &self.run_dir)?;
                optimizer.restore(&ck.optimizer, ck.state.step)?;
                if let Some(ema) = ema.as_mut() {
                    let tensors = models
                        .trained
                        .iter()
                        .map(|(name, _)| {
                            ck.optimizer
                                .get(&format!("ema.{name}"))
                                .cloned()
                                .ok_or_else(|| TrainError::Checkpoint {
                                    path: checkpoint::checkpoint_dir(&self.run_dir),
                                    message: format!("no EMA tensor for `{name}`"),
                                })
                        })
                        .collect::<Result<Vec<_>>>()?;
                    ema.restore(tensors);
                }
                truncate(&metrics_path, ck.state.metrics_len)?;
                observer.on_resume(&ck.state);
                ck.state
            }
            None => {
                let values = if self.config.normalize {
                    fit_normalizer(&self.train, self.spec.force_mode)?
                } else {
                    NormalizerValues::default()
                };
                Normalizer::assign(&models.master, &values)?;
                truncate(&metrics_path, 0)?;
                TrainState::fresh()
            }
        };
        checkpoint::write_json(
            &self.run_dir.join("config.json"),
            &(&self.spec, &self.config),
        )?;

        let mut metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .map_err(|e| TrainError::io(&metrics_path, e))?;
        let mut log = |line: &MetricsLine| -> Result<()> {
            let text = serde_json::to_string(line).map_err(|e| TrainError::Json {
                path: metrics_path.clone(),
                source: e,
            })?;
            writeln!(metrics, "{text}").map_err(|e| TrainError::io(&metrics_path, e))?;
            metrics
                .flush()
                .map_err(|e| TrainError::io(&metrics_path, e))
        };

        let session_start = Instant::now();
        let wall_before = state.wall_time_s;
        let mut last_log = (Instant::now(), state.structures_seen);
        while !state.finished && state.epoch < self.config.epochs {
            let order = epoch_order(self.train.len(), self.config.seed, state.epoch);
            let chunks: Vec<&[usize]> =
                self.train.batches(&order, self.config.batch_size).collect();
            let mut epoch_loss_sum = 0.0;
            let mut epoch_batches = 0u64;
            while state.batch_in_epoch < chunks.len() as u64 {
                let indices = chunks[state.batch_in_epoch as usize];
                let mut batch = self.train.batch(indices)?;
                if self.config.augment_rotations {
                    let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed ^ 0xa06_0000_0000);
                    rng.set_stream(state.step);
                    augment_rotations(&mut batch, &mut rng);
                }
                let shape = BatchShape::of(&batch);
                let device_batch = DeviceBatch::new(batch, dtype, &self.device)?;
                let lr = schedule.lr(state.step);
                let outcome = self.step(&models, &mut optimizer, &device_batch, lr, &mut state)?;
                state.batch_in_epoch += 1;
                match outcome {
                    StepOutcome::Applied { loss, grad_norm } => {
                        state.nonfinite_streak = 0;
                        if let Some(ema) = ema.as_mut() {
                            ema.update(&models.trained)?;
                        }
                        state.training_flops += models.model.flops(&shape).training_step();
                        state.structures_seen += indices.len() as u64;
                        epoch_loss_sum += loss.total;
                        epoch_batches += 1;
                        let now = Instant::now();
                        let dt = now.duration_since(last_log.0).as_secs_f64().max(1e-9);
                        let line = MetricsLine::Step {
                            step: state.step,
                            epoch: state.epoch,
                            lr,
                            loss,
                            grad_norm,
                            structures_per_s: (state.structures_seen - last_log.1) as f64 / dt,
                        };
                        if state.step % self.config.log_every.max(1) == 0 {
                            log(&line)?;
                            last_log = (now, state.structures_seen);
                        }
                        observer.on_step(&line, state.step, total_steps);
                    }
                    StepOutcome::Skipped {
                        loss,
                        count_failure,
                    } => {
                        log(&MetricsLine::NonFinite {
                            step: state.step,
                            loss,
                        })?;
                        state.nonfinite_total += 1;
                        if count_failure {
                            state.nonfinite_streak += 1;
                            if state.nonfinite_streak >= self.config.max_nonfinite_steps {
                                return Err(TrainError::NonFinite {
                                    step: state.step,
                                    count: state.nonfinite_streak,
                                });
                            }
                        }
                    }
                }
                if observer.should_stop() {
                    return Err(TrainError::Interrupted { step: state.step });
                }
                let mid_epoch = state.batch_in_epoch < chunks.len() as u64;
                if mid_epoch
                    && self.config.checkpoint_every > 0
                    && state.step % self.config.checkpoint_every == 0
                {
                    state.wall_time_s = wall_before + session_start.elapsed().as_secs_f64();
                    state.metrics_len = file_len(&metrics_path)?;
                    self.save(&models, &optimizer, ema.as_ref(), &state)?;
                }
            }
            // End of the epoch: validate (with EMA weights when enabled), keep the best.
            let val = self.validate(&models, ema.as_ref())?;
            state.epoch += 1;
            state.batch_in_epoch = 0;
            let improved = match state.best_val_loss {
                None => true,
                Some(best) => val.loss.total < best - self.config.min_improvement,
            };
            if improved && val.loss.total.is_finite() {
                state.best_val_loss = Some(val.loss.total);
                state.best_val = Some(val.loss);
                state.best_epoch = Some(state.epoch);
                state.validations_without_improvement = 0;
                let weights = self.weights_for_validation(&models, ema.as_ref())?;
                checkpoint::save_tensors(&self.run_dir.join("best.safetensors"), &weights)?;
                checkpoint::write_json(&self.run_dir.join("best_val.json"), &val)?;
            } else {
                state.validations_without_improvement += 1;
            }
            state.wall_time_s = wall_before + session_start.elapsed().as_secs_f64();
            let line = MetricsLine::Epoch {
                epoch: state.epoch,
                step: state.step,
                train_loss: if epoch_batches > 0 {
                    epoch_loss_sum / epoch_batches as f64
                } else {
                    f64::NAN
                },
                val,
                best_val_loss: state.best_val_loss.unwrap_or(f64::NAN),
                training_flops: state.training_flops,
                wall_time_s: state.wall_time_s,
            };
            log(&line)?;
            observer.on_epoch(&line);
            if self.config.patience > 0
                && state.validations_without_improvement >= self.config.patience
            {
                state.finished = true;
                state.stopped_early = true;
            }
            if state.epoch >= self.config.epochs {
                state.finished = true;
            }
            state.metrics_len = file_len(&metrics_path)?;
            self.save(&models, &optimizer, ema.as_ref(), &state)?;
        }
        let result = self.result(&models, &state)?;
        checkpoint::write_json(&self.run_dir.join("result.json"), &result)?;
        Ok(result)
    }

    /// Refuses to resume a run directory that holds a run with other settings.
    fn check_same_run(&self) -> Result<()> {
        let path = self.run_dir.join("config.json");
        if !path.exists() {
            return Ok(());
        }
        let saved: serde_json::Value = checkpoint::read_json(&path)?;
        let current =
            serde_json::to_value((&self.spec, &self.config)).map_err(|e| TrainError::Json {
                path: path.clone(),
                source: e,
            })?;
        if saved == current {
            return Ok(());
        }
        let mut differing = Vec::new();
        for (k, (a, b)) in ["model", "train"].iter().zip(
            saved
                .as_array()
                .into_iter()
                .flatten()
                .zip(current.as_array().into_iter().flatten()),
        ) {
            if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
                for (field, value) in b {
                    if a.get(field) != Some(value) {
                        differing.push(format!("{k}.{field}"));
                    }
                }
            }
        }
        Err(TrainError::Checkpoint {
            path,
            message: format!(
                "the run directory holds a run with other settings ({}); resume it with the same \
                 settings or train into a new directory",
                if differing.is_empty() {
                    "see config.json".to_string()
                } else {
                    differing.join(", ")
                }
            ),
        })
    }

    fn result(&self, models: &Models, state: &TrainState) -> Result<RunResult> {
        let best_val_metrics: EvalMetrics =
            checkpoint::read_json(&self.run_dir.join("best_val.json"))?;
        let shape = BatchShape {
            n_structures: self.train.len(),
            ..full_shape(&self.train)
        };
        let flops = models.model.flops(&shape);
        Ok(RunResult {
            family: self.spec.model.family().to_string(),
            label: self.spec.model.label(),
            model: self.spec.clone(),
            n_parameters: self.spec.n_parameters(),
            n_train: self.train.len(),
            n_val: self.val.len(),
            n_train_atoms: self.train.structures().iter().map(|s| s.len()).sum(),
            flops_per_structure: flops.training_per_structure(),
            training_flops: state.training_flops,
            epochs: state.epoch,
            steps: state.step,
            best_val_loss: state.best_val_loss.unwrap_or(f64::NAN),
            best_epoch: state.best_epoch.unwrap_or(0),
            best_val: state.best_val.unwrap_or_default(),
            best_val_metrics,
            stopped_early: state.stopped_early,
            nonfinite_steps: state.nonfinite_total,
            wall_time_s: state.wall_time_s,
            train: self.config.clone(),
            normalizer: models.model.normalizer().values()?,
        })
    }

    fn step(
        &self,
        models: &Models,
        optimizer: &mut AdamW,
        batch: &DeviceBatch,
        lr: f64,
        state: &mut TrainState,
    ) -> Result<StepOutcome> {
        let precision = self.config.precision;
        let model = match &models.working {
            Some((map, m)) => {
                copy_into(&models.trained, map)?;
                m
            }
            None => &models.model,
        };
        let prediction = model.predict(&batch.tensors, true)?;
        let terms = loss(&prediction, &batch.labels, &self.config.loss)?;
        let values = terms.values()?;
        if !values.total.is_finite() {
            return Ok(StepOutcome::Skipped {
                loss: values.total,
                count_failure: true,
            });
        }
        let scale = if precision.uses_loss_scaling() {
            state.loss_scaler.scale
        } else {
            1.0
        };
        let grads = (&terms.total * scale)?.backward()?;
        // Gradients are detached: with higher-order gradients enabled (conservative mode) they
        // carry the whole graph of the step, which the optimiser moments would otherwise keep
        // alive from one step to the next.
        let mut grad_list: Vec<Option<Tensor>> = Vec::with_capacity(models.trained.len());
        match &models.working {
            Some((map, _)) => {
                let data = map
                    .data()
                    .lock()
                    .expect("the var map lock is never poisoned");
                for (name, var) in &models.trained {
                    let g = match data.get(name) {
                        Some(w) => grads.get(w.as_tensor()),
                        None => None,
                    };
                    grad_list.push(match g {
                        Some(g) => Some((g.detach().to_dtype(var.dtype())? / scale)?),
                        None => None,
                    });
                }
            }
            None => {
                for (_, var) in &models.trained {
                    grad_list.push(grads.get(var.as_tensor()).map(Tensor::detach));
                }
            }
        }
        let norm = crate::optim::global_norm(&grad_list)?;
        // The clipping factor is applied inside the update (`step_scaled`): the same numbers
        // as `clip_by_global_norm` before the step.
        let grad_scale = clip_factor(norm, self.config.grad_clip);
        let finite = norm.is_finite();
        if precision.uses_loss_scaling() && !state.loss_scaler.update(finite) {
            return Ok(StepOutcome::Skipped {
                loss: values.total,
                count_failure: state.loss_scaler.scale <= 1.0,
            });
        }
        if !finite {
            return Ok(StepOutcome::Skipped {
                loss: values.total,
                count_failure: true,
            });
        }
        optimizer.step_scaled(&grad_list, lr, grad_scale)?;
        state.step = optimizer.step_count();
        Ok(StepOutcome::Applied {
            loss: values,
            grad_norm: norm,
        })
    }

    fn weights_for_validation(
        &self,
        models: &Models,
        ema: Option<&Ema>,
    ) -> Result<BTreeMap<String, Tensor>> {
        let mut weights = named_tensors(&models.master);
        if let Some(ema) = ema {
            for ((name, _), t) in models.trained.iter().zip(ema.tensors()) {
                weights.insert(name.clone(), t.clone());
            }
        }
        Ok(weights)
    }

    fn validate(&self, models: &Models, ema: Option<&Ema>) -> Result<EvalMetrics> {
        // Evaluate a model built on detached copies of the weights (the EMA average when
        // enabled): with `Var` weights every conservative prediction would also compute, and
        // with higher-order gradients keep the graph of, every weight gradient.
        let weights = self.weights_for_validation(models, ema)?;
        let model = model_from_tensors(&self.spec, &weights, models.model.dtype(), &self.device)?;
        let (metrics, _) = evaluate(
            &model,
            &self.val,
            self.config.batch_size,
            &self.config.loss,
            &self.device,
        )?;
        Ok(metrics)
    }

    fn save(
        &self,
        models: &Models,
        optimizer: &AdamW,
        ema: Option<&Ema>,
        state: &TrainState,
    ) -> Result<()> {
        let weights = named_tensors(&models.master);
        let mut opt = optimizer.state_tensors();
        if let Some(ema) = ema {
            for ((name, _), t) in models.trained.iter().zip(ema.tensors()) {
                opt.insert(format!("ema.{name}"), t.clone());
            }
        }
        checkpoint::save(&self.run_dir, state, &weights, &opt)
    }
}

enum StepOutcome {
    Applied { loss: LossValues, grad_norm: f64 },
    Skipped { loss: f64, count_failure: bool },
}

/// The variables of `map`, sorted by name.
pub fn sorted_vars(map: &VarMap) -> Vec<(String, Var)> {
    let data = map
        .data()
        .lock()
        .expect("the var map lock is never poisoned");
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

fn named_tensors(map: &VarMap) -> BTreeMap<String, Tensor> {
    sorted_vars(map)
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect()
}

/// Copies the master values of `trained` into the same-named variables of `working`, casting.
fn copy_into(trained: &[(String, Var)], working: &VarMap) -> Result<()> {
    let data = working
        .data()
        .lock()
        .expect("the var map lock is never poisoned");
    for (name, var) in trained {
        if let Some(w) = data.get(name) {
            w.set(&var.as_tensor().to_dtype(w.dtype())?)?;
        }
    }
    Ok(())
}

/// Loads `weights` into the variables of `map` (every variable must be present).
pub fn restore_weights(
    map: &VarMap,
    weights: &BTreeMap<String, Tensor>,
    source: &Path,
) -> Result<()> {
    let data = map
        .data()
        .lock()
        .expect("the var map lock is never poisoned");
    for (name, var) in data.iter() {
        let t = weights.get(name).ok_or_else(|| TrainError::Checkpoint {
            path: source.to_path_buf(),
            message: format!("no tensor `{name}` in the saved weights"),
        })?;
        if t.shape() != var.shape() {
            return Err(TrainError::Checkpoint {
                path: source.to_path_buf(),
                message: format!(
                    "tensor `{name}` has shape {:?}; the model expects {:?}",
                    t.shape(),
                    var.shape()
                ),
            });
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

fn full_shape(data: &Dataset) -> BatchShape {
    let mut shape = BatchShape::default();
    for (s, list) in data
        .structures()
        .iter()
        .zip((0..data.len()).map(|k| data.batch(&[k])))
    {
        let n = s.len();
        shape.n_structures += 1;
        shape.n_nodes += n;
        shape.n_edges += list.map(|b| b.n_edges()).unwrap_or(0);
        shape.sum_sq_nodes += n * n;
        shape.max_nodes = shape.max_nodes.max(n);
    }
    shape
}

fn file_len(path: &Path) -> Result<u64> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(TrainError::io(path, e)),
    }
}

fn truncate(path: &Path, len: u64) -> Result<()> {
    match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(f) => f.set_len(len).map_err(|e| TrainError::io(path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(TrainError::io(path, e)),
    }
}

/// Loads the model saved in a run directory: `best.safetensors` (or the latest checkpoint's
/// weights when `latest`), with the specification from `config.json`, in `dtype`.
pub fn load_model(
    run_dir: &Path,
    latest: bool,
    dtype: DType,
    device: &Device,
) -> Result<(ModelSpec, TrainConfig, AtomisticModel)> {
    let (spec, config): (ModelSpec, TrainConfig) =
        checkpoint::read_json(&run_dir.join("config.json"))?;
    let weights = if latest {
        checkpoint::load(run_dir, device)?
            .ok_or_else(|| TrainError::Checkpoint {
                path: run_dir.to_path_buf(),
                message: "no checkpoint".into(),
            })?
            .weights
    } else {
        checkpoint::load_tensors(&run_dir.join("best.safetensors"), device)?
    };
    // Check names and shapes against a model built the usual way, then build the returned
    // model on plain tensors (no gradients are tracked through the weights).
    let map = VarMap::new();
    let vb = seeded_var_builder(&map, config.seed, DType::F32, &Device::Cpu);
    AtomisticModel::new(&spec, vb.clone(), vb)?;
    restore_weights(&map, &weights, run_dir)?;
    let model = model_from_tensors(&spec, &weights, dtype, device)?;
    Ok((spec, config, model))
}

/// A model whose weights are the given tensors, detached: predictions track no weight
/// gradients (evaluation, inference).
pub fn model_from_tensors(
    spec: &ModelSpec,
    weights: &BTreeMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> Result<AtomisticModel> {
    let map: std::collections::HashMap<String, Tensor> = weights
        .iter()
        .map(|(k, v)| (k.clone(), v.detach()))
        .collect();
    let vb = candle_nn::VarBuilder::from_tensors(map, dtype, device);
    Ok(AtomisticModel::new(spec, vb.clone(), vb)?)
}
