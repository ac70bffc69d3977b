//! # matscale-equivariant
//!
//! SO(3)-equivariant building blocks for EquiformerV2 (eSCN-style SO(2) convolutions) as candle
//! operations with gradients. (Being built: see the equivariant issue.)

pub mod activation;
pub(crate) mod buffer;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod error;
pub mod frames;
pub mod frames_diff;
pub mod mapping;
pub mod norm_act;
pub mod norms;
pub mod radial;
pub mod s2grid;
pub mod segment;
pub mod sh;
pub mod so2;
mod so2_fused;
#[cfg(test)]
pub(crate) mod testing;
pub mod wigner;
