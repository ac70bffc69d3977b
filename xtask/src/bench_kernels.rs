//! `cargo xtask bench kernels [--device cpu|cuda]`: every equivariant op at EquiformerV2 sizes,
//! timed in this process on the chosen device, with its achieved memory bandwidth and FLOP rate
//! as fractions of the device's peak, written to a JSON file.
//!
//! Sizes: (lmax, mmax, channels) = (4, 2, 64) (eqV2-S-like) and (6, 4, 128) (eqV2-M-like), at
//! 10⁴ edges, and 10⁵ edges on a GPU (`--edges` overrides). The byte and FLOP counts are
//! models, not measurements: each input read once and each output written once (the traffic
//! of an ideal kernel), and the arithmetic of the algorithm as implemented (block-diagonal
//! rotations, three-GEMM complex products). The figure that matters per op is the larger of
//! the two fractions, which says how far the op is from its roofline.
//!
//! Peaks: measured at the start on either device: a large copy (bytes read + written per
//! second) and a candle f32 matmul (on a GPU cuBLAS without tensor cores; session 15 measured
//! about 3.0 TB/s on an H100). `MATSCALE_PEAK_GBS` / `MATSCALE_PEAK_GFLOPS` override on a GPU.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use matscale_equivariant::device::{select_device, DeviceRequest};
use matscale_equivariant::frames::{edge_wigner, Roll};
use matscale_equivariant::mapping::SphericalLayout;
use matscale_equivariant::s2grid::S2Grid;
use matscale_equivariant::segment::Segments;
use matscale_equivariant::sh::{spherical_harmonics, Normalization};
use matscale_equivariant::so2::{rotate, rotate_inv, So2ConvConfig, So2Convolution};
use serde::Serialize;

use crate::bench::BenchArgs;

/// The (lmax, mmax, channels) configurations.
const CONFIGS: [(usize, usize, usize); 2] = [(4, 2, 64), (6, 4, 128)];

/// Average in-degree of EquiformerV2's graphs (OMat24 config: 61.95; 20 with max_neighbors 20).
const EDGES_PER_NODE: usize = 20;

/// Attention heads of the segment softmax.
const HEADS: usize = 8;

/// Bytes per f32.
const F32: f64 = 4.0;

#[derive(Serialize)]
struct Peaks {
    bandwidth_gbs: f64,
    gflops: f64,
    how: String,
    /// Median seconds of the smallest op (one element, one kernel) with its synchronisation:
    /// the time below which no op of this bench can go, whatever its size.
    launch_floor_s: f64,
}

#[derive(Serialize)]
struct Measurement {
    op: String,
    pass: &'static str,
    lmax: usize,
    mmax: usize,
    channels: usize,
    edges: usize,
    reps: usize,
    median_s: f64,
    min_s: f64,
    /// Modelled bytes moved and FLOPs.
    bytes: f64,
    flops: f64,
    gbs: f64,
    gflops: f64,
    fraction_of_peak_bandwidth: f64,
    fraction_of_peak_flops: f64,
    /// `max(bytes / peak bandwidth, flops / peak rate, launch floor) / median`: the roofline
    /// fraction with the launch floor as a third bound, for ops whose data moves in less time
    /// than one launch takes.
    fraction_of_bound_with_floor: f64,
    /// Edges (or vectors) per second.
    items_per_s: f64,
}

#[derive(Serialize)]
struct Report {
    device: String,
    requested: String,
    fallback: Option<String>,
    dtype: &'static str,
    peaks: Peaks,
    measurements: Vec<Measurement>,
}

/// Times `f` (synchronising the device after each call): warm-up, then repetitions until
/// `budget_s` has passed (at least 3, at most 50). Returns (median, min, reps).
fn time(
    device: &Device,
    budget_s: f64,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<(f64, f64, usize)> {
    f()?;
    device.synchronize()?;
    let mut samples = Vec::new();
    let start = Instant::now();
    while samples.len() < 3 || (start.elapsed().as_secs_f64() < budget_s && samples.len() < 50) {
        let t = Instant::now();
        f()?;
        device.synchronize()?;
        samples.push(t.elapsed().as_secs_f64());
    }
    samples.sort_by(f64::total_cmp);
    Ok((samples[samples.len() / 2], samples[0], samples.len()))
}

/// CPU peaks: a 256 MiB copy on all threads (read + write bytes per second) and a 2048² f32
/// matmul.
fn cpu_peaks() -> anyhow::Result<Peaks> {
    use rayon::prelude::*;
    let n = 64 << 20;
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    let copy = |dst: &mut [f32]| {
        dst.par_chunks_mut(1 << 20)
            .zip(src.par_chunks(1 << 20))
            .for_each(|(d, s)| d.copy_from_slice(s));
    };
    copy(&mut dst);
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        copy(&mut dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    let bandwidth = 2.0 * n as f64 * F32 / best / 1e9;
    let m = 2048;
    let a = Tensor::randn(0f32, 1.0, (m, m), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (m, m), &Device::Cpu)?;
    let (median, _, _) = time(&Device::Cpu, 1.0, || {
        a.matmul(&b)?;
        Ok(())
    })?;
    let gflops = 2.0 * (m as f64).powi(3) / median / 1e9;
    Ok(Peaks {
        bandwidth_gbs: bandwidth,
        gflops,
        launch_floor_s: 0.0,
        how: format!(
            "measured: 256 MiB parallel copy ({bandwidth:.1} GB/s read+write), candle f32 matmul 2048² ({gflops:.1} GFLOP/s), {} threads",
            rayon::current_num_threads()
        ),
    })
}

/// The median time of a one-element op and its synchronisation on `device`.
fn launch_floor(device: &Device) -> anyhow::Result<f64> {
    let x = Tensor::ones(1, DType::F32, device)?;
    let (median, _, _) = time(device, 0.5, || {
        std::hint::black_box(x.affine(2.0, 1.0)?);
        Ok(())
    })?;
    Ok(median)
}

fn env_f64(name: &str) -> Option<f64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// GPU peaks: `MATSCALE_PEAK_GBS` / `MATSCALE_PEAK_GFLOPS` where set, otherwise measured on
/// `device` like the CPU's (a 1 GiB device-to-device copy, read + write bytes per second, and
/// a 8192² f32 matmul through candle's cuBLAS, best of the timed runs), so the fractions hold
/// on any GPU (an H200 moves about 1.6× an H100's bytes); the nominal H100 SXM figures
/// (3.0 TB/s, 60 TFLOP/s f32 without tensor cores) if the measurement fails.
fn gpu_peaks(device: &Device) -> Peaks {
    let measured = || -> anyhow::Result<(f64, f64)> {
        let n = 256usize << 20;
        let src = Tensor::ones(n, DType::F32, device)?;
        let (_, best_copy, _) = time(device, 1.0, || {
            std::hint::black_box(src.copy()?);
            Ok(())
        })?;
        let m = 8192usize;
        let a = Tensor::randn(0f32, 1.0, (m, m), device)?;
        let b = Tensor::randn(0f32, 1.0, (m, m), device)?;
        let (_, best_mm, _) = time(device, 2.0, || {
            std::hint::black_box(a.matmul(&b)?);
            Ok(())
        })?;
        Ok((
            2.0 * n as f64 * F32 / best_copy / 1e9,
            2.0 * (m as f64).powi(3) / best_mm / 1e9,
        ))
    };
    let (env_gbs, env_gflops) = (
        env_f64("MATSCALE_PEAK_GBS"),
        env_f64("MATSCALE_PEAK_GFLOPS"),
    );
    let (bandwidth_gbs, gflops, how) = match (env_gbs, env_gflops) {
        (Some(b), Some(g)) => (
            b,
            g,
            "set by MATSCALE_PEAK_GBS / MATSCALE_PEAK_GFLOPS".into(),
        ),
        _ => match measured() {
            Ok((b, g)) => (
                env_gbs.unwrap_or(b),
                env_gflops.unwrap_or(g),
                format!(
                    "measured: 1 GiB device copy ({b:.0} GB/s read+write), f32 matmul 8192² \
                     ({g:.0} GFLOP/s); MATSCALE_PEAK_GBS / MATSCALE_PEAK_GFLOPS override"
                ),
            ),
            Err(e) => (
                env_gbs.unwrap_or(3000.0),
                env_gflops.unwrap_or(60_000.0),
                format!("nominal H100 SXM figures (measuring failed: {e})"),
            ),
        },
    };
    Peaks {
        bandwidth_gbs,
        gflops,
        launch_floor_s: 0.0,
        how: format!("{bandwidth_gbs:.0} GB/s, {gflops:.0} GFLOP/s f32: {how}"),
    }
}

/// Σ_l (2 min(l, mmax) + 1)(2l + 1): multiply-adds per channel of one rotation.
fn rotation_macs(lmax: usize, mmax: usize) -> f64 {
    (0..=lmax)
        .map(|l| ((2 * l.min(mmax) + 1) * (2 * l + 1)) as f64)
        .sum()
}

/// FLOPs of the SO(2) maps of one edge (m = 0 GEMM, three GEMMs per m > 0).
fn so2_flops(layout: SphericalLayout, c: usize) -> f64 {
    let k0 = (layout.m_size(0) * c) as f64;
    let mut f = 2.0 * k0 * k0;
    for m in 1..=layout.mmax() {
        let k = (layout.m_size(m) * c) as f64;
        f += 3.0 * 2.0 * k * k;
    }
    f
}

/// A cell of the table: `(lmax, mmax, channels, edges)`.
type CellKey = (usize, usize, usize, usize);

struct Bench<'a> {
    device: &'a Device,
    budget_s: f64,
    peaks: &'a Peaks,
    out: Vec<Measurement>,
}

impl Bench<'_> {
    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        op: &str,
        pass: &'static str,
        (lmax, mmax, channels, edges): CellKey,
        bytes: f64,
        flops: f64,
        f: impl FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let (median, min, reps) =
            time(self.device, self.budget_s, f).with_context(|| format!("timing {op} {pass}"))?;
        let (gbs, gflops) = (bytes / median / 1e9, flops / median / 1e9);
        let m = Measurement {
            op: op.into(),
            pass,
            lmax,
            mmax,
            channels,
            edges,
            reps,
            median_s: median,
            min_s: min,
            bytes,
            flops,
            gbs,
            gflops,
            fraction_of_peak_bandwidth: gbs / self.peaks.bandwidth_gbs,
            fraction_of_peak_flops: gflops / self.peaks.gflops,
            fraction_of_bound_with_floor: (bytes / (self.peaks.bandwidth_gbs * 1e9))
                .max(flops / (self.peaks.gflops * 1e9))
                .max(self.peaks.launch_floor_s)
                / median,
            items_per_s: edges as f64 / median,
        };
        println!(
            "{:<22} {:<3} L{lmax} M{mmax} C{channels:<4} E{edges:<7} {:>10.3} ms {:>9.1} GB/s ({:>5.1}%) {:>9.1} GFLOP/s ({:>5.1}%) floor-bound {:>5.1}%",
            m.op,
            m.pass,
            median * 1e3,
            gbs,
            100.0 * m.fraction_of_peak_bandwidth,
            gflops,
            100.0 * m.fraction_of_peak_flops,
            100.0 * m.fraction_of_bound_with_floor
        );
        self.out.push(m);
        Ok(())
    }
}

/// `Σ y`, the scalar whose repeated `backward()` the "bwd" rows time (the reference script's
/// `y.sum().backward(retain_graph=True)`): the op's backward from an all-ones output gradient,
/// plus candle's bookkeeping.
fn loss(y: &Tensor) -> anyhow::Result<Tensor> {
    Ok(y.sum_all()?)
}

fn bench_config(
    b: &mut Bench<'_>,
    (lmax, mmax, c): (usize, usize, usize),
    edges: usize,
) -> anyhow::Result<()> {
    let dev = b.device.clone();
    let layout = SphericalLayout::new(lmax, mmax)?;
    let (full, trunc, wlen) = (
        layout.num_coefficients(),
        layout.num_truncated(),
        layout.wigner_len(),
    );
    let (e, fl, tr, wl, cf) = (
        edges as f64,
        full as f64,
        trunc as f64,
        wlen as f64,
        c as f64,
    );
    let key = (lmax, mmax, c, edges);

    // Spherical harmonics of the edge vectors.
    let xyz = Var::from_tensor(&Tensor::randn(0f32, 1.0, (edges, 3), &dev)?)?;
    b.record(
        "spherical_harmonics",
        "fwd",
        key,
        e * (3.0 + fl) * F32,
        e * fl * 5.0,
        || {
            spherical_harmonics(xyz.as_tensor(), lmax, true, Normalization::Component)?;
            Ok(())
        },
    )?;
    let l = loss(&spherical_harmonics(
        xyz.as_tensor(),
        lmax,
        true,
        Normalization::Component,
    )?)?;
    b.record(
        "spherical_harmonics",
        "bwd",
        key,
        e * (6.0 + fl) * F32,
        e * fl * 20.0,
        || {
            l.backward()?;
            Ok(())
        },
    )?;

    // Edge frames and Wigner-D blocks.
    let wigner_flops: f64 = (0..=lmax)
        .map(|l| ((2 * l + 1) as f64).powi(3) * 16.0)
        .sum();
    let wigner_row = |b: &mut Bench<'_>, op: &'static str| {
        b.record(
            op,
            "fwd",
            key,
            e * (3.0 + wl) * F32,
            e * wigner_flops,
            || {
                edge_wigner(xyz.as_tensor(), lmax, &Roll::Zero)?;
                Ok(())
            },
        )
    };
    if dev.is_cuda() {
        // Both CUDA launch shapes side by side: one thread block per edge ("edge_wigner") and
        // two passes, tables then entries ("edge_wigner_two_pass").
        use matscale_equivariant::switch::WIGNER_TWO_PASS;
        WIGNER_TWO_PASS.with(false, || wigner_row(b, "edge_wigner"))?;
        WIGNER_TWO_PASS.with(true, || wigner_row(b, "edge_wigner_two_pass"))?;
    } else {
        wigner_row(b, "edge_wigner")?;
    }
    // `edge_wigner` builds the blocks from detached values (as fairchem, and the reference):
    // the "bwd" rows below are gradients of the features only.
    let wigner = edge_wigner(xyz.as_tensor(), lmax, &Roll::Random { seed: 1 })?;

    // Rotations into and out of the edge frames.
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (edges, full, c), &dev)?)?;
    let rot_bytes = e * (fl * cf + wl + tr * cf) * F32;
    let rot_flops = 2.0 * e * cf * rotation_macs(lmax, mmax);
    b.record("rotate", "fwd", key, rot_bytes, rot_flops, || {
        rotate(x.as_tensor(), &wigner, layout)?;
        Ok(())
    })?;
    let l = loss(&rotate(x.as_tensor(), &wigner, layout)?)?;
    b.record("rotate", "bwd", key, rot_bytes, rot_flops, || {
        l.backward()?;
        Ok(())
    })?;
    let y = Var::from_tensor(&Tensor::randn(0f32, 1.0, (edges, trunc, c), &dev)?)?;
    b.record("rotate_inv", "fwd", key, rot_bytes, rot_flops, || {
        rotate_inv(y.as_tensor(), &wigner, layout)?;
        Ok(())
    })?;
    // A fresh zeroed tensor of the rotation's output size, dropped again: the floor under every
    // op that returns a new tensor of that size. On CUDA it shows what allocation costs after a
    // synchronisation (candle allocates from the driver's stream-ordered pool, which by default
    // unmaps freed memory at every synchronisation); on the CPU, the allocator and page faults.
    b.record("alloc_output", "fwd", key, e * tr * cf * F32, 0.0, || {
        drop(Tensor::zeros((edges, trunc, c), DType::F32, &dev)?);
        Ok(())
    })?;
    // The backward of the bench's loss `Σ y` alone, y of the rotation's output size: candle's
    // bookkeeping (a zeroed gradient, the broadcast of the scalar's gradient added into it)
    // that every "bwd" row above and below pays before the op's own backward runs. Modelled
    // traffic: the zeroed tensor written, then read and the sum written.
    let z = Var::from_tensor(&Tensor::zeros((edges, trunc, c), DType::F32, &dev)?)?;
    let lz = loss(z.as_tensor())?;
    b.record(
        "loss_backward",
        "bwd",
        key,
        3.0 * e * tr * cf * F32,
        0.0,
        || {
            lz.backward()?;
            Ok(())
        },
    )?;

    // The fused rotate → SO(2) convolution → rotate back layer.
    let varmap = VarMap::new();
    let conv = So2Convolution::new(
        &So2ConvConfig::new(layout, c, c),
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
    )?;
    let radial = Var::from_tensor(&Tensor::randn(0f32, 1.0, (edges, conv.radial_len()), &dev)?)?;
    let rl = conv.radial_len() as f64;
    let layer_flops = 2.0 * rot_flops + e * so2_flops(layout, c) + e * tr * cf;
    let layer_bytes = e * (2.0 * fl * cf + rl + wl) * F32;
    b.record("so2_layer", "fwd", key, layer_bytes, layer_flops, || {
        conv.forward_rotated(x.as_tensor(), &wigner, Some(radial.as_tensor()))?;
        Ok(())
    })?;
    let (out, _) = conv.forward_rotated(x.as_tensor(), &wigner, Some(radial.as_tensor()))?;
    let l = loss(&out)?;
    let bwd_flops = 3.0 * rot_flops + 2.0 * e * so2_flops(layout, c) + 2.0 * e * tr * cf;
    let bwd_bytes = e * (3.0 * fl * cf + 2.0 * rl + wl) * F32;
    b.record("so2_layer", "bwd", key, bwd_bytes, bwd_flops, || {
        l.backward()?;
        Ok(())
    })?;

    // Segment softmax of attention logits and segment sum of messages into nodes.
    let nodes = (edges / EDGES_PER_NODE).max(1);
    let index: Vec<u32> = (0..edges).map(|i| (i % nodes) as u32).collect();
    let seg = Segments::from_indices(&index, nodes)?;
    let logits = Var::from_tensor(&Tensor::randn(0f32, 1.0, (edges, HEADS), &dev)?)?;
    let hf = HEADS as f64;
    b.record(
        "segment_softmax",
        "fwd",
        key,
        2.0 * e * hf * F32,
        5.0 * e * hf,
        || {
            seg.softmax(logits.as_tensor())?;
            Ok(())
        },
    )?;
    let l = loss(&seg.softmax(logits.as_tensor())?)?;
    b.record(
        "segment_softmax",
        "bwd",
        key,
        3.0 * e * hf * F32,
        4.0 * e * hf,
        || {
            l.backward()?;
            Ok(())
        },
    )?;
    let messages = x.as_tensor();
    b.record(
        "segment_sum",
        "fwd",
        key,
        (e + nodes as f64) * fl * cf * F32,
        e * fl * cf,
        || {
            seg.sum(messages)?;
            Ok(())
        },
    )?;

    // Separable S2 activation on the edge messages (the attention's nonlinearity).
    let grid = S2Grid::equiformer_v2(lmax, mmax, Some(18))?;
    let xs = Var::from_tensor(&Tensor::randn(
        0f32,
        1.0,
        (edges, grid.num_coefficients(), c),
        &dev,
    )?)?;
    let scalars = Var::from_tensor(&Tensor::randn(0f32, 1.0, (edges, c), &dev)?)?;
    let act = S2Inputs {
        grid: &grid,
        xs: &xs,
        scalars: &scalars,
    };
    if dev.is_cuda() {
        // Both CUDA paths side by side: the batched GEMMs with the dense matrices
        // ("s2_activation") and the fused kernels on the factored ones ("s2_activation_fused").
        use matscale_equivariant::switch::FUSED_S2_ACTIVATION;
        let dense = (grid.num_points() * grid.num_coefficients()) as f64;
        FUSED_S2_ACTIVATION.with(false, || {
            bench_s2_activation(b, key, "s2_activation", &act, dense)
        })?;
        let factored = grid.cpu_transform_macs() as f64;
        FUSED_S2_ACTIVATION.with(true, || {
            bench_s2_activation(b, key, "s2_activation_fused", &act, factored)
        })?;
    } else {
        bench_s2_activation(
            b,
            key,
            "s2_activation",
            &act,
            grid.cpu_transform_macs() as f64,
        )?;
    }
    Ok(())
}

/// The inputs of the S2 activation cells.
struct S2Inputs<'a> {
    grid: &'a S2Grid,
    xs: &'a Var,
    scalars: &'a Var,
}

/// The separable S2 activation forward and backward as `op`, counting `transform_macs`
/// multiply-adds per channel for one grid transform (the kernels' own count: factored over β
/// and α on the CPU and in the fused CUDA kernels, dense in the GEMM path) and SiLU at every
/// grid point.
fn bench_s2_activation(
    b: &mut Bench<'_>,
    key: CellKey,
    op: &'static str,
    act: &S2Inputs<'_>,
    transform_macs: f64,
) -> anyhow::Result<()> {
    let (e, c, k) = (
        act.xs.dims()[0],
        act.xs.dims()[2],
        act.grid.num_coefficients(),
    );
    let (e, cf, kf, gf) = (e as f64, c as f64, k as f64, act.grid.num_points() as f64);
    let act_flops = e * cf * (2.0 * 2.0 * transform_macs + 4.0 * gf);
    let run = || {
        act.grid
            .separable_s2_activation(act.scalars.as_tensor(), act.xs.as_tensor())
    };
    b.record(
        op,
        "fwd",
        key,
        e * cf * (2.0 * kf + 1.0) * F32,
        act_flops,
        || {
            run()?;
            Ok(())
        },
    )?;
    let l = loss(&run()?)?;
    b.record(
        op,
        "bwd",
        key,
        e * cf * (3.0 * kf + 2.0) * F32,
        1.5 * act_flops,
        || {
            l.backward()?;
            Ok(())
        },
    )?;
    Ok(())
}

/// Runs `cargo xtask bench kernels`.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!(
            "warning: this xtask was built with the dev profile, where matscale's kernels are \
             not vectorised (2-15x slower); run `cargo xtask bench kernels` (release) for \
             figures to quote"
        );
    }
    let request: DeviceRequest = args.device.parse().map_err(anyhow::Error::msg)?;
    let selected = select_device(request);
    let device = selected.device.clone();
    let mut peaks = if device.is_cuda() {
        gpu_peaks(&device)
    } else {
        cpu_peaks()?
    };
    peaks.launch_floor_s = launch_floor(&device)?;
    eprintln!(
        "kernels on {}: {}; launch floor {:.1} µs",
        selected.label(),
        peaks.how,
        peaks.launch_floor_s * 1e6
    );
    let edges: Vec<usize> = match std::env::var("MATSCALE_BENCH_EDGES") {
        Ok(v) => v
            .split(',')
            .map(|s| {
                s.trim()
                    .parse::<usize>()
                    .with_context(|| format!("MATSCALE_BENCH_EDGES entry {s:?}"))
            })
            .collect::<anyhow::Result<_>>()?,
        Err(_) if device.is_cuda() => vec![10_000, 100_000],
        Err(_) => vec![10_000],
    };
    let mut bench = Bench {
        device: &device,
        budget_s: if args.quick { 0.05 } else { 0.5 },
        peaks: &peaks,
        out: Vec::new(),
    };
    for &config in &CONFIGS {
        for &e in &edges {
            bench_config(&mut bench, config, e)?;
        }
    }
    let report = Report {
        device: selected.label().into(),
        requested: request.to_string(),
        fallback: selected.fallback.clone(),
        dtype: "f32",
        measurements: bench.out,
        peaks,
    };
    let path = args.out.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "bench-kernels-{}.json",
            selected.label().replace(':', "")
        ))
    });
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    if args.reference {
        // PyTorch runs in another process: give it the memory our pool keeps cached (on an
        // H100 the reference ran out of memory beside 63 GB of cached buffers, session 19).
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(dev) = &device {
            if let Err(e) = matscale_equivariant::cuda::release_cached_memory(dev) {
                eprintln!(
                    "could not release the cached CUDA memory ({e}); the reference may run short"
                );
            }
        }
        // From the current directory when it is a checkout (the GPU machine runs a carried
        // binary whose build-time workspace path does not exist there), else the workspace.
        const SCRIPT: &str = "crates/equivariant/benches/kernels_reference.py";
        let script = if std::path::Path::new(SCRIPT).exists() {
            PathBuf::from(SCRIPT)
        } else {
            crate::bench::workspace_root().join(SCRIPT)
        };
        let reference_out = path.with_file_name(format!(
            "bench-kernels-reference-{}.json",
            selected.label().replace(':', "")
        ));
        let status = std::process::Command::new(&args.python)
            .arg(&script)
            .args(["--device", if device.is_cuda() { "cuda" } else { "cpu" }])
            .args([
                "--edges",
                &edges
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ])
            .arg("--ours")
            .arg(&path)
            .arg("--out")
            .arg(&reference_out)
            .status()
            .with_context(|| format!("running {}", script.display()))?;
        anyhow::ensure!(status.success(), "{} failed ({status})", script.display());
    }
    Ok(())
}
