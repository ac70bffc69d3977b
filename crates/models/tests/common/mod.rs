//! Shared test harness for the model families: random periodic structures, symmetry
//! operations, prediction on the host and finite differences.
#![allow(dead_code)]

use candle_core::{DType, Device};
use candle_nn::VarMap;
use matscale_models::{AtomisticModel, BatchTensors, ModelSpec};
use matscale_structures::batch::{GraphBatch, GraphOptions};
use matscale_structures::{Mat3, Structure};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Host copies of a prediction.
#[derive(Debug, Clone)]
pub struct HostPrediction {
    /// Energy per structure, eV.
    pub energy: Vec<f64>,
    /// Forces per structure, eV/Å.
    pub forces: Vec<Vec<[f64; 3]>>,
    /// Stress per structure, eV/Å^3.
    pub stress: Vec<Mat3>,
}

/// `n` small periodic structures (4–8 atoms of Cu, Ni, Al, O) in skewed cells, seeded.
pub fn random_structures(n: usize, seed: u64) -> Vec<Structure> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let elements = [29u8, 28, 13, 8];
    (0..n)
        .map(|_| {
            let atoms = rng.gen_range(4..=8);
            let a = 4.0 + rng.gen::<f64>();
            let cell = [
                [a, 0.0, 0.0],
                [
                    0.3 * rng.gen::<f64>(),
                    a * (0.9 + 0.2 * rng.gen::<f64>()),
                    0.0,
                ],
                [
                    0.3 * rng.gen::<f64>(),
                    0.3 * rng.gen::<f64>(),
                    a * (0.9 + 0.2 * rng.gen::<f64>()),
                ],
            ];
            // Atoms on a jittered sub-grid so that no two atoms come too close.
            let mut positions = Vec::with_capacity(atoms);
            for k in 0..atoms {
                let f = [
                    (k % 2) as f64 * 0.5 + 0.1 * rng.gen::<f64>(),
                    ((k / 2) % 2) as f64 * 0.5 + 0.1 * rng.gen::<f64>(),
                    (k / 4) as f64 * 0.5 + 0.1 * rng.gen::<f64>(),
                ];
                positions.push(frac_to_cart(&f, &cell));
            }
            let numbers = (0..atoms)
                .map(|_| elements[rng.gen_range(0..elements.len())])
                .collect();
            Structure::new(numbers, positions, cell, [true; 3]).expect("valid random structure")
        })
        .collect()
}

fn frac_to_cart(f: &[f64; 3], cell: &Mat3) -> [f64; 3] {
    let mut r = [0.0; 3];
    for (k, fk) in f.iter().enumerate() {
        for c in 0..3 {
            r[c] += fk * cell[k][c];
        }
    }
    r
}

/// A random rotation matrix (proper, det +1), seeded.
pub fn random_rotation(seed: u64) -> Mat3 {
    matscale_structures::structure::random_rotation(&mut ChaCha8Rng::seed_from_u64(seed))
}

/// `R v`.
pub fn apply(r: &Mat3, v: &[f64; 3]) -> [f64; 3] {
    let mut out = [0.0; 3];
    for i in 0..3 {
        for j in 0..3 {
            out[i] += r[i][j] * v[j];
        }
    }
    out
}

/// `R S Rᵀ`.
pub fn rotate_tensor(r: &Mat3, s: &Mat3) -> Mat3 {
    let mut out = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            for k in 0..3 {
                for l in 0..3 {
                    out[i][j] += r[i][k] * s[k][l] * r[j][l];
                }
            }
        }
    }
    out
}

/// The structure rotated by `r` (positions and lattice vectors).
pub fn rotate(s: &Structure, r: &Mat3) -> Structure {
    let positions = s.positions().iter().map(|p| apply(r, p)).collect();
    let cell = [
        apply(r, &s.cell()[0]),
        apply(r, &s.cell()[1]),
        apply(r, &s.cell()[2]),
    ];
    Structure::new(s.numbers().to_vec(), positions, cell, s.pbc()).expect("rotation keeps validity")
}

/// The structure translated by `t`.
pub fn translate(s: &Structure, t: [f64; 3]) -> Structure {
    let positions = s
        .positions()
        .iter()
        .map(|p| [p[0] + t[0], p[1] + t[1], p[2] + t[2]])
        .collect();
    Structure::new(s.numbers().to_vec(), positions, *s.cell(), s.pbc()).expect("valid")
}

/// The structure with its atoms in the order `perm` (new atom k = old atom perm[k]).
pub fn permute(s: &Structure, perm: &[usize]) -> Structure {
    let numbers = perm.iter().map(|&k| s.numbers()[k]).collect();
    let positions = perm.iter().map(|&k| s.positions()[k]).collect();
    Structure::new(numbers, positions, *s.cell(), s.pbc()).expect("valid")
}

/// The structure deformed by `1 + eps` (positions and cell).
pub fn strain(s: &Structure, eps: &Mat3) -> Structure {
    let deform = |v: &[f64; 3]| {
        let mut out = *v;
        for c in 0..3 {
            for k in 0..3 {
                out[c] += v[k] * eps[k][c];
            }
        }
        out
    };
    let positions = s.positions().iter().map(deform).collect();
    let cell = [
        deform(&s.cell()[0]),
        deform(&s.cell()[1]),
        deform(&s.cell()[2]),
    ];
    Structure::new(s.numbers().to_vec(), positions, cell, s.pbc()).expect("valid")
}

/// Seed of the test weights: fixed, so that every test sees the same model on every run.
pub const WEIGHT_SEED: u64 = 7;

/// Builds `spec` with seeded random weights in `dtype` (network and normaliser alike).
pub fn build(spec: &ModelSpec, dtype: DType) -> (VarMap, AtomisticModel) {
    let varmap = VarMap::new();
    let vb = matscale_models::seeded_var_builder(&varmap, WEIGHT_SEED, dtype, &Device::Cpu);
    let model = AtomisticModel::new(spec, vb.clone(), vb).expect("model builds");
    (varmap, model)
}

/// Builds `spec` with bf16/f16 network weights and f32 master normaliser.
pub fn build_mixed(spec: &ModelSpec, weights: DType) -> (VarMap, VarMap, AtomisticModel) {
    let net = VarMap::new();
    let master = VarMap::new();
    let model = AtomisticModel::new(
        spec,
        matscale_models::seeded_var_builder(&net, WEIGHT_SEED, weights, &Device::Cpu),
        matscale_models::seeded_var_builder(&master, WEIGHT_SEED, DType::F32, &Device::Cpu),
    )
    .expect("model builds");
    (net, master, model)
}

/// Predicts `structures` as one batch with neighbour lists at `cutoff` Å.
pub fn predict(model: &AtomisticModel, structures: &[Structure], cutoff: f64) -> HostPrediction {
    let batch = GraphBatch::new(structures, &GraphOptions::new(cutoff)).expect("batch");
    let tensors = BatchTensors::new(&batch, model.dtype(), &Device::Cpu).expect("tensors");
    let p = model.predict(&tensors, false).expect("prediction");
    let energy: Vec<f64> = p.energy.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
    let forces: Vec<Vec<f64>> = p.forces.to_dtype(DType::F64).unwrap().to_vec2().unwrap();
    let stress: Vec<Vec<Vec<f64>>> = p.stress.to_dtype(DType::F64).unwrap().to_vec3().unwrap();
    let mut per_structure = Vec::new();
    for w in batch.node_ptr.windows(2) {
        per_structure.push(
            forces[w[0]..w[1]]
                .iter()
                .map(|f| [f[0], f[1], f[2]])
                .collect(),
        );
    }
    HostPrediction {
        energy,
        forces: per_structure,
        stress: stress
            .iter()
            .map(|m| {
                [
                    [m[0][0], m[0][1], m[0][2]],
                    [m[1][0], m[1][1], m[1][2]],
                    [m[2][0], m[2][1], m[2][2]],
                ]
            })
            .collect(),
    }
}

/// Energy of one structure.
pub fn energy(model: &AtomisticModel, s: &Structure, cutoff: f64) -> f64 {
    predict(model, std::slice::from_ref(s), cutoff).energy[0]
}

/// Central finite-difference forces `−∂E/∂r` with step `h` Å.
pub fn fd_forces(model: &AtomisticModel, s: &Structure, cutoff: f64, h: f64) -> Vec<[f64; 3]> {
    let mut out = vec![[0.0; 3]; s.len()];
    for atom in 0..s.len() {
        for c in 0..3 {
            let shifted = |delta: f64| {
                let mut positions = s.positions().to_vec();
                positions[atom][c] += delta;
                let mut t = s.clone();
                t.set_positions(positions).unwrap();
                energy(model, &t, cutoff)
            };
            out[atom][c] = -(shifted(h) - shifted(-h)) / (2.0 * h);
        }
    }
    out
}

/// Central finite-difference stress `(1/V) ∂E/∂ε` under symmetric strain with step `h`.
pub fn fd_stress(model: &AtomisticModel, s: &Structure, cutoff: f64, h: f64) -> Mat3 {
    let mut out = [[0.0; 3]; 3];
    for a in 0..3 {
        for b in 0..3 {
            let strained = |delta: f64| {
                let mut eps = [[0.0; 3]; 3];
                eps[a][b] += 0.5 * delta;
                eps[b][a] += 0.5 * delta;
                energy(model, &strain(s, &eps), cutoff)
            };
            out[a][b] = (strained(h) - strained(-h)) / (2.0 * h) / s.volume();
        }
    }
    out
}

/// Largest absolute difference between two flat sequences.
pub fn max_abs_diff<'a>(
    a: impl IntoIterator<Item = &'a f64>,
    b: impl IntoIterator<Item = &'a f64>,
) -> f64 {
    a.into_iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Largest absolute value of a flat sequence.
pub fn max_abs<'a>(a: impl IntoIterator<Item = &'a f64>) -> f64 {
    a.into_iter().map(|x| x.abs()).fold(0.0, f64::max)
}

/// Flattens forces.
pub fn flat_forces(f: &[[f64; 3]]) -> Vec<f64> {
    f.iter().flatten().copied().collect()
}

/// Flattens a 3×3 matrix.
pub fn flat_mat(m: &Mat3) -> Vec<f64> {
    m.iter().flatten().copied().collect()
}
