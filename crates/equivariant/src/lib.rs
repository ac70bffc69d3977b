//! # matscale-equivariant
//!
//! SO(3)-equivariant building blocks for EquiformerV2 (eSCN-style SO(2) convolutions) as candle
//! operations with gradients. (Being built: see the equivariant issue.)
