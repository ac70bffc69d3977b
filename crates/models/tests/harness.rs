//! Checks of the shared test harness itself and of the model-independent physics of
//! `AtomisticModel` (strain geometry, second derivatives).

mod common;

use common::*;

#[test]
fn random_rotation_is_orthonormal_with_unit_determinant() {
    for seed in 0..5 {
        let r = random_rotation(seed);
        for i in 0..3 {
            for j in 0..3 {
                let dot: f64 = (0..3).map(|k| r[i][k] * r[j][k]).sum();
                let expected = if i == j { 1.0 } else { 0.0 };
                assert!((dot - expected).abs() < 1e-14);
            }
        }
        let det = r[0][0] * (r[1][1] * r[2][2] - r[1][2] * r[2][1])
            - r[0][1] * (r[1][0] * r[2][2] - r[1][2] * r[2][0])
            + r[0][2] * (r[1][0] * r[2][1] - r[1][1] * r[2][0]);
        assert!((det - 1.0).abs() < 1e-14);
    }
}

#[test]
fn random_structures_have_no_close_contacts() {
    for s in random_structures(20, 3) {
        let list = matscale_structures::batch::GraphOptions::new(1.2)
            .neighbor_list(&s)
            .unwrap();
        assert_eq!(list.len(), 0, "atoms closer than 1.2 Å");
    }
}

#[test]
fn second_derivatives_are_available_after_enabling() {
    matscale_models::enable_higher_order_gradients().unwrap();
    assert!(matscale_models::model::higher_order_gradients_work().unwrap());
}

#[test]
fn flops_without_weights_equal_flops_of_the_built_model() {
    use matscale_models::{BatchShape, Family, ForceMode, ModelConfig, ModelSpec};
    let shape = BatchShape {
        n_structures: 3,
        n_nodes: 40,
        n_edges: 900,
        sum_sq_nodes: 600,
        max_nodes: 16,
    };
    for family in Family::ALL {
        for mode in [ForceMode::Direct, ForceMode::Conservative] {
            if family == Family::EquiformerV2 && mode == ForceMode::Conservative {
                // Not supported yet: fairchem's edge frames carry no gradient.
                continue;
            }
            let spec = ModelSpec {
                model: ModelConfig::for_parameters(family, 20_000, mode).unwrap(),
                force_mode: mode,
            };
            let (_, model) = build(&spec, candle_core::DType::F32);
            assert_eq!(
                spec.flops(&shape).unwrap(),
                model.flops(&shape),
                "{family} {mode}"
            );
        }
    }
    // A 10^8-parameter configuration is costed without allocating its weights.
    let big = ModelSpec {
        model: ModelConfig::for_parameters(Family::Schnet, 100_000_000, ForceMode::Direct).unwrap(),
        force_mode: ForceMode::Direct,
    };
    assert!(big.flops(&shape).unwrap().training_step() > 1e9);
}
