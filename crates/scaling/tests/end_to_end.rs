//! A runs table written as the sweep writes it, analysed end to end:
//! fits, intervals, comparisons, frontier, fits.json, report.md and plots.

use std::fmt::Write as _;

use matscale_scaling::analysis::{analyse, AnalysisOptions};
use matscale_scaling::bootstrap::BootstrapOptions;
use matscale_scaling::power_law::SingleLaw;
use matscale_scaling::report::write_outputs;
use matscale_scaling::{InitGrid, JointFitOptions, JointParams, RunsTable};

fn truth(family: &str) -> JointParams {
    match family {
        "schnet" => JointParams {
            e: 0.8,
            a: 60.0,
            b: 25.0,
            alpha: 0.35,
            beta: 0.3,
        },
        _ => JointParams {
            e: 0.5,
            a: 90.0,
            b: 30.0,
            alpha: 0.4,
            beta: 0.35,
        },
    }
}

fn table_csv() -> String {
    let mut s = String::from(
        "model,params,train_structures,train_atoms,flops,val_loss,val_energy,val_force,val_stress,flops_per_param_sample,seed,precision\n",
    );
    let mut k = 0u32;
    for family in ["equiformer_v2", "schnet"] {
        let t = truth(family);
        for i in 0..5 {
            for j in 0..6 {
                let n = 2e3 * 5f64.powi(i);
                let d = 1e2 * 4f64.powi(j);
                k += 1;
                // deterministic ±1% "noise"
                let loss = t.predict(n, d) * (1.0 + 0.01 * ((k as f64) * 1.7).sin());
                let c = 18.0 * n * d;
                let _ = writeln!(
                    s,
                    "{family},{n},{d},{},{c},{loss},{},{},{},18,{k},f32",
                    30.0 * d,
                    0.1 * loss,
                    0.7 * loss,
                    0.2 * loss
                );
            }
        }
    }
    // A family with too few runs: reported as skipped, not an error.
    s.push_str("fcn,1000,100,3000,1.8e6,3.0,0.3,2.1,0.6,18,1,f32\n");
    s
}

#[test]
fn analysis_writes_a_complete_report() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("runs.csv");
    std::fs::write(&input, table_csv()).unwrap();
    let table = RunsTable::read(&input, None).unwrap();
    assert_eq!(table.len(), 61);
    assert_eq!(table.families(), vec!["equiformer_v2", "fcn", "schnet"]);
    let options = AnalysisOptions {
        bootstrap: BootstrapOptions {
            resamples: 40,
            seed: 3,
            level: 0.95,
        },
        // A reduced grid keeps the test fast; the full grid is tested on Chinchilla.
        joint_options: JointFitOptions {
            grid: InitGrid {
                alpha: vec![0.5],
                beta: vec![0.5],
                log_e: vec![-1.0, 0.0],
                log_a: vec![0.0, 5.0],
                log_b: vec![0.0, 5.0],
            },
            ..JointFitOptions::default()
        },
        // The study's reduction: the best model at each x.
        envelope: true,
        ..AnalysisOptions::default()
    };
    let a = analyse(&table, &options).unwrap();
    // 2 families × 3 variables × 2 laws.
    assert_eq!(a.single.len(), 12);
    assert_eq!(a.joint.len(), 2);
    assert!(
        a.skipped.iter().any(|s| s.group == "fcn"),
        "{:?}",
        a.skipped
    );
    for j in &a.joint {
        let t = truth(&j.group);
        let p = j.fit.params;
        assert!((p.alpha - t.alpha).abs() < 0.03, "{}: {p:?}", j.group);
        assert!((p.beta - t.beta).abs() < 0.03, "{}: {p:?}", j.group);
        assert!((j.k - 18.0).abs() < 1e-12);
        let alpha = &j.params[3].value;
        assert!(
            alpha.lower < alpha.estimate && alpha.estimate < alpha.upper,
            "{alpha:?}"
        );
        let (ea, eb) = p.allocation_exponents();
        assert!((j.n_opt_exponent.estimate - ea).abs() < 1e-15 && (ea + eb - 1.0).abs() < 1e-12);
    }
    // The best model at each D follows E' + B·D^-β with E' = E + A/N_max^α:
    // E + a·x^-b must win on data size.
    assert_eq!(a.single[0].fit.n_points, 6);
    for c in a.comparisons.iter().filter(|c| c.x.name() == "data") {
        assert_eq!(c.preferred, SingleLaw::PowerWithOffset, "{c:?}");
    }
    // Frontier: strictly decreasing loss with increasing compute.
    assert!(a
        .frontier
        .windows(2)
        .all(|w| w[0].flops < w[1].flops && w[0].loss > w[1].loss));

    let out = dir.path().join("out");
    let files = write_outputs(&a, &out).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("fits.json")).unwrap()).unwrap();
    assert_eq!(json["joint"].as_array().unwrap().len(), 2);
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in [
        "Which form do the data support?",
        "Compute-optimal",
        "not fitted: fcn",
        "frontier.png",
    ] {
        assert!(report.contains(needle), "report lacks {needle}");
    }
    for stem in [
        "loss_vs_data",
        "loss_vs_params",
        "loss_vs_compute",
        "residuals_data",
        "frontier",
        "joint_parity",
    ] {
        let png = std::fs::read(out.join(format!("{stem}.png"))).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{stem}.png");
        let svg = std::fs::read_to_string(out.join(format!("{stem}.svg"))).unwrap();
        assert!(
            svg.contains("<svg") && svg.contains("best validation loss")
                || stem.starts_with("residuals"),
            "{stem}.svg"
        );
    }
    assert!(files.len() >= 2 + 2 * 8);
    // No temporary files left behind.
    assert!(std::fs::read_dir(&out).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains(".tmp")));
}
