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
