//! Every CUDA kernel of this crate against its CPU implementation on the same inputs, values
//! and gradients (`cargo test -p matscale-equivariant --features cuda`).
//!
//! Tolerances: f64 to 1e-12 and f32 to 1e-5, relative to the largest magnitude of the CPU
//! result (`max |gpu − cpu| / max |cpu|`). Without a usable GPU every test prints
//! `no CUDA device (…): nothing compared` and returns: the kernels then only compiled (the
//! build runs nvcc; `tests/kernels.rs` checks the sources and kernel names without a GPU).
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use matscale_equivariant::cuda::{FUSED_S2_ACTIVATION, LAYER_NORM_SH, WIGNER_TWO_PASS};
use matscale_equivariant::frames::{edge_wigner, Roll};
use matscale_equivariant::mapping::SphericalLayout;
use matscale_equivariant::radial::GaussianSmearing;
use matscale_equivariant::s2grid::S2Grid;
use matscale_equivariant::segment::{gather_rows, Segments};
use matscale_equivariant::sh::{spherical_harmonics, Normalization};
use matscale_equivariant::so2::{rotate, rotate_inv, So2ConvConfig, So2Convolution, So2Linear};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// CUDA device 0, or `None` with one line saying why the test compares nothing.
fn gpu(test: &str) -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            let e = e.to_string();
            let first = e.lines().next().unwrap_or_default();
            eprintln!("{test}: no CUDA device ({first}): nothing compared");
            None
        }
    }
}

fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-12,
        _ => 1e-5,
    }
}

fn values(t: &Tensor) -> candle_core::Result<Vec<f64>> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()
}

/// `max |a − b| / max |b|` (0 for an all-zero reference that `a` matches exactly).
fn rel_err(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let (a, b) = (values(a)?, values(b)?);
    assert_eq!(a.len(), b.len(), "sizes differ");
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    Ok(if scale > 0.0 { diff / scale } else { diff })
}

fn assert_close(what: &str, gpu: &Tensor, cpu: &Tensor) -> TestResult {
    assert_eq!(gpu.dims(), cpu.dims(), "{what}: shapes");
    let err = rel_err(gpu, cpu)?;
    let tol = tolerance(cpu.dtype());
    assert!(
        err <= tol,
        "{what} ({:?}): relative error {err:e} > {tol:e}",
        cpu.dtype()
    );
    Ok(())
}

fn random(shape: &[usize], seed: u64, dtype: DType) -> candle_core::Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)
}

/// Runs `f` on a CPU and a CUDA `Var` holding `x`; compares outputs and the gradients of
/// `Σ out · w` (a fixed random `w`) with respect to `x`.
fn compare_with_grad(
    what: &str,
    dev: &Device,
    x: &Tensor,
    f: impl Fn(&Tensor) -> Result<Tensor, Box<dyn std::error::Error>>,
) -> TestResult {
    let xc = Var::from_tensor(x)?;
    let xg = Var::from_tensor(&x.to_device(dev)?)?;
    let yc = f(xc.as_tensor())?;
    let yg = f(xg.as_tensor())?;
    assert!(yg.device().is_cuda(), "{what}: output left the GPU");
    assert_close(what, &yg, &yc)?;
    let w = random(yc.dims(), 99, yc.dtype())?;
    let gc = (&yc * &w)?.sum_all()?.backward()?;
    let gg = (&yg * &w.to_device(dev)?)?.sum_all()?.backward()?;
    let dc = gc.get(xc.as_tensor()).ok_or("no CPU gradient")?;
    let dg = gg.get(xg.as_tensor()).ok_or("no GPU gradient")?;
    assert_close(&format!("{what} gradient"), dg, dc)
}

#[test]
fn every_ptx_module_loads() -> TestResult {
    let Some(dev) = gpu("every_ptx_module_loads") else {
        return Ok(());
    };
    // The smallest op of each module, so that each PTX text is loaded by the driver.
    let x = random(&[7, 3], 1, DType::F32)?.to_device(&dev)?;
    spherical_harmonics(&x, 2, true, Normalization::Component)?;
    edge_wigner(&x, 2, &Roll::Zero)?;
    matscale_equivariant::activation::silu(&x)?;
    Segments::from_indices(&[0u32, 1, 1, 0, 2, 2, 2], 3)?.sum(&x)?;
    let layout = SphericalLayout::new(1, 1)?;
    let w = edge_wigner(&x, 1, &Roll::Zero)?;
    rotate(
        &random(&[7, 4, 2], 2, DType::F32)?.to_device(&dev)?,
        &w,
        layout,
    )?;
    let ones = Tensor::ones(3, DType::F32, &dev)?;
    matscale_equivariant::norm_act::layer_norm_act(&x, &ones, &ones.zeros_like()?, 1e-5, None)?;
    dev.synchronize()?;
    Ok(())
}

#[test]
fn spherical_harmonics_match_cpu_with_gradients() -> TestResult {
    let Some(dev) = gpu("spherical_harmonics_match_cpu_with_gradients") else {
        return Ok(());
    };
    for dtype in [DType::F64, DType::F32] {
        // 300 vectors (several thread blocks and a ragged tail), one of them zero.
        let x = random(&[300, 3], 3, dtype)?;
        let x = Tensor::cat(&[&x, &Tensor::zeros((1, 3), dtype, &Device::Cpu)?], 0)?;
        for (lmax, normalize, norm) in [
            (6, true, Normalization::Component),
            (4, false, Normalization::Norm),
            (8, true, Normalization::Integral),
            (11, true, Normalization::Component),
            (11, true, Normalization::Component),
            (0, true, Normalization::Component),
        ] {
            let what = format!("sh lmax {lmax} normalize {normalize} {norm:?}");
            let f = |t: &Tensor| Ok(spherical_harmonics(t, lmax, normalize, norm)?);
            if normalize {
                // The zero vector has no gradient defined by the reference; skip it there.
                compare_with_grad(&what, &dev, &x.narrow(0, 0, 300)?, f)?;
            } else {
                compare_with_grad(&what, &dev, &x, f)?;
            }
        }
    }
    Ok(())
}

/// Edge vectors with awkward directions (poles, axes) among random ones.
fn edges(dtype: DType) -> candle_core::Result<Tensor> {
    let mut v = values(&random(&[64, 3], 5, DType::F64)?)?;
    v.extend([
        0.0, 2.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -3.0, 1.0, 1.0, 1.0,
    ]);
    Tensor::from_vec(v, (69, 3), &Device::Cpu)?.to_dtype(dtype)
}

/// Both launch shapes of the edge Wigner-D kernels (`cuda::WIGNER_TWO_PASS` off and on) give
/// the CPU's blocks. Other tests of this binary build blocks while the switch flips; both paths
/// agree with the CPU to the same tolerance, so they pass on either.
#[test]
fn wigner_blocks_match_cpu_for_every_roll() -> TestResult {
    let Some(dev) = gpu("wigner_blocks_match_cpu_for_every_roll") else {
        return Ok(());
    };
    for two_pass in [false, true] {
        WIGNER_TWO_PASS.with(two_pass, || -> TestResult {
            for dtype in [DType::F64, DType::F32] {
                let e = edges(dtype)?;
                let helpers = (random(&[69, 3], 8, DType::F64)? * 0.5)?;
                for lmax in [0, 2, 6, 11] {
                    for (name, roll_cpu, roll_gpu) in [
                        ("zero", Roll::Zero, Roll::Zero),
                        ("random", Roll::Random { seed: 4 }, Roll::Random { seed: 4 }),
                        ("helpers", Roll::Helpers(&helpers), Roll::Helpers(&helpers)),
                    ] {
                        let cpu = edge_wigner(&e, lmax, &roll_cpu)?;
                        let gpu = edge_wigner(&e.to_device(&dev)?, lmax, &roll_gpu)?;
                        assert!(gpu.blocks().device().is_cuda());
                        assert_close(
                            &format!("wigner lmax {lmax} roll {name} two-pass {two_pass}"),
                            gpu.blocks(),
                            cpu.blocks(),
                        )?;
                    }
                }
            }
            // A zero edge is reported with its index, as on the CPU.
            let mut v = values(&edges(DType::F64)?)?;
            v[3 * 5..3 * 6].fill(0.0);
            let bad = Tensor::from_vec(v, (69, 3), &dev)?;
            match edge_wigner(&bad, 2, &Roll::Zero) {
                Err(matscale_equivariant::error::EquivariantError::DegenerateEdge {
                    index: 5,
                    ..
                }) => {}
                other => panic!("two-pass {two_pass}: expected DegenerateEdge at 5, got {other:?}"),
            }
            Ok(())
        })?;
    }
    Ok(())
}

#[test]
fn rotations_match_cpu_with_gradients() -> TestResult {
    let Some(dev) = gpu("rotations_match_cpu_with_gradients") else {
        return Ok(());
    };
    for dtype in [DType::F64, DType::F32] {
        // Channel counts below, at and across the kernels' 128-channel tiles; register tiles
        // of 5, 9, 13 and 25 inputs per degree (lmax 11 is the largest layout).
        for (lmax, mmax, c) in [
            (4, 2, 8),
            (6, 4, 5),
            (2, 2, 3),
            (4, 2, 160),
            (3, 1, 33),
            (8, 8, 4),
            (11, 11, 2),
        ] {
            let layout = SphericalLayout::new(lmax, mmax)?;
            let e = edges(dtype)?;
            let w_cpu = edge_wigner(&e, lmax, &Roll::Random { seed: 1 })?;
            let w_gpu = edge_wigner(&e.to_device(&dev)?, lmax, &Roll::Random { seed: 1 })?;
            let on = |t: &Tensor| t.device().is_cuda();
            let x = random(&[69, layout.num_coefficients(), c], 6, dtype)?;
            compare_with_grad(&format!("rotate {lmax}/{mmax}"), &dev, &x, |t| {
                Ok(rotate(t, if on(t) { &w_gpu } else { &w_cpu }, layout)?)
            })?;
            let y = random(&[69, layout.num_truncated(), c], 7, dtype)?;
            compare_with_grad(&format!("rotate_inv {lmax}/{mmax}"), &dev, &y, |t| {
                Ok(rotate_inv(t, if on(t) { &w_gpu } else { &w_cpu }, layout)?)
            })?;
        }
    }
    Ok(())
}

/// Seeded parameters for a module built by `build` on `device` (same values on every device).
/// The rotations differentiable in their blocks (conservative forces): values and the
/// gradients of the input and of the blocks (`block_outer`) on the GPU against the CPU, both
/// directions, channel counts below and above a warp.
#[test]
fn differentiable_rotations_match_cpu_with_block_gradients() -> TestResult {
    use matscale_equivariant::so2::{rotate_differentiable, rotate_inv_differentiable};
    let Some(dev) = gpu("differentiable_rotations_match_cpu_with_block_gradients") else {
        return Ok(());
    };
    for dtype in [DType::F64, DType::F32] {
        for (lmax, mmax, c) in [(4, 2, 8), (3, 3, 40), (6, 4, 3)] {
            let layout = SphericalLayout::new(lmax, mmax)?;
            let w = random(&[69, layout.wigner_len()], 8, dtype)?;
            for to_edge in [true, false] {
                let rows = if to_edge {
                    layout.num_coefficients()
                } else {
                    layout.num_truncated()
                };
                let x = random(&[69, rows, c], 9, dtype)?;
                let rot = |x: &Tensor, w: &Tensor| -> Result<Tensor, Box<dyn std::error::Error>> {
                    Ok(if to_edge {
                        rotate_differentiable(x, w, layout)?
                    } else {
                        rotate_inv_differentiable(x, w, layout)?
                    })
                };
                let what = format!("differentiable rotation {lmax}/{mmax} c {c} to_edge {to_edge}");
                compare_with_grad(&format!("{what} (x)"), &dev, &x, |t| {
                    rot(t, &w.to_device(t.device())?)
                })?;
                compare_with_grad(&format!("{what} (blocks)"), &dev, &w, |t| {
                    rot(&x.to_device(t.device())?, t)
                })?;
            }
        }
    }
    Ok(())
}

fn seeded_varmap(
    dtype: DType,
    device: &Device,
    build: impl Fn(VarBuilder) -> Result<(), Box<dyn std::error::Error>>,
) -> Result<VarMap, Box<dyn std::error::Error>> {
    let varmap = VarMap::new();
    build(VarBuilder::from_varmap(&varmap, dtype, device))?;
    let mut names: Vec<String> = varmap
        .data()
        .lock()
        .map_err(|e| e.to_string())?
        .keys()
        .cloned()
        .collect();
    names.sort();
    for (i, name) in names.iter().enumerate() {
        let var = varmap.data().lock().map_err(|e| e.to_string())?[name].clone();
        var.set(&random(var.dims(), 100 + i as u64, dtype)?.to_device(device)?)?;
    }
    Ok(varmap)
}

#[test]
fn fused_so2_layers_match_cpu_with_all_gradients() -> TestResult {
    let Some(dev) = gpu("fused_so2_layers_match_cpu_with_all_gradients") else {
        return Ok(());
    };
    for dtype in [DType::F64, DType::F32] {
        for (lmax, mmax, c_in, c_out, extra, linear) in [
            (4, 2, 6, 5, 3, false),
            (6, 4, 4, 4, 0, false),
            (3, 1, 5, 3, 0, true),
        ] {
            let layout = SphericalLayout::new(lmax, mmax)?;
            let config = So2ConvConfig::new(layout, c_in, c_out).with_extra_m0_outputs(extra);
            let config = if linear {
                So2ConvConfig::new(layout, c_in, c_out)
            } else {
                config
            };
            let e = edges(dtype)?;
            let x = random(&[69, layout.num_coefficients(), c_in], 11, dtype)?;
            let mut results = Vec::new();
            for device in [Device::Cpu, dev.clone()] {
                let build = |vb: VarBuilder| -> Result<(), Box<dyn std::error::Error>> {
                    if linear {
                        So2Linear::new(&config, vb)?;
                    } else {
                        So2Convolution::new(&config, vb)?;
                    }
                    Ok(())
                };
                let varmap = seeded_varmap(dtype, &device, build)?;
                let vb = VarBuilder::from_varmap(&varmap, dtype, &device);
                let wigner = edge_wigner(&e.to_device(&device)?, lmax, &Roll::Random { seed: 2 })?;
                let xv = Var::from_tensor(&x.to_device(&device)?)?;
                let (out, extra_out, radial) = if linear {
                    let m = So2Linear::new(&config, vb)?;
                    let radial = Var::from_tensor(
                        &random(&[69, m.radial_len()], 12, dtype)?.to_device(&device)?,
                    )?;
                    (
                        m.forward_rotated(xv.as_tensor(), &wigner, Some(radial.as_tensor()))?,
                        None,
                        radial,
                    )
                } else {
                    let m = So2Convolution::new(&config, vb)?;
                    let radial = Var::from_tensor(
                        &random(&[69, m.radial_len()], 12, dtype)?.to_device(&device)?,
                    )?;
                    let (o, ex) =
                        m.forward_rotated(xv.as_tensor(), &wigner, Some(radial.as_tensor()))?;
                    (o, ex, radial)
                };
                let w = random(out.dims(), 13, dtype)?.to_device(&device)?;
                let mut loss = (&out * &w)?.sum_all()?;
                if let Some(ex) = &extra_out {
                    let we = random(ex.dims(), 14, dtype)?.to_device(&device)?;
                    loss = (loss + (ex * &we)?.sum_all()?)?;
                }
                let grads = loss.backward()?;
                let mut named = vec![("out".to_string(), out.clone())];
                if let Some(ex) = extra_out {
                    named.push(("extra".into(), ex));
                }
                named.push((
                    "grad x".into(),
                    grads.get(xv.as_tensor()).ok_or("grad x")?.clone(),
                ));
                named.push((
                    "grad radial".into(),
                    grads.get(radial.as_tensor()).ok_or("grad radial")?.clone(),
                ));
                let data = varmap.data().lock().map_err(|e| e.to_string())?;
                let mut params: Vec<_> = data.iter().collect();
                params.sort_by(|a, b| a.0.cmp(b.0));
                for (name, var) in params {
                    named.push((
                        format!("grad {name}"),
                        grads.get(var.as_tensor()).ok_or("grad param")?.clone(),
                    ));
                }
                results.push(named);
            }
            let (gpu_res, cpu_res) = (results.pop().ok_or("gpu")?, results.pop().ok_or("cpu")?);
            for ((name, g), (_, c)) in gpu_res.iter().zip(&cpu_res) {
                assert_close(&format!("so2 {lmax}/{mmax} linear {linear}: {name}"), g, c)?;
            }
        }
    }
    Ok(())
}

#[test]
fn segment_ops_match_cpu_with_gradients() -> TestResult {
    let Some(dev) = gpu("segment_ops_match_cpu_with_gradients") else {
        return Ok(());
    };
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let unsorted: Vec<u32> = (0..500).map(|_| rng.gen_range(0..90)).collect();
    let mut sorted = unsorted.clone();
    sorted.sort_unstable();
    for dtype in [DType::F64, DType::F32] {
        for index in [&sorted, &unsorted] {
            let seg = Segments::from_indices(index, 90)?;
            let x = (random(&[500, 4], 22, dtype)? * 4.0)?;
            compare_with_grad("segment sum", &dev, &x, |t| Ok(seg.sum(t)?))?;
            compare_with_grad("segment softmax", &dev, &x, |t| Ok(seg.softmax(t)?))?;
            let s = random(&[90, 2, 3], 23, dtype)?;
            compare_with_grad("segment gather", &dev, &s, |t| Ok(seg.gather(t)?))?;
            // gather_rows: candle's index_select on the CPU, a segment gather on the GPU.
            let idx = Tensor::new(index.as_slice(), &Device::Cpu)?;
            let idx_gpu = idx.to_device(&dev)?;
            compare_with_grad("gather_rows", &dev, &s, |t| {
                let i = if t.device().is_cuda() { &idx_gpu } else { &idx };
                Ok(gather_rows(t, i)?)
            })?;
            // The head-weighted sum (values [E, K, H·V], weights [E, H]): both gradients.
            let values = random(&[500, 3, 2 * 5], 24, dtype)?;
            let weights = random(&[500, 2], 25, dtype)?;
            compare_with_grad("head-weighted sum (values)", &dev, &values, |t| {
                Ok(seg.head_weighted_sum(t, &weights.to_device(t.device())?)?)
            })?;
            compare_with_grad("head-weighted sum (weights)", &dev, &weights, |t| {
                Ok(seg.head_weighted_sum(&values.to_device(t.device())?, t)?)
            })?;
        }
    }
    Ok(())
}

/// LayerNorm + activation and LayerNorm + activation + dot (`norm_act`), every input's
/// gradient, with row widths that are not multiples of a warp and more rows than one warp
/// handles in the backward pass.
#[test]
fn norm_act_ops_match_cpu_with_gradients() -> TestResult {
    use matscale_equivariant::activation::Function;
    use matscale_equivariant::norm_act::{layer_norm_act, layer_norm_act_dot};
    let Some(dev) = gpu("norm_act_ops_match_cpu_with_gradients") else {
        return Ok(());
    };
    let acts = [
        None,
        Some(Function::Silu),
        Some(Function::Sigmoid),
        Some(Function::SmoothLeakyRelu(0.2)),
    ];
    for dtype in [DType::F64, DType::F32] {
        for act in acts {
            let name = format!("layer_norm_act {act:?} {dtype:?}");
            let (rows, a) = (300, 70);
            let x = (random(&[rows, a], 41, dtype)? * 3.0)?;
            let w = (random(&[a], 42, dtype)? + 1.0)?;
            let b = random(&[a], 43, dtype)?;
            let on = |t: &Tensor, u: &Tensor| u.to_device(t.device());
            compare_with_grad(&format!("{name} (x)"), &dev, &x, |t| {
                Ok(layer_norm_act(t, &on(t, &w)?, &on(t, &b)?, 1e-5, act)?)
            })?;
            compare_with_grad(&format!("{name} (weight)"), &dev, &w, |t| {
                Ok(layer_norm_act(&on(t, &x)?, t, &on(t, &b)?, 1e-5, act)?)
            })?;
            compare_with_grad(&format!("{name} (bias)"), &dev, &b, |t| {
                Ok(layer_norm_act(&on(t, &x)?, &on(t, &w)?, t, 1e-5, act)?)
            })?;
            let (heads, a) = (4, 45);
            let x = (random(&[150, heads, a], 44, dtype)? * 3.0)?;
            let w = (random(&[a], 45, dtype)? + 1.0)?;
            let b = random(&[a], 46, dtype)?;
            let dot = random(&[heads, a], 47, dtype)?;
            let name = format!("layer_norm_act_dot {act:?} {dtype:?}");
            compare_with_grad(&format!("{name} (x)"), &dev, &x, |t| {
                Ok(layer_norm_act_dot(
                    t,
                    &on(t, &w)?,
                    &on(t, &b)?,
                    1e-5,
                    act,
                    &on(t, &dot)?,
                )?)
            })?;
            compare_with_grad(&format!("{name} (weight)"), &dev, &w, |t| {
                Ok(layer_norm_act_dot(
                    &on(t, &x)?,
                    t,
                    &on(t, &b)?,
                    1e-5,
                    act,
                    &on(t, &dot)?,
                )?)
            })?;
            compare_with_grad(&format!("{name} (dot)"), &dev, &dot, |t| {
                Ok(layer_norm_act_dot(
                    &on(t, &x)?,
                    &on(t, &w)?,
                    &on(t, &b)?,
                    1e-5,
                    act,
                    t,
                )?)
            })?;
        }
    }
    Ok(())
}

/// EquiformerV2's `layer_norm_sh` on the GPU, as one op (`cuda::LAYER_NORM_SH` on) and as
/// composed candle ops (off), against the CPU's op: values, the input gradient and every
/// parameter gradient, for each normalisation, over more nodes than one warp handles in the
/// backward pass and channels that are not a multiple of a warp. (The only test of this binary
/// that runs `layer_norm_sh`, so the process-wide switch is this test's alone.)
#[test]
fn layer_norm_sh_matches_cpu_with_gradients() -> TestResult {
    use matscale_equivariant::norms::{
        EquivariantLayerNormArraySphericalHarmonics, FeatureNormalization, NormConfig,
    };
    let Some(dev) = gpu("layer_norm_sh_matches_cpu_with_gradients") else {
        return Ok(());
    };
    let (n, lmax, c) = (23, 3, 40);
    let k = (lmax + 1) * (lmax + 1);
    for (normalization, balanced) in [
        (FeatureNormalization::Component, true),
        (FeatureNormalization::Component, false),
        (FeatureNormalization::Norm, false),
    ] {
        for dtype in [DType::F64, DType::F32] {
            let config = NormConfig {
                normalization,
                std_balance_degrees: balanced,
                ..NormConfig::default()
            };
            let x = random(&[n, k, c], 61, dtype)?;
            let probe = random(&[n, k, c], 62, dtype)?;
            for fused in [true, false] {
                type Named = Vec<(String, Tensor)>;
                let results = LAYER_NORM_SH.with(
                    fused,
                    || -> Result<Vec<Named>, Box<dyn std::error::Error>> {
                        let mut results = Vec::new();
                        for device in [Device::Cpu, dev.clone()] {
                            let build = |vb: VarBuilder| -> Result<(), Box<dyn std::error::Error>> {
                                EquivariantLayerNormArraySphericalHarmonics::new(
                                    lmax, c, config, vb,
                                )?;
                                Ok(())
                            };
                            let varmap = seeded_varmap(dtype, &device, build)?;
                            let vb = VarBuilder::from_varmap(&varmap, dtype, &device);
                            let norm = EquivariantLayerNormArraySphericalHarmonics::new(
                                lmax, c, config, vb,
                            )?;
                            let xv = Var::from_tensor(&x.to_device(&device)?)?;
                            let out = norm.forward(xv.as_tensor())?;
                            let grads =
                                (&out * &probe.to_device(&device)?)?.sum_all()?.backward()?;
                            let mut named = vec![
                                ("out".to_string(), out.clone()),
                                (
                                    "x".to_string(),
                                    grads.get(xv.as_tensor()).ok_or("no x gradient")?.clone(),
                                ),
                            ];
                            let mut vars: Vec<(String, Var)> = varmap
                                .data()
                                .lock()
                                .map_err(|e| e.to_string())?
                                .iter()
                                .map(|(k, v)| (k.clone(), v.clone()))
                                .collect();
                            vars.sort_by(|a, b| a.0.cmp(&b.0));
                            for (name, var) in vars {
                                let g =
                                    grads.get(var.as_tensor()).ok_or("no parameter gradient")?;
                                named.push((name, g.clone()));
                            }
                            results.push(named);
                        }
                        Ok(results)
                    },
                )?;
                for ((name, cpu), (_, gpu)) in results[0].iter().zip(&results[1]) {
                    let what = format!(
                    "layer_norm_sh {normalization:?} {balanced} {dtype:?} {name} (CUDA op {fused})"
                );
                    assert_close(&what, gpu, cpu)?;
                }
            }
        }
    }
    Ok(())
}

#[test]
fn s2_grid_ops_match_cpu_with_gradients() -> TestResult {
    let Some(dev) = gpu("s2_grid_ops_match_cpu_with_gradients") else {
        return Ok(());
    };
    for dtype in [DType::F64, DType::F32] {
        for (lmax, mmax) in [(4, 2), (6, 4)] {
            let grid = S2Grid::equiformer_v2(lmax, mmax, None)?;
            let (k, g) = (grid.num_coefficients(), grid.num_points());
            let x = random(&[37, k, 6], 31, dtype)?;
            compare_with_grad("to_grid", &dev, &x, |t| Ok(grid.to_grid(t)?))?;
            let sig = random(&[37, g, 6], 32, dtype)?;
            compare_with_grad("from_grid", &dev, &sig, |t| Ok(grid.from_grid(t)?))?;
            let scalars = random(&[37, 6], 33, dtype)?;
            // Both CUDA paths of the activations: the batched GEMMs and the fused kernels
            // (the only test of this binary that runs S2 activations, so the process-wide
            // switch is this test's alone).
            for fused in [false, true] {
                let path = if fused { "fused" } else { "gemm" };
                FUSED_S2_ACTIVATION.with(fused, || -> TestResult {
                    compare_with_grad(&format!("s2 activation ({path})"), &dev, &x, |t| {
                        Ok(grid.s2_activation(t)?)
                    })?;
                    compare_with_grad(
                        &format!("separable s2 activation (x, {path})"),
                        &dev,
                        &x,
                        |t| Ok(grid.separable_s2_activation(&scalars.to_device(t.device())?, t)?),
                    )?;
                    compare_with_grad(
                        &format!("separable s2 activation (scalars, {path})"),
                        &dev,
                        &scalars,
                        |t| Ok(grid.separable_s2_activation(t, &x.to_device(t.device())?)?),
                    )?;
                    Ok(())
                })?;
            }
        }
    }
    // EquiformerV2's attention grid as the model uses it: 18 × 18 points, coefficients in
    // m-major order, 37 rows of 130 channels (more than one block of threads per row).
    let grid =
        S2Grid::equiformer_v2(4, 2, Some(18))?.permuted(&SphericalLayout::new(4, 2)?.to_m())?;
    for dtype in [DType::F64, DType::F32] {
        let x = random(&[37, grid.num_coefficients(), 130], 34, dtype)?;
        let scalars = random(&[37, 130], 35, dtype)?;
        FUSED_S2_ACTIVATION.with(true, || {
            compare_with_grad("separable s2 activation (m-major, fused)", &dev, &x, |t| {
                Ok(grid.separable_s2_activation(&scalars.to_device(t.device())?, t)?)
            })
        })?;
    }
    Ok(())
}

#[test]
fn elementwise_ops_match_cpu_with_gradients() -> TestResult {
    use matscale_equivariant::activation::{
        sigmoid, silu, smooth_leaky_relu, Elementwise, Function,
    };
    let Some(dev) = gpu("elementwise_ops_match_cpu_with_gradients") else {
        return Ok(());
    };
    for dtype in [DType::F64, DType::F32] {
        let x = (random(&[1000], 41, dtype)? * 8.0)?;
        compare_with_grad("silu", &dev, &x, |t| Ok(silu(t)?))?;
        compare_with_grad("sigmoid", &dev, &x, |t| Ok(sigmoid(t)?))?;
        compare_with_grad("smooth leaky relu", &dev, &x, |t| {
            Ok(smooth_leaky_relu(t, 0.2)?)
        })?;
        // Every derivative order of every function, as the raw op.
        for function in [
            Function::Silu,
            Function::Sigmoid,
            Function::SmoothLeakyRelu(0.2),
        ] {
            for order in 0u8..3 {
                let op = Elementwise { function, order };
                let cpu = x.apply_op1_no_bwd(&op)?;
                let gpu = x.to_device(&dev)?.apply_op1_no_bwd(&op)?;
                assert_close(&format!("{function:?} order {order}"), &gpu, &cpu)?;
            }
        }
        let smearing = GaussianSmearing::equiformer_v2(12.0)?;
        let d = ((random(&[300], 42, dtype)? + 1.0)? * 6.0)?;
        compare_with_grad("gaussian smearing", &dev, &d, |t| Ok(smearing.forward(t)?))?;
    }
    Ok(())
}

/// SchNet's shifted softplus kernel (the op lives in matscale-models; its CUDA kernel here).
#[test]
fn shifted_softplus_kernel_matches_its_formula() -> TestResult {
    let Some(dev) = gpu("shifted_softplus_kernel_matches_its_formula") else {
        return Ok(());
    };
    struct Ssp(u8);
    impl candle_core::CustomOp1 for Ssp {
        fn name(&self) -> &'static str {
            "shifted-softplus-test"
        }
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            candle_core::bail!("GPU only")
        }
        fn cuda_fwd(
            &self,
            s: &candle_core::CudaStorage,
            l: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            matscale_equivariant::cuda::shifted_softplus(s, l, self.0, "shifted-softplus-test")
        }
    }
    for dtype in [DType::F64, DType::F32] {
        let x = (random(&[2000], 51, dtype)? * 30.0)?;
        let xv = values(&x)?;
        for order in 0u8..3 {
            let expected: Vec<f64> = xv
                .iter()
                .map(|&v| {
                    let s = 1.0 / (1.0 + (-v).exp());
                    match order {
                        0 => v.max(0.0) + (-v.abs()).exp().ln_1p() - std::f64::consts::LN_2,
                        1 => s,
                        _ => s * (1.0 - s),
                    }
                })
                .collect();
            let expected = Tensor::from_vec(expected, 2000, &Device::Cpu)?.to_dtype(dtype)?;
            let got = x.to_device(&dev)?.apply_op1_no_bwd(&Ssp(order))?;
            assert_close(&format!("ssp order {order}"), &got, &expected)?;
        }
    }
    Ok(())
}

/// The multi-tensor AdamW and sum of squares (`adamw_multi`, `sum_squares_multi`) against the
/// same update and sum in f64 on the CPU: tensors of 0, 1, 7, 4,099 and 70,000 elements, f32
/// to 1e-6 and f64 to 1e-13 of the largest value.
#[test]
fn multi_tensor_optimiser_kernels_match_cpu() -> TestResult {
    use matscale_equivariant::cuda::{adamw_multi, sum_squares_multi, AdamWScalars};
    let Some(dev) = gpu("multi_tensor_optimiser_kernels_match_cpu") else {
        return Ok(());
    };
    let sizes = [0usize, 1, 7, 4_099, 70_000];
    let h = AdamWScalars {
        beta1: 0.9,
        beta2: 0.999,
        lr: 1e-3,
        decay: 1.0 - 1e-5,
        correction1: 0.271,
        correction2: 0.0019,
        eps: 1e-8,
    };
    let scale = 0.37;
    for dtype in [DType::F64, DType::F32] {
        let (mut params, mut moments, mut grads) = (Vec::new(), Vec::new(), Vec::new());
        for (i, &n) in sizes.iter().enumerate() {
            let seed = 10 * i as u64;
            params.push(random(&[n], seed, dtype)?);
            // [m | v] with v ≥ 0.
            let m = random(&[n], seed + 1, dtype)?;
            let v = random(&[n], seed + 2, dtype)?.sqr()?;
            moments.push(Tensor::cat(&[m, v], 0)?);
            grads.push(random(&[n], seed + 3, dtype)?);
        }
        let on = |v: &[Tensor]| -> candle_core::Result<Vec<Tensor>> {
            v.iter().map(|t| t.to_device(&dev)).collect()
        };
        let (pg, mg, gg) = (on(&params)?, on(&moments)?, on(&grads)?);
        fn refs(v: &[Tensor]) -> Vec<&Tensor> {
            v.iter().collect()
        }
        let want_norm: f64 = grads
            .iter()
            .map(|g| values(g).map(|v| v.iter().map(|x| x * x).sum::<f64>()))
            .sum::<candle_core::Result<f64>>()?;
        let norm = sum_squares_multi(&refs(&gg))?;
        assert!(
            (norm - want_norm).abs() <= 1e-12 * want_norm,
            "sum of squares ({dtype:?}): {norm} vs {want_norm}"
        );
        adamw_multi(&refs(&pg), &refs(&mg), &refs(&gg), scale, h)?;
        for (k, &n) in sizes.iter().enumerate() {
            let (theta, mv, g) = (
                values(&params[k])?,
                values(&moments[k])?,
                values(&grads[k])?,
            );
            let (mut want_theta, mut want_mv) = (vec![0.0; n], vec![0.0; 2 * n]);
            for j in 0..n {
                let gi = g[j] * scale;
                let m = mv[j] * h.beta1 + gi * (1.0 - h.beta1);
                let v = mv[n + j] * h.beta2 + gi * gi * (1.0 - h.beta2);
                want_mv[j] = m;
                want_mv[n + j] = v;
                want_theta[j] = theta[j] * h.decay
                    - (m / h.correction1) / ((v / h.correction2).sqrt() + h.eps) * h.lr;
            }
            if n == 0 {
                continue;
            }
            let tol = if dtype == DType::F64 { 1e-13 } else { 1e-6 };
            for (what, got, want) in [
                ("parameters", values(&pg[k])?, want_theta),
                ("moments", values(&mg[k])?, want_mv),
            ] {
                let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                let err = got
                    .iter()
                    .zip(&want)
                    .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()))
                    / scale;
                assert!(
                    err <= tol,
                    "adamw_multi {what} of tensor {k} ({dtype:?}): {err:e}"
                );
            }
        }
    }
    Ok(())
}
