//! Edge frames: per-edge rotations taking the edge direction to +y, and their Wigner-D blocks.
//!
//! # fairchem's construction (`init_edge_rot_mat`, fairchem-core 1.x `equiformer_v2`)
//!
//! For an edge vector `e` and a helper vector `h` (fairchem draws `h = rand(3) - 0.5`,
//! uniform in the cube `[-0.5, 0.5)³`, per edge):
//!
//! 1. `x̂ = e / |e|`, `h ← h / |h|`;
//! 2. two 90° turns of the normalised helper, `h_b = (-h_y, h_x, h_z)` and
//!    `h_c = (h_x, -h_z, h_y)`: `h` is
//!    replaced by `h_b` if `|h·x̂| > |h_b·x̂|`, then by `h_c` if `|h·x̂| > |h_c·x̂|` (so that `h`
//!    is far from parallel to the edge); `|h·x̂| < 0.99` is required;
//! 3. `ẑ = normalise(x̂ × h)`, `ŷ = normalise(x̂ × ẑ)`;
//! 4. the frame rotation `R` has the rows `(ẑ, x̂, -ŷ)`, so `R x̂ = +y`, and `det R = +1`.
//!
//! The Wigner-D blocks of the edge are `D^l(R)` ([`crate::wigner::wigner_d`]; fairchem's
//! `RotationToWignerDMatrix` computes the same matrices through e3nn's angles of `R`). The
//! helper vector only sets the roll of the frame about the edge. To reproduce fairchem outputs,
//! pass the helper vectors fairchem drew (`torch.rand_like(edge_vec) - 0.5`, before its
//! normalisation) as [`Roll::Helpers`]. [`Roll::Random`] draws helpers with the same
//! distribution from a seeded ChaCha8 generator (three `f64` draws per edge, in edge order);
//! [`Roll::Zero`] is deterministic and needs no helper: `R = (R_y(α) R_x(β))ᵀ` with `(α, β)` the
//! e3nn angles of the edge direction (zero roll γ = 0 in the Euler angles of `Rᵀ`).
//!
//! Frames carry no gradient: the blocks are built from detached values.
//!
//! # Example
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use matscale_equivariant::frames::{edge_wigner, Roll};
//!
//! # fn main() -> matscale_equivariant::error::Result<()> {
//! let edge_vec = Tensor::new(&[[1.0f64, 2.0, -0.5], [0.0, 0.0, 3.0]], &Device::Cpu)?;
//! let blocks = edge_wigner(&edge_vec, 4, &Roll::Random { seed: 7 })?;
//! assert_eq!(blocks.blocks().dims(), &[2, 1 + 9 + 25 + 49 + 81]);
//! // Block l = 1 is the rotation itself: it maps the first edge direction to +y.
//! let row: Vec<f64> = blocks.blocks().get(0)?.to_vec1()?;
//! let d1 = &row[1..10];
//! let e = [1.0, 2.0, -0.5];
//! let n = (1.0f64 + 4.0 + 0.25).sqrt();
//! let y: f64 = (0..3).map(|j| d1[3 + j] * e[j] / n).sum();
//! assert!((y - 1.0).abs() < 1e-12);
//! # Ok(())
//! # }
//! ```

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::error::{EquivariantError, Result};
use crate::wigner::{matrix_to_angles, WignerBlocks};

/// How the roll of each edge frame about its edge is chosen.
#[derive(Debug, Clone, Copy)]
pub enum Roll<'a> {
    /// fairchem's random helper vectors, given by the caller (`[E, 3]`, any float dtype): the
    /// values `torch.rand_like(edge_vec) - 0.5` that fairchem drew, to reproduce its frames.
    Helpers(&'a Tensor),
    /// Helper vectors drawn uniformly from `[-0.5, 0.5)³` by ChaCha8 seeded with `seed`.
    Random {
        /// Seed of the generator.
        seed: u64,
    },
    /// Deterministic frames without helper: `R = (R_y(α) R_x(β))ᵀ`, zero roll.
    Zero,
}

/// Largest `|h·x̂|` accepted after the 90° turns (fairchem asserts the same bound).
const MAX_ALIGNMENT: f64 = 0.99;

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

fn normalised(v: [f64; 3]) -> [f64; 3] {
    let n = dot(v, v).sqrt();
    v.map(|x| x / n)
}

fn unit_edge(index: usize, e: [f64; 3]) -> Result<[f64; 3]> {
    let n = dot(e, e).sqrt();
    if !n.is_finite() || n == 0.0 {
        return Err(EquivariantError::DegenerateEdge {
            index,
            reason: format!(
                "edge vector {e:?} has length {n}; a frame needs a finite non-zero vector"
            ),
        });
    }
    Ok(e.map(|x| x / n))
}

/// fairchem's frame for one edge and helper vector (see the module docs).
fn fairchem_frame(index: usize, edge: [f64; 3], helper: [f64; 3]) -> Result<[[f64; 3]; 3]> {
    let x = unit_edge(index, edge)?;
    let hn = dot(helper, helper).sqrt();
    if !hn.is_finite() || hn == 0.0 {
        return Err(EquivariantError::DegenerateEdge {
            index,
            reason: format!("helper vector {helper:?} has length {hn}"),
        });
    }
    let h0 = helper.map(|v| v / hn);
    // Both turns are of the original helper, as in fairchem.
    let hb = [-h0[1], h0[0], h0[2]];
    let hc = [h0[0], -h0[2], h0[1]];
    let mut h = h0;
    if dot(h, x).abs() > dot(hb, x).abs() {
        h = hb;
    }
    if dot(h, x).abs() > dot(hc, x).abs() {
        h = hc;
    }
    let alignment = dot(h, x).abs();
    if alignment >= MAX_ALIGNMENT {
        return Err(EquivariantError::DegenerateEdge {
            index,
            reason: format!(
                "helper vector {helper:?} is aligned with the edge (|cos| = {alignment:.4})"
            ),
        });
    }
    let z = normalised(cross(x, h));
    let y = normalised(cross(x, z));
    Ok([z, x, y.map(|v| -v)])
}

/// Zero-roll frame: `(R_y(α) R_x(β))ᵀ` with `(α, β)` the e3nn angles of the edge direction.
fn zero_roll_frame(index: usize, edge: [f64; 3]) -> Result<[[f64; 3]; 3]> {
    let x = unit_edge(index, edge)?;
    let beta = (x[0] * x[0] + x[2] * x[2]).sqrt().atan2(x[1]);
    let alpha = if x[0] == 0.0 && x[2] == 0.0 {
        0.0
    } else {
        x[0].atan2(x[2])
    };
    let m = crate::wigner::angles_to_matrix(alpha, beta, 0.0);
    Ok([0, 1, 2].map(|i| [0, 1, 2].map(|j| m[j][i])))
}

fn rows_f64(t: &Tensor, arg: &'static str) -> Result<Vec<[f64; 3]>> {
    match t.dims() {
        [_, 3] => {}
        found => {
            return Err(EquivariantError::ShapeMismatch {
                arg,
                expected: "[num_edges, 3]".into(),
                found: found.to_vec(),
            })
        }
    }
    if !t.dtype().is_float() {
        return Err(EquivariantError::UnsupportedDType {
            arg,
            found: t.dtype(),
        });
    }
    let v: Vec<f64> = t.detach().to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    Ok(v.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect())
}

/// The frame rotations of `edge_vec` (`[E, 3]`): `R_e` maps the direction of edge `e` to +y.
///
/// # Errors
/// [`EquivariantError::ShapeMismatch`] if `edge_vec` (or the helpers) are not `[E, 3]`,
/// [`EquivariantError::DegenerateEdge`] for a zero or non-finite edge vector, or a helper vector
/// that is zero or aligned with its edge.
pub fn edge_rotations(edge_vec: &Tensor, roll: &Roll<'_>) -> Result<Vec<[[f64; 3]; 3]>> {
    let edges = rows_f64(edge_vec, "edge_vec")?;
    let helpers: Option<Vec<[f64; 3]>> = match roll {
        Roll::Helpers(t) => {
            let h = rows_f64(t, "helpers")?;
            if h.len() != edges.len() {
                return Err(EquivariantError::ShapeMismatch {
                    arg: "helpers",
                    expected: format!("[{}, 3] (one helper per edge)", edges.len()),
                    found: t.dims().to_vec(),
                });
            }
            Some(h)
        }
        Roll::Random { seed } => {
            let mut rng = ChaCha8Rng::seed_from_u64(*seed);
            Some(
                (0..edges.len())
                    .map(|_| [0, 1, 2].map(|_| rng.gen::<f64>() - 0.5))
                    .collect(),
            )
        }
        Roll::Zero => None,
    };
    match helpers {
        Some(h) => edges
            .par_iter()
            .zip(h.par_iter())
            .enumerate()
            .map(|(i, (e, h))| fairchem_frame(i, *e, *h))
            .collect(),
        None => edges
            .par_iter()
            .enumerate()
            .map(|(i, e)| zero_roll_frame(i, *e))
            .collect(),
    }
}

/// Per-edge Wigner-D blocks `D^l(R_e)`, `l = 0..=lmax`, of the edge frames (see
/// [`edge_rotations`]), in the dtype of `edge_vec` (f32 or f64) and detached.
///
/// `D^l(R_e) Y^l(e) = Y^l(+y |e|)`: rotating an embedding with these blocks expresses it in the
/// edge frame (fairchem's `SO3_Rotation.rotate`); [`WignerBlocks::inverse`] rotates back.
///
/// # Errors
/// As [`edge_rotations`], plus [`EquivariantError::InvalidDegree`] for `lmax > 11` and
/// [`EquivariantError::UnsupportedDType`] unless `edge_vec` is f32 or f64.
pub fn edge_wigner(edge_vec: &Tensor, lmax: usize, roll: &Roll<'_>) -> Result<WignerBlocks> {
    let dtype = edge_vec.dtype();
    if !matches!(dtype, DType::F32 | DType::F64) {
        return Err(EquivariantError::UnsupportedDType {
            arg: "edge_vec",
            found: dtype,
        });
    }
    #[cfg(feature = "cuda")]
    if edge_vec.device().is_cuda() {
        return crate::cuda::wigner::edge_wigner(edge_vec, lmax, roll);
    }
    let rotations = edge_rotations(edge_vec, roll)?;
    let angles: Vec<_> = rotations.par_iter().map(matrix_to_angles).collect();
    WignerBlocks::from_angles(&angles, lmax, dtype, edge_vec.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sh::{num_coefficients, spherical_harmonics_f64, Normalization};
    use crate::testing::{assert_close_slice, random_normals, Fixture};
    use crate::wigner::{block_offset, blocks_len};
    use candle_core::Device;

    fn edges_tensor(e: &[[f64; 3]]) -> Tensor {
        let flat: Vec<f64> = e.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (e.len(), 3), &Device::Cpu).expect("tensor")
    }

    /// The CUDA edge Wigner-D kernel(s) of `kernels/wigner.cu` run on the host
    /// (`crate::host_kernels`), as `src/cuda/wigner.rs` launches them, on `edges`; returns the
    /// blocks as f64 and the first degenerate edge index the kernels report (`edges.len()` if
    /// none).
    fn host_wigner<T: crate::activation::Float + crate::host_kernels::ToLe>(
        driver: &crate::host_kernels::Driver,
        edges: &[[f64; 3]],
        helpers: Option<&[f64]>,
        lmax: usize,
        two_pass: bool,
    ) -> (Vec<f64>, usize) {
        use crate::host_kernels::{bytes_of, floats_from};
        let ev: Vec<T> = edges.iter().flatten().map(|&v| T::from_f64(v)).collect();
        let mut j = Vec::new();
        for l in 0..=lmax {
            j.extend_from_slice(crate::wigner::j_matrix(l).expect("degree"));
        }
        let width = std::mem::size_of::<T>();
        let header = [
            width as i64,
            edges.len() as i64,
            lmax as i64,
            i64::from(helpers.is_some()),
            i64::from(two_pass),
        ];
        let mut input = bytes_of(&header);
        input.extend(bytes_of(&ev));
        if let Some(h) = helpers {
            input.extend(bytes_of(h));
        }
        input.extend(bytes_of(&j));
        let tag = format!(
            "{}-{lmax}-{}-{two_pass}",
            T::DTYPE.as_str(),
            helpers.is_some()
        );
        let bytes = driver.run(&tag, &input);
        let (blocks, bad) = bytes.split_at(bytes.len() - 4);
        let bad = i32::from_le_bytes(bad.try_into().expect("4 bytes"));
        (
            floats_from(blocks, width),
            usize::try_from(bad).expect("index"),
        )
    }

    /// The CUDA edge Wigner-D kernels, run on the host in both launch shapes (one block per
    /// edge; two passes), give the CPU's blocks for zero-roll and helper frames, awkward edges
    /// included (f64 to 1e-12, f32 inputs to 1e-5 of the largest entry), and report the first
    /// degenerate edge as the CPU does.
    #[test]
    fn cuda_wigner_kernels_match_the_cpu_on_the_host() -> Result<()> {
        let Some(driver) = crate::host_kernels::driver("wigner_main") else {
            return Ok(());
        };
        let edges = test_edges();
        let n = edges.len();
        let helpers = random_normals(3 * n, 17);
        let h = Tensor::from_vec(helpers.clone(), (n, 3), &Device::Cpu)?;
        for two_pass in [false, true] {
            for lmax in [0, 1, 4, 6] {
                for with_helpers in [false, true] {
                    let roll = if with_helpers {
                        Roll::Helpers(&h)
                    } else {
                        Roll::Zero
                    };
                    let hv = with_helpers.then_some(&helpers[..]);
                    let want64: Vec<f64> = edge_wigner(&edges_tensor(&edges), lmax, &roll)?
                        .blocks()
                        .flatten_all()?
                        .to_vec1()?;
                    let (got64, bad64) = host_wigner::<f64>(driver, &edges, hv, lmax, two_pass);
                    assert_eq!(
                        bad64, n,
                        "lmax {lmax} helpers {with_helpers} two-pass {two_pass}: no degenerate edge"
                    );
                    assert_close_slice(&got64, &want64, 1e-12);
                    let e32: Vec<[f64; 3]> = edges
                        .iter()
                        .map(|e| e.map(|v| f64::from(v as f32)))
                        .collect();
                    let want32: Vec<f64> = edge_wigner(&edges_tensor(&e32), lmax, &roll)?
                        .blocks()
                        .flatten_all()?
                        .to_vec1()?;
                    let (got32, _) = host_wigner::<f32>(driver, &edges, hv, lmax, two_pass);
                    assert_close_slice(&got32, &want32, 1e-5);
                }
            }
            // A zero edge at 5 and a non-finite one at 9: the kernels report 5 and write zero
            // blocks for both.
            let mut broken = edges.clone();
            broken[9] = [f64::NAN, 0.0, 1.0];
            broken[5] = [0.0; 3];
            let wlen = crate::wigner::blocks_len(2);
            let (blocks, bad) = host_wigner::<f64>(driver, &broken, None, 2, two_pass);
            assert_eq!(bad, 5, "two-pass {two_pass}");
            for e in [5, 9] {
                assert!(blocks[e * wlen..(e + 1) * wlen].iter().all(|&v| v == 0.0));
            }
        }
        Ok(())
    }

    /// A mix of random edges and awkward ones: along ±x, ±y, ±z and the cube diagonals.
    fn test_edges() -> Vec<[f64; 3]> {
        let mut e: Vec<[f64; 3]> = random_normals(3 * 40, 9)
            .chunks(3)
            .map(|c| [c[0], c[1], c[2]])
            .collect();
        e.extend([
            [1.0, 0.0, 0.0],
            [-2.0, 0.0, 0.0],
            [0.0, 3.0, 0.0],
            [0.0, -0.5, 0.0],
            [0.0, 0.0, 1.0],
            [0.0, 0.0, -1.0],
            [1.0, 1.0, 1.0],
            [-1.0, 1.0, -1.0],
            [1e-9, 1.0, 0.0],
        ]);
        e
    }

    #[test]
    fn frames_take_the_edge_to_plus_y_for_every_degree() -> Result<()> {
        let edges = test_edges();
        let t = edges_tensor(&edges);
        let lmax = 6;
        let dim = num_coefficients(lmax);
        let pole =
            spherical_harmonics_f64(lmax, &[[0.0, 1.0, 0.0]], true, Normalization::Component)?;
        let y = spherical_harmonics_f64(lmax, &edges, true, Normalization::Component)?;
        for roll in [Roll::Random { seed: 3 }, Roll::Zero] {
            let w = edge_wigner(&t, lmax, &roll)?;
            let rows: Vec<Vec<f64>> = w.blocks().to_vec2()?;
            for (k, row) in rows.iter().enumerate() {
                for l in 0..=lmax {
                    let n = 2 * l + 1;
                    let d = &row[block_offset(l)..block_offset(l) + n * n];
                    let yl = &y[k * dim + l * l..k * dim + l * l + n];
                    let dy: Vec<f64> = (0..n)
                        .map(|i| (0..n).map(|j| d[i * n + j] * yl[j]).sum())
                        .collect();
                    assert_close_slice(&dy, &pole[l * l..l * l + n], 1e-12);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn fairchem_frame_rows_are_orthonormal_and_roll_is_seeded() -> Result<()> {
        let edges = test_edges();
        let t = edges_tensor(&edges);
        let a = edge_rotations(&t, &Roll::Random { seed: 1 })?;
        let b = edge_rotations(&t, &Roll::Random { seed: 1 })?;
        let c = edge_rotations(&t, &Roll::Random { seed: 2 })?;
        assert_eq!(a, b);
        assert_ne!(a, c);
        for r in &a {
            for i in 0..3 {
                for j in 0..3 {
                    let d = dot(r[i], r[j]);
                    assert!((d - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12);
                }
            }
            assert!(
                (dot(r[0], cross(r[1], r[2])) - 1.0).abs() < 1e-12,
                "det must be +1"
            );
        }
        // The roll differs between seeds but the edge still maps to +y (row 1 is the direction).
        for (k, e) in edges.iter().enumerate() {
            let u = normalised(*e);
            assert_close_slice(&a[k][1], &u, 1e-15);
            assert_close_slice(&c[k][1], &u, 1e-15);
        }
        Ok(())
    }

    #[test]
    fn matches_the_fairchem_recipe_evaluated_with_e3nn() -> Result<()> {
        let fx = Fixture::open("sh_wigner_e3nn");
        let (shape, edges) = fx.array("frames_edge_vec");
        let (_, helpers) = fx.array("frames_helpers");
        let (_, rot) = fx.array("frames_rot_mat");
        let (_, blocks) = fx.array("frames_blocks_l4");
        let e = Tensor::from_slice(edges, (shape[0], 3), &Device::Cpu)?;
        let h = Tensor::from_slice(helpers, (shape[0], 3), &Device::Cpu)?;
        let ours = edge_rotations(&e, &Roll::Helpers(&h))?;
        let flat: Vec<f64> = ours.iter().flatten().flatten().copied().collect();
        assert_close_slice(&flat, rot, 1e-12);
        let w = edge_wigner(&e, 4, &Roll::Helpers(&h))?;
        let got: Vec<f64> = w.blocks().flatten_all()?.to_vec1()?;
        assert_eq!(got.len(), shape[0] * blocks_len(4));
        assert_close_slice(&got, blocks, 1e-10);
        // f32 edges give f32 blocks close to the f64 ones.
        let w32 = edge_wigner(&e.to_dtype(DType::F32)?, 4, &Roll::Helpers(&h))?;
        assert_eq!(w32.blocks().dtype(), DType::F32);
        let got32: Vec<f64> = w32
            .blocks()
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1()?;
        assert_close_slice(&got32, blocks, 1e-5);
        Ok(())
    }

    #[test]
    fn degenerate_inputs_are_errors_naming_the_edge() -> Result<()> {
        let t = edges_tensor(&[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]);
        match edge_wigner(&t, 2, &Roll::Random { seed: 0 }) {
            Err(EquivariantError::DegenerateEdge { index: 1, .. }) => {}
            other => panic!("expected DegenerateEdge for edge 1, got {other:?}"),
        }
        assert!(matches!(
            edge_wigner(&t, 2, &Roll::Zero),
            Err(EquivariantError::DegenerateEdge { index: 1, .. })
        ));
        let nan = edges_tensor(&[[f64::NAN, 0.0, 1.0]]);
        assert!(matches!(
            edge_rotations(&nan, &Roll::Zero),
            Err(EquivariantError::DegenerateEdge { index: 0, .. })
        ));
        // A helper parallel to the edge is rescued by fairchem's 90° turns...
        let e = edges_tensor(&[[0.3, 0.4, 0.5]]);
        let h = edges_tensor(&[[0.3, 0.4, 0.5]]);
        let r = edge_rotations(&e, &Roll::Helpers(&h))?;
        assert!(r[0].iter().flatten().all(|v| v.is_finite()));
        // ...but a zero helper cannot be, and a wrong helper count is a shape error.
        let zero = edges_tensor(&[[0.0, 0.0, 0.0]]);
        assert!(matches!(
            edge_rotations(&e, &Roll::Helpers(&zero)),
            Err(EquivariantError::DegenerateEdge { index: 0, .. })
        ));
        let two = edges_tensor(&[[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]]);
        assert!(matches!(
            edge_rotations(&e, &Roll::Helpers(&two)),
            Err(EquivariantError::ShapeMismatch { arg: "helpers", .. })
        ));
        let bad = Tensor::zeros((3, 2), DType::F64, &Device::Cpu)?;
        assert!(matches!(
            edge_rotations(&bad, &Roll::Zero),
            Err(EquivariantError::ShapeMismatch {
                arg: "edge_vec",
                ..
            })
        ));
        Ok(())
    }
}
