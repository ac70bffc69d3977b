//! Reproduction of Besiroglu et al. (2024) on the Chinchilla points
//! (tests/data/chinchilla): the joint fit with the full 4500-start grid and
//! the bootstrap intervals of α and β.

use std::path::Path;

use matscale_scaling::bootstrap::BootstrapOptions;
use matscale_scaling::chinchilla::{bootstrap_joint, joint_objective, refit_starts, RefitStarts};
use matscale_scaling::{fit_joint, JointFitOptions, JointParams, RunsTable};

const DATA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/data/chinchilla/chinchilla_svg_extracted_data.csv"
);

fn data() -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let table = RunsTable::read(Path::new(DATA), None).unwrap();
    assert_eq!(table.len(), 245);
    assert_eq!(table.data_unit(), "tokens");
    let (kept, dropped) = table.exclude_top_loss(5).unwrap();
    assert_eq!(kept.len(), 240);
    assert!(dropped.iter().all(|r| r.val_loss > 3.4));
    let n = kept.runs().iter().map(|r| r.params).collect();
    let d = kept.runs().iter().map(|r| r.train_structures).collect();
    let l = kept.runs().iter().map(|r| r.val_loss).collect();
    (n, d, l)
}

fn rel(got: f64, want: f64) -> f64 {
    (got / want - 1.0).abs()
}

#[test]
fn joint_fit_reproduces_besiroglu_with_the_full_grid() {
    let (n, d, l) = data();
    let options = JointFitOptions::default();
    assert_eq!(options.grid.len(), 4500);
    let fit = fit_joint(&n, &d, &l, &options).unwrap();
    let p = fit.params;
    // Besiroglu et al.: E = 1.817, α = 0.3478, β = 0.3659 (to 1%),
    // A = 482.01, B = 2085.43 (to 5%: the objective is flat along A–B).
    assert!(rel(p.e, 1.817) < 0.01, "{p:?}");
    assert!(rel(p.alpha, 0.3478) < 0.01, "{p:?}");
    assert!(rel(p.beta, 0.3659) < 0.01, "{p:?}");
    assert!(rel(p.a, 482.01) < 0.05, "{p:?}");
    assert!(rel(p.b, 2085.43) < 0.05, "{p:?}");
    assert!(fit.objective <= 0.001019, "objective {}", fit.objective);
    // No worse than Besiroglu's own parameters on the same objective.
    let theirs = JointParams {
        e: 1.817,
        a: 482.01,
        b: 2085.43,
        alpha: 0.3478,
        beta: 0.3659,
    };
    let their_objective = joint_objective(&n, &d, &l, &theirs, 1e-3).unwrap();
    assert!(
        fit.objective <= their_objective,
        "{} vs {their_objective}",
        fit.objective
    );
    assert!(
        fit.starts_at_best > 10,
        "basin reached by {} starts",
        fit.starts_at_best
    );
    assert_eq!(fit.starts_failed, 0);
}

#[test]
fn bootstrap_intervals_match_besiroglu() {
    let (n, d, l) = data();
    // The full-data optimum, found from a small grid around the basin (the
    // full-grid path is exercised by the test above).
    let options = JointFitOptions {
        grid: matscale_scaling::InitGrid {
            alpha: vec![0.5],
            beta: vec![0.5],
            log_e: vec![0.5],
            log_a: vec![5.0, 10.0],
            log_b: vec![5.0, 10.0],
        },
        ..JointFitOptions::default()
    };
    let fit = fit_joint(&n, &d, &l, &options).unwrap();
    assert!(fit.objective <= 0.001019);
    let starts = refit_starts(&fit.params, RefitStarts::Optimum, &options.grid);
    let boot = bootstrap_joint(
        &n,
        &d,
        &l,
        &starts,
        &options,
        BootstrapOptions {
            resamples: 1000,
            seed: 0,
            level: 0.95,
        },
    )
    .unwrap();
    assert_eq!(boot.failed, 0);
    let alpha = boot.interval(3, fit.params.alpha);
    let beta = boot.interval(4, fit.params.beta);
    // Besiroglu et al. (4000 resamples): α (0.317, 0.373), β (0.331, 0.415).
    for (got, want, name) in [
        (alpha.lower, 0.317, "alpha lower"),
        (alpha.upper, 0.373, "alpha upper"),
        (beta.lower, 0.331, "beta lower"),
        (beta.upper, 0.415, "beta upper"),
    ] {
        assert!((got - want).abs() < 0.01, "{name}: {got} vs {want}");
    }
}
