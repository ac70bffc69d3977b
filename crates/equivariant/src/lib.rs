//! # matscale-equivariant
//!
//! SO(3)-equivariant building blocks for EquiformerV2 (eSCN-style SO(2) convolutions) as candle
//! operations with gradients. (Being built: see the equivariant issue.)

pub mod activation;
pub mod buffer;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod error;
mod float_kernel;
pub mod frames;
pub mod frames_diff;
#[cfg(test)]
mod host_kernels;
pub mod linalg;
pub mod mapping;
pub mod norm_act;
pub mod norms;
pub mod radial;
mod radial_mlp;
pub mod s2grid;
pub mod segment;
pub mod sh;
pub mod so2;
mod so2_fused;
pub mod switch;
#[cfg(test)]
pub(crate) mod testing;
pub mod wigner;

/// Whether candle keeps the graph of backward passes (`CANDLE_GRAD_DO_NOT_DETACH` set and not
/// `0`, as `matscale_models::enable_higher_order_gradients` sets it), i.e. whether gradients
/// of gradients may be taken. Fused ops whose hand-written backward is first order use this to
/// fall back to differentiable compositions.
pub fn higher_order_gradients_requested() -> bool {
    std::env::var_os("CANDLE_GRAD_DO_NOT_DETACH").is_some_and(|v| !v.is_empty() && v != "0")
}
