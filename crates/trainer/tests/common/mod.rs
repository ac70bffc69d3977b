//! Shared by the trainer's tests: EMT-labelled alloys and the tiny EquiformerV2.
// Each test binary uses part of it.
#![allow(dead_code)]

use matscale_models::equiformer_v2::{EquiformerV2Config, FrameRoll};
use matscale_structures::emt::Emt;
use matscale_structures::generate::AlloyGenerator;
use matscale_structures::Structure;

/// `n` EMT-labelled 4-atom alloys (the conventional fcc cell, strained and rattled).
pub fn alloys(n: u64, seed: u64) -> Vec<Structure> {
    AlloyGenerator {
        elements: vec!["Cu".into(), "Ni".into(), "Pd".into()],
        min_elements: 2,
        max_elements: 2,
        supercells: vec![[1, 1, 1]],
        seed,
        ..Default::default()
    }
    .check()
    .unwrap()
    .generate_labelled(0..n, &Emt::new())
    .unwrap()
}

/// The smallest EquiformerV2 that still has every part of the architecture: one layer,
/// `lmax 2`, `mmax 1`, 8 sphere channels, a 5 Å radial range (the data's cutoff), no dropout,
/// zero frame roll (a deterministic function of the geometry).
pub fn tiny() -> EquiformerV2Config {
    EquiformerV2Config {
        num_layers: 1,
        sphere_channels: 8,
        attn_hidden_channels: 8,
        num_heads: 2,
        attn_alpha_channels: 4,
        attn_value_channels: 4,
        ffn_hidden_channels: 8,
        edge_channels: 8,
        lmax_list: vec![2],
        mmax_list: vec![1],
        grid_resolution: 0,
        max_radius: 5.0,
        max_num_elements: 50,
        avg_num_nodes: 4.0,
        avg_degree: 40.0,
        alpha_drop: 0.0,
        drop_path_rate: 0.0,
        frame_roll: FrameRoll::Zero,
        ..EquiformerV2Config::default()
    }
}
