//! # matscale-scaling
//!
//! Scaling-law fits for neural material models. (Being built: see the scaling issue.)
