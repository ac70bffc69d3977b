//! Model configurations: one serde-tagged enum over the families, each family's config
//! implementing [`Architecture`] (validation, exact parameter count, size ladder, presets,
//! construction).
//!
//! In TOML a model is written with its family tag, e.g.
//! ```toml
//! [model]
//! family = "schnet"
//! hidden_channels = 128
//! ```

use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::equiformer_v2::EquiformerV2Config;
use crate::error::{ModelError, Result};
use crate::fcn::FcnConfig;
use crate::model::{ForceMode, Model};
use crate::schnet::SchNetConfig;
use crate::transformer::TransformerConfig;

/// A model family of the zoo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// Fully connected net on padded atoms ([`crate::fcn`]).
    Fcn,
    /// All-atom Transformer ([`crate::transformer`]).
    Transformer,
    /// SchNet ([`crate::schnet`]).
    Schnet,
    /// EquiformerV2 ([`crate::equiformer_v2`]).
    EquiformerV2,
}

impl Family {
    /// Every family, in a stable order.
    pub const ALL: [Family; 4] = [
        Family::Fcn,
        Family::Transformer,
        Family::Schnet,
        Family::EquiformerV2,
    ];

    /// The name used in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Family::Fcn => "fcn",
            Family::Transformer => "transformer",
            Family::Schnet => "schnet",
            Family::EquiformerV2 => "equiformer_v2",
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Family {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        Family::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                let known: Vec<_> = Family::ALL.iter().map(|f| f.name()).collect();
                ModelError::config(
                    "model",
                    format!("is `{s}`; expected one of {}", known.join(", ")),
                )
            })
    }
}

/// What every family's configuration provides.
pub trait Architecture: Sized + Clone {
    /// The family.
    const FAMILY: Family;

    /// Checks every field; the error names the field.
    fn check(&self) -> Result<()>;

    /// Exact number of trained parameters of the model built in `mode` (equal to the sum of
    /// the sizes of its weight tensors).
    fn n_parameters(&self, mode: ForceMode) -> usize;

    /// The size ladder: a configuration with a parameter count within 10% of `target`
    /// (documented rule per family), for targets from about 10^3 to 10^8.
    fn for_parameters(target: usize, mode: ForceMode) -> Result<Self>;

    /// Named sizes (the study's grid and common configurations).
    fn presets() -> Vec<(&'static str, Self)>;

    /// Builds the network with weights from `vb`.
    fn build(&self, mode: ForceMode, vb: VarBuilder) -> Result<Box<dyn Model>>;

    /// A label for reports (the family name, or a variant such as `transformer_distance`).
    fn label(&self) -> String {
        Self::FAMILY.to_string()
    }
}

/// The configuration of any model of the zoo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "family", rename_all = "snake_case")]
// A configuration is built a handful of times per run; boxing the large variant would only
// complicate construction.
#[allow(clippy::large_enum_variant)]
pub enum ModelConfig {
    /// A fully connected net.
    Fcn(FcnConfig),
    /// A Transformer.
    Transformer(TransformerConfig),
    /// SchNet.
    Schnet(SchNetConfig),
    /// EquiformerV2.
    EquiformerV2(EquiformerV2Config),
}

macro_rules! dispatch {
    ($self:expr, $c:ident => $body:expr) => {
        match $self {
            ModelConfig::Fcn($c) => $body,
            ModelConfig::Transformer($c) => $body,
            ModelConfig::Schnet($c) => $body,
            ModelConfig::EquiformerV2($c) => $body,
        }
    };
}

impl ModelConfig {
    /// The family.
    pub fn family(&self) -> Family {
        match self {
            ModelConfig::Fcn(_) => Family::Fcn,
            ModelConfig::Transformer(_) => Family::Transformer,
            ModelConfig::Schnet(_) => Family::Schnet,
            ModelConfig::EquiformerV2(_) => Family::EquiformerV2,
        }
    }

    /// A label for reports.
    pub fn label(&self) -> String {
        dispatch!(self, c => c.label())
    }

    /// Checks every field.
    pub fn check(&self) -> Result<()> {
        dispatch!(self, c => c.check())
    }

    /// Exact number of trained parameters in `mode`.
    pub fn n_parameters(&self, mode: ForceMode) -> usize {
        dispatch!(self, c => c.n_parameters(mode))
    }

    /// Builds the network.
    pub fn build(&self, mode: ForceMode, vb: VarBuilder) -> Result<Box<dyn Model>> {
        dispatch!(self, c => c.build(mode, vb))
    }

    /// The family's size-ladder configuration for about `target` parameters.
    pub fn for_parameters(family: Family, target: usize, mode: ForceMode) -> Result<Self> {
        Ok(match family {
            Family::Fcn => ModelConfig::Fcn(FcnConfig::for_parameters(target, mode)?),
            Family::Transformer => {
                ModelConfig::Transformer(TransformerConfig::for_parameters(target, mode)?)
            }
            Family::Schnet => ModelConfig::Schnet(SchNetConfig::for_parameters(target, mode)?),
            Family::EquiformerV2 => ModelConfig::EquiformerV2(
                <EquiformerV2Config as Architecture>::for_parameters(target, mode)?,
            ),
        })
    }

    /// The named presets of every family, as `family/name`.
    pub fn presets() -> Vec<(String, ModelConfig)> {
        let mut out = Vec::new();
        for (name, c) in FcnConfig::presets() {
            out.push((format!("fcn/{name}"), ModelConfig::Fcn(c)));
        }
        for (name, c) in TransformerConfig::presets() {
            out.push((format!("transformer/{name}"), ModelConfig::Transformer(c)));
        }
        for (name, c) in SchNetConfig::presets() {
            out.push((format!("schnet/{name}"), ModelConfig::Schnet(c)));
        }
        for (name, c) in <EquiformerV2Config as Architecture>::presets() {
            out.push((
                format!("equiformer_v2/{name}"),
                ModelConfig::EquiformerV2(c),
            ));
        }
        out
    }

    /// The default configuration of `family`.
    pub fn default_for(family: Family) -> Self {
        match family {
            Family::Fcn => ModelConfig::Fcn(FcnConfig::default()),
            Family::Transformer => ModelConfig::Transformer(TransformerConfig::default()),
            Family::Schnet => ModelConfig::Schnet(SchNetConfig::default()),
            Family::EquiformerV2 => ModelConfig::EquiformerV2(EquiformerV2Config::default()),
        }
    }
}
