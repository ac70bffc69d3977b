//! A whole run in one configuration file: model (explicit, preset or size-ladder point), force
//! mode, data and training settings. `cargo xtask train --config configs/train/*.toml` reads
//! this; command-line flags override fields.
//!
//! ```toml
//! force_mode = "direct"
//!
//! [model]
//! family = "schnet"
//! size = 1e5            # size ladder: about 10^5 parameters
//!
//! [data]
//! source = "tests/data/real/mlearn/Si/training.json"
//!
//! [train]
//! epochs = 50
//! max_lr = 1e-3
//! ```

use serde::{Deserialize, Serialize};

use matscale_models::{Family, ForceMode, ModelConfig, ModelSpec};

use crate::error::{Result, TrainError};
use crate::source::DataConfig;
use crate::train::TrainConfig;

/// How the model is chosen: exactly one of an explicit `config`, a `preset`, or a `size` on
/// the family's ladder (the family's default configuration when none is given).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelChoice {
    /// The family (required unless `config` names it).
    pub family: Option<Family>,
    /// Target parameter count on the family's size ladder.
    pub size: Option<f64>,
    /// A named preset of the family (see `cargo xtask train --list-presets`).
    pub preset: Option<String>,
    /// An explicit configuration (with its own `family` tag).
    pub config: Option<ModelConfig>,
}

impl ModelChoice {
    /// Resolves the choice into a configuration.
    pub fn resolve(&self, mode: ForceMode) -> Result<ModelConfig> {
        let given = [
            self.size.is_some(),
            self.preset.is_some(),
            self.config.is_some(),
        ]
        .iter()
        .filter(|&&x| x)
        .count();
        if given > 1 {
            return Err(TrainError::config(
                "model",
                "give only one of `size`, `preset` and `config`",
            ));
        }
        if let Some(config) = &self.config {
            if let Some(f) = self.family {
                if f != config.family() {
                    return Err(TrainError::config(
                        "model.family",
                        format!("is {f} but model.config is a {}", config.family()),
                    ));
                }
            }
            return Ok(config.clone());
        }
        let family = self
            .family
            .ok_or_else(|| TrainError::config("model.family", "is missing"))?;
        if let Some(size) = self.size {
            if !(size.is_finite() && size >= 1.0) {
                return Err(TrainError::config("model.size", format!("is {size}")));
            }
            return Ok(ModelConfig::for_parameters(
                family,
                size.round() as usize,
                mode,
            )?);
        }
        if let Some(name) = &self.preset {
            let full = if name.contains('/') {
                name.clone()
            } else {
                format!("{family}/{name}")
            };
            let presets = ModelConfig::presets();
            return presets
                .iter()
                .find(|(n, _)| *n == full)
                .map(|(_, c)| c.clone())
                .ok_or_else(|| {
                    let known: Vec<&str> = presets
                        .iter()
                        .filter(|(n, _)| n.starts_with(&format!("{family}/")))
                        .map(|(n, _)| n.as_str())
                        .collect();
                    TrainError::config(
                        "model.preset",
                        format!("`{name}` is unknown; {family} has {}", known.join(", ")),
                    )
                });
        }
        Ok(ModelConfig::default_for(family))
    }
}

/// A run: model, force mode, data, training.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// The model.
    pub model: ModelChoice,
    /// Direct or conservative forces.
    pub force_mode: ForceMode,
    /// The data.
    pub data: DataConfig,
    /// Training settings.
    pub train: TrainConfig,
}

impl RunConfig {
    /// Parses TOML text; `origin` names the file in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| TrainError::config(origin, format!(": {e}")))
    }

    /// Checks everything and resolves the model.
    pub fn resolve(&self) -> Result<ModelSpec> {
        self.data.check()?;
        self.train.check()?;
        let spec = ModelSpec {
            model: self.model.resolve(self.force_mode)?,
            force_mode: self.force_mode,
        };
        spec.check()?;
        Ok(spec)
    }

    /// Settings that are valid but probably not meant, one sentence each, for `spec` (this
    /// configuration's resolved model). `cargo xtask train` prints them before training.
    ///
    /// Today: an EquiformerV2 whose radial range (`max_radius`, the span of its 600 Gaussian
    /// distance features) differs from the neighbour-list cutoff. fairchem uses one value for
    /// both; the presets and the size ladder keep fairchem's 12 Å, which on 5 Å neighbour lists
    /// leaves most of the Gaussians unused.
    pub fn advisories(&self, spec: &ModelSpec) -> Vec<String> {
        let mut out = Vec::new();
        if let ModelConfig::EquiformerV2(c) = &spec.model {
            let cutoff = self.data.cutoff;
            if (c.max_radius - cutoff).abs() > 1e-9 * cutoff.max(1.0) {
                let effect = if c.max_radius > cutoff {
                    format!(
                        "{:.0}% of its Gaussian distance features lie beyond every edge",
                        100.0 * (c.max_radius - cutoff) / c.max_radius
                    )
                } else {
                    "edges longer than it all read the last Gaussians".to_string()
                };
                out.push(format!(
                    "equiformer_v2.max_radius is {} Å but the neighbour lists are built at {} Å: \
                     {effect}; fairchem uses one value for both (set `max_radius` in a \
                     `[model.config]` section, or the data `cutoff`)",
                    c.max_radius, cutoff
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use matscale_models::equiformer_v2::EquiformerV2Config;

    fn run_with(model: ModelConfig, cutoff: f64) -> (RunConfig, ModelSpec) {
        let run = RunConfig {
            model: ModelChoice {
                config: Some(model.clone()),
                ..ModelChoice::default()
            },
            force_mode: ForceMode::Direct,
            data: DataConfig {
                cutoff,
                ..DataConfig::default()
            },
            train: TrainConfig::default(),
        };
        let spec = ModelSpec {
            model,
            force_mode: ForceMode::Direct,
        };
        (run, spec)
    }

    #[test]
    fn equiformer_radial_range_off_the_cutoff_is_flagged() {
        let eqv2 = |r: f64| {
            ModelConfig::EquiformerV2(EquiformerV2Config {
                max_radius: r,
                ..EquiformerV2Config::default()
            })
        };
        let (run, spec) = run_with(eqv2(12.0), 5.0);
        let notes = run.advisories(&spec);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("12 Å") && notes[0].contains("5 Å") && notes[0].contains("58%"));
        let (run, spec) = run_with(eqv2(4.0), 5.0);
        assert!(run.advisories(&spec)[0].contains("last Gaussians"));
        let (run, spec) = run_with(eqv2(5.0), 5.0);
        assert!(run.advisories(&spec).is_empty());
        let schnet = ModelConfig::presets()
            .into_iter()
            .find(|(_, c)| !matches!(c, ModelConfig::EquiformerV2(_)))
            .map(|(_, c)| c)
            .expect("a non-EquiformerV2 preset");
        let (run, spec) = run_with(schnet, 5.0);
        assert!(run.advisories(&spec).is_empty());
    }
}
