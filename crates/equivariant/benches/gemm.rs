//! The GEMM ceiling of the fused SO(2) layer: [`linalg::gemm`] alone, on one thread, on the
//! products the layer runs for one chunk of edges (same shapes and chunk size: 128 edges
//! under 1 M packed weights, 256 above: `so2::fused_chunk_cap`; edge rows
//! of the m-major `[chunk, trunc, C]` buffers, the packed weights), without the rotations,
//! radial scaling or anything else. One difference: for each order `m > 0` the layer's first
//! product reads a compact `[chunk, n_l·C]` sum `x₊ + x₋` (or `g₊ + g₋`); here it reads the
//! strided buffer too.
//! Cases: the per-edge layers `l4_m2_c64`, `l6_m4_c128` (`C → C`) and EquiformerV2's gathered
//! message layers `l4_m2_c64_gather`, `l6_m4_c128_gather` (`cat(x[src], x[dst])`: `2C → C`).
//! At `lmax` 6, `mmax` 4, 128 channels this is the floor of the layer's time: no rotation or
//! fusion can make the layer faster than its GEMMs.
//!
//! Also a 512³ product, the practical peak of one core, and the core's FMA peak: 12
//! independent chains of the widest fused multiply-add the CPU has (AVX-512, else AVX2),
//! nothing else in the loop, so no GEMM on this core can run faster. Each layer case prints
//! its time at that peak too: the hard floor, which no implementation (ours, MKL's) can beat
//! without doing fewer multiplications. Every figure is the best of
//! `MATSCALE_BENCH_REPEATS` (default 5) timed passes after a warm-up, f32, one thread
//! (the layer runs one chunk per rayon task, each GEMM single-threaded).
//!
//! Every pass is also timed with [`gemm_packed`] as the layer runs it on AVX-512: against
//! weights packed once beforehand ([`PackedRhs`]), and for the weight gradient with `g`
//! packed inside the clock for each product (`…_packed`); then again with Strassen's
//! algorithm where [`PackedRhs::pack`] chooses it (`…_strassen`). (The bench's chunk is the
//! cap, 128 or 256 edges; the layer's chunks at 10⁴ edges on two threads are 125 or 250, so
//! at 4 / 2 / 64 its weight gradient, on odd chunks, stays plain.)
//!
//! Run: `cargo bench -p matscale-equivariant --bench gemm`; side by side with `torch.addmm`
//! (MKL / oneDNN) on the same shapes and strides:
//! `python crates/equivariant/benches/gemm_torch.py compare`.
//! Prints one `RESULT {json}` line per case: `gflops` (best), `flops` (per pass) and, for the
//! layer cases, `seconds_per_1e4_edges` (the pass scaled to 10⁴ edges).

use std::time::Instant;

use matscale_equivariant::linalg::{gemm, gemm_packed, view, PackedRhs};
use matscale_equivariant::so2::fused_chunk_cap;

/// Which buffer an operand reads.
#[derive(Clone, Copy)]
enum Src {
    /// The chunk's m-major input rows `[chunk, trunc·C_in]`.
    In,
    /// The chunk's m-major output-gradient rows `[chunk, trunc·C_out]`.
    Out,
    /// The packed weights.
    W,
}

/// One GEMM of the layer: `(m, n, k)`, each operand's buffer and `(offset, row stride,
/// column stride)` in it.
#[derive(Clone, Copy)]
struct Product {
    mnk: (usize, usize, usize),
    lhs: (Src, usize, usize, usize),
    rhs: (Src, usize, usize, usize),
}

/// A named pass (`forward`, `input_grad`, `weight_grad`) and its products.
type Pass = (&'static str, Vec<Product>);

/// The products of one chunk of a `C_in → C_out` layer: forward (`x·W` per order), input
/// gradient (`g·Wᵀ`, with `Wᵀ` contiguous as the layer's backward keeps it) and weight
/// gradient (`xᵀ·g`), with the 3-multiplication complex product
/// for `m > 0` (three products per order and direction, each `[chunk, n_l·C_in] × [n_l·C_in,
/// n_l·C_out]` or its transpose). Also returns the row lengths of the two activation buffers
/// (`trunc·C_in`, `trunc·C_out`) and the layer's chunk size for its packed weight count
/// ([`fused_chunk_cap`]; at 10⁴ edges and two threads the size it runs). EquiformerV2's
/// gathered message layer is `2C → C`.
fn layer_products(
    lmax: usize,
    mmax: usize,
    c_in: usize,
    c_out: usize,
) -> ((usize, usize), usize, [Pass; 3]) {
    // m-major rows: m = 0 holds lmax + 1 degrees, each m > 0 holds 2·(lmax + 1 − m).
    let sizes: Vec<usize> = (0..=mmax).map(|m| lmax + 1 - m).collect();
    let trunc: usize = sizes[0] + 2 * sizes[1..].iter().sum::<usize>();
    let (rs_in, rs_out) = (trunc * c_in, trunc * c_out);
    // Packed weights: W₀ and its bias, then three matrices per order m > 0.
    let weights: usize = sizes
        .iter()
        .enumerate()
        .map(|(m, &n_l)| {
            let (k, n) = (n_l * c_in, n_l * c_out);
            if m == 0 {
                k * n + n
            } else {
                3 * k * n
            }
        })
        .sum();
    let chunk = fused_chunk_cap(weights);
    let (mut fwd, mut dx, mut dw) = (Vec::new(), Vec::new(), Vec::new());
    let (mut slot, mut woff) = (0, 0);
    for (m, &n_l) in sizes.iter().enumerate() {
        let (k, n) = (n_l * c_in, n_l * c_out);
        let copies = if m == 0 { 1 } else { 3 };
        for i in 0..copies {
            let x_off = slot * c_in + if i == 2 { k } else { 0 };
            let g_off = slot * c_out + if i == 2 { n } else { 0 };
            let w_off = woff + i * k * n;
            fwd.push(Product {
                mnk: (chunk, n, k),
                lhs: (Src::In, x_off, rs_in, 1),
                rhs: (Src::W, w_off, n, 1),
            });
            dx.push(Product {
                mnk: (chunk, k, n),
                lhs: (Src::Out, g_off, rs_out, 1),
                rhs: (Src::W, w_off, k, 1),
            });
            dw.push(Product {
                mnk: (k, n, chunk),
                lhs: (Src::In, x_off, 1, rs_in),
                rhs: (Src::Out, g_off, rs_out, 1),
            });
        }
        slot += if m == 0 { n_l } else { 2 * n_l };
        woff += copies * k * n;
    }
    (
        (rs_in, rs_out),
        chunk,
        [("forward", fwd), ("input_grad", dx), ("weight_grad", dw)],
    )
}

fn flops(products: &[Product]) -> f64 {
    products
        .iter()
        .map(|p| 2.0 * (p.mnk.0 * p.mnk.1 * p.mnk.2) as f64)
        .sum()
}

/// The three buffers the products read: input rows, output-gradient rows, weights.
struct Buffers {
    input: Vec<f32>,
    output: Vec<f32>,
    weights: Vec<f32>,
}

impl Buffers {
    fn get(&self, src: Src) -> &[f32] {
        match src {
            Src::In => &self.input,
            Src::Out => &self.output,
            Src::W => &self.weights,
        }
    }
}

/// Best seconds of `repeats` runs of `pass` on `out`, after one warm-up run.
fn best_of(repeats: usize, out: &mut [f32], pass: impl Fn(&mut [f32])) -> f64 {
    pass(out);
    (0..repeats)
        .map(|_| {
            let t = Instant::now();
            pass(out);
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Best seconds of `repeats` passes of `products` (after one warm-up pass).
fn time(products: &[Product], bufs: &Buffers, out: &mut [f32], repeats: usize) -> f64 {
    best_of(repeats, out, |out| {
        for p in products {
            let (m, n, k) = p.mnk;
            let (ls, lo, lr, lc) = p.lhs;
            let (rs, ro, rr, rc) = p.rhs;
            gemm(
                (m, n, k),
                out,
                0,
                n,
                true,
                view(bufs.get(ls), lo, lr, lc),
                view(bufs.get(rs), ro, rr, rc),
                1.0,
            );
        }
    })
}

/// [`time`] with [`gemm_packed`]: every weight factor packed once beforehand ([`PackedRhs`],
/// outside the clock, as the layer packs once per call); the weight gradient's right factor
/// `g`, which changes with every chunk, packed inside the clock for each product, as the
/// layer's `weight_product` does. Plain packing, or `strassen` for [`PackedRhs::pack`]'s
/// choice. `None` where a factor cannot be packed (no AVX-512, or a width that is not whole
/// panels), or with `strassen` where no product takes Strassen's form.
fn time_packed(
    products: &[Product],
    bufs: &Buffers,
    out: &mut [f32],
    repeats: usize,
    strassen: bool,
) -> Option<f64> {
    let pack = |p: &Product| {
        let (_, n, k) = p.mnk;
        let (src, off, rs, cs) = p.rhs;
        let rhs = view(bufs.get(src), off, rs, cs);
        if strassen {
            PackedRhs::pack(rhs, (k, n), 1.0f32)
        } else {
            PackedRhs::pack_plain(rhs, (k, n), 1.0f32)
        }
    };
    let forms = products.iter().map(pack).collect::<Option<Vec<_>>>()?;
    if strassen && !forms.iter().any(PackedRhs::is_strassen) {
        return None;
    }
    // Packed once (weights), or `None` for a factor packed per product (`g`).
    let once: Vec<Option<PackedRhs>> = products
        .iter()
        .zip(forms)
        .map(|(p, f)| matches!(p.rhs.0, Src::W).then_some(f))
        .collect();
    Some(best_of(repeats, out, |out| {
        for (p, w) in products.iter().zip(&once) {
            let (ls, lo, lr, lc) = p.lhs;
            let per_product;
            let w = match w {
                Some(w) => w,
                None => {
                    per_product = pack(p).expect("packable (checked above)");
                    &per_product
                }
            };
            gemm_packed(
                p.mnk,
                out,
                0,
                p.mnk.1,
                true,
                view(bufs.get(ls), lo, lr, lc),
                w,
            );
        }
    }))
}

/// Multiply-adds per FMA-peak pass: 12 register chains × `FMA_ITERS` iterations.
#[cfg(target_arch = "x86_64")]
const FMA_ITERS: u64 = 20_000_000;

/// Defines `unsafe fn $name(iters: u64)`: 12 independent chains of `vfmadd231ps` on registers
/// of class `$class` (`a0..a11 += a12 · a13`, all zeroed first with `$zero`, so never denormal),
/// `iters` times; two per cycle keep both FMA pipes busy whatever their latency. Inline
/// assembly, so that the compiler neither spills the chains nor folds them away (the std
/// AVX-512 intrinsics also need Rust 1.89, above the workspace's MSRV).
macro_rules! fma_chains {
    ($(#[$doc:meta])* $name:ident, $feature:literal, $class:ident, $zero:literal) => {
        $(#[$doc])*
        ///
        /// # Safety
        #[doc = concat!("The CPU must support ", $feature, "; `iters` must be at least 1.")]
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        unsafe fn $name(iters: u64) {
            // SAFETY: registers only (all operands), no memory or stack; the target feature the
            // instructions need is enabled.
            unsafe {
                std::arch::asm!(
                    concat!($zero, " {a0}, {a0}, {a0}"), concat!($zero, " {a1}, {a1}, {a1}"),
                    concat!($zero, " {a2}, {a2}, {a2}"), concat!($zero, " {a3}, {a3}, {a3}"),
                    concat!($zero, " {a4}, {a4}, {a4}"), concat!($zero, " {a5}, {a5}, {a5}"),
                    concat!($zero, " {a6}, {a6}, {a6}"), concat!($zero, " {a7}, {a7}, {a7}"),
                    concat!($zero, " {a8}, {a8}, {a8}"), concat!($zero, " {a9}, {a9}, {a9}"),
                    concat!($zero, " {a10}, {a10}, {a10}"), concat!($zero, " {a11}, {a11}, {a11}"),
                    concat!($zero, " {a12}, {a12}, {a12}"), concat!($zero, " {a13}, {a13}, {a13}"),
                    "2:",
                    "vfmadd231ps {a0}, {a12}, {a13}", "vfmadd231ps {a1}, {a12}, {a13}",
                    "vfmadd231ps {a2}, {a12}, {a13}", "vfmadd231ps {a3}, {a12}, {a13}",
                    "vfmadd231ps {a4}, {a12}, {a13}", "vfmadd231ps {a5}, {a12}, {a13}",
                    "vfmadd231ps {a6}, {a12}, {a13}", "vfmadd231ps {a7}, {a12}, {a13}",
                    "vfmadd231ps {a8}, {a12}, {a13}", "vfmadd231ps {a9}, {a12}, {a13}",
                    "vfmadd231ps {a10}, {a12}, {a13}", "vfmadd231ps {a11}, {a12}, {a13}",
                    "dec {n}",
                    "jnz 2b",
                    n = inout(reg) iters => _,
                    a0 = out($class) _, a1 = out($class) _, a2 = out($class) _,
                    a3 = out($class) _, a4 = out($class) _, a5 = out($class) _,
                    a6 = out($class) _, a7 = out($class) _, a8 = out($class) _,
                    a9 = out($class) _, a10 = out($class) _, a11 = out($class) _,
                    a12 = out($class) _, a13 = out($class) _,
                    options(nomem, nostack),
                );
            }
        }
    };
}

fma_chains!(
    /// 16-lane chains on `zmm` registers (AVX-512F).
    fma_chains_avx512,
    "avx512f",
    zmm_reg,
    "vpxord"
);
fma_chains!(
    /// 8-lane chains on `ymm` registers (AVX2 + FMA).
    fma_chains_avx2,
    "avx,fma",
    ymm_reg,
    "vxorps"
);

/// The core's f32 FMA peak in FLOP/s (best of `repeats`) and the instruction set measured,
/// or `None` off x86-64 or without AVX2 + FMA.
fn fma_peak(repeats: usize) -> Option<(f64, &'static str)> {
    #[cfg(target_arch = "x86_64")]
    {
        let (lanes, isa, run): (u64, &str, unsafe fn(u64)) = if is_x86_feature_detected!("avx512f")
        {
            (16, "avx512f", fma_chains_avx512)
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            (8, "avx2+fma", fma_chains_avx2)
        } else {
            return None;
        };
        let best = (0..=repeats)
            .map(|_| {
                let t = Instant::now();
                // SAFETY: the instruction set `run` needs was detected above; FMA_ITERS > 0.
                unsafe { run(std::hint::black_box(FMA_ITERS)) };
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        Some(((FMA_ITERS * 12 * lanes * 2) as f64 / best, isa))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = repeats;
        None
    }
}

/// A deterministic, non-trivial fill.
fn fill(len: usize, period: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i % period) as f32 - (period / 2) as f32) * 0.01)
        .collect()
}

fn main() {
    let repeats = std::env::var("MATSCALE_BENCH_REPEATS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(5);
    // The layer runs each GEMM on one thread; so does this bench (`Parallelism::None`).
    let square = Product {
        mnk: (512, 512, 512),
        lhs: (Src::In, 0, 512, 1),
        rhs: (Src::W, 0, 512, 1),
    };
    let bufs = Buffers {
        input: vec![0.5f32; 512 * 512],
        output: Vec::new(),
        weights: vec![0.25f32; 512 * 512],
    };
    let mut out = vec![0f32; 512 * 512];
    let per = flops(&[square]);
    let best = time(&[square], &bufs, &mut out, repeats * 4);
    println!(
        "gemm peak 512x512x512: {:.1} GFLOP/s (one thread)",
        per / best / 1e9
    );
    println!(
        "RESULT {{\"case\": \"square512\", \"gflops\": {:.3}, \"flops\": {per}}}",
        per / best / 1e9
    );
    let peak = fma_peak(repeats);
    match peak {
        Some((rate, isa)) => {
            println!(
                "fma peak ({isa}, 12 chains): {:.1} GFLOP/s (one thread); 512^3 gemm at {:.1} %",
                rate / 1e9,
                100.0 * per / best / rate
            );
            println!(
                "RESULT {{\"case\": \"fma_peak\", \"isa\": \"{isa}\", \"gflops\": {:.3}}}",
                rate / 1e9
            );
        }
        None => println!("fma peak: not measured (needs x86-64 with AVX2 + FMA)"),
    }
    // (lmax, mmax, C_in, C_out, name): the per-edge layers, then EquiformerV2's gathered
    // message layers (`cat(x[src], x[dst])`: 2C → C).
    for (lmax, mmax, c_in, c_out, form) in [
        (4, 2, 64, 64, ""),
        (6, 4, 128, 128, ""),
        (4, 2, 128, 64, "_gather"),
        (6, 4, 256, 128, "_gather"),
    ] {
        let ((rs_in, rs_out), chunk, passes) = layer_products(lmax, mmax, c_in, c_out);
        let case = format!("l{lmax}_m{mmax}_c{c_out}{form}");
        for (name, products) in passes {
            let w_len = products
                .iter()
                .filter(|p| matches!(p.rhs.0, Src::W))
                .map(|p| p.rhs.1 + p.mnk.1 * p.mnk.2)
                .max()
                .unwrap_or(0);
            let bufs = Buffers {
                input: fill(chunk * rs_in, 89),
                output: fill(chunk * rs_out, 83),
                weights: fill(w_len, 97),
            };
            let out_len = products
                .iter()
                .map(|p| p.mnk.0 * p.mnk.1)
                .max()
                .unwrap_or(0);
            let mut out = vec![0f32; out_len];
            let per = flops(&products);
            let best = time(&products, &bufs, &mut out, repeats);
            let per_1e4 = best * 1e4 / chunk as f64;
            // The pass at the FMA peak, scaled to 10⁴ edges: the floor no GEMM can beat.
            let at_peak = peak.map(|(rate, _)| per * 1e4 / chunk as f64 / rate);
            println!(
                "gemm layer {case} {name} ({chunk}-edge chunks): {:.1} GFLOP/s, {:.1} ms per 10^4 \
                 edges (one thread){}",
                per / best / 1e9,
                per_1e4 * 1e3,
                at_peak.map_or(String::new(), |t| format!(
                    "; {:.1} ms at the FMA peak (runs at {:.1} % of it)",
                    t * 1e3,
                    100.0 * t / per_1e4
                ))
            );
            println!(
                "RESULT {{\"case\": \"{case}\", \"pass\": \"{name}\", \"gflops\": {:.3}, \
                 \"chunk\": {chunk}, \"flops\": {per}, \"seconds_per_1e4_edges\": {per_1e4}, \
                 \"seconds_per_1e4_edges_at_fma_peak\": {}}}",
                per / best / 1e9,
                at_peak.map_or("null".to_string(), |t| t.to_string())
            );
            // The same products against weights packed once, as the layer runs them: plain,
            // then with Strassen's algorithm where `PackedRhs::pack` chooses it (its rate is
            // the effective one, the plain product's FLOPs over its time, and can pass the peak).
            for (strassen, label) in [(false, "packed"), (true, "strassen")] {
                let Some(best) = time_packed(&products, &bufs, &mut out, repeats, strassen) else {
                    continue;
                };
                let per_1e4 = best * 1e4 / chunk as f64;
                println!(
                    "gemm_{label} layer {case} {name}: {:.1} GFLOP/s, {:.1} ms per 10^4 edges{}",
                    per / best / 1e9,
                    per_1e4 * 1e3,
                    at_peak.map_or(String::new(), |t| format!(
                        " ({:.1} % of the FMA peak)",
                        100.0 * t / per_1e4
                    ))
                );
                println!(
                    "RESULT {{\"case\": \"{case}\", \"pass\": \"{name}_{label}\", \
                     \"gflops\": {:.3}, \"chunk\": {chunk}, \"flops\": {per}, \
                     \"seconds_per_1e4_edges\": {per_1e4}}}",
                    per / best / 1e9
                );
            }
        }
    }
}
