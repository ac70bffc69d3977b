//! Edge frames and their Wigner-D blocks built on the device (`kernels/wigner.cu`).
//!
//! [`crate::frames::edge_wigner`] calls [`edge_wigner`] when the edge vectors live on a CUDA
//! device: the frames, their Euler angles and the blocks `D^l = Z(α) J Z(β) J Z(γ)` are all
//! computed there (in f64, stored in the dtype of the edge vectors), so no edge-sized array
//! crosses the bus. Random rolls draw their helper vectors on the host with the same
//! generator as the CPU path (three f64 per edge), so both paths give the same frames.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, DType, Device, Layout, Shape, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{kernel, launch_cfg, long, upload, view, CudaFloat, WIGNER};
use crate::error::{EquivariantError, Result};
use crate::frames::Roll;
use crate::wigner::{blocks_len, j_matrix, WignerBlocks, WIGNER_LMAX};

/// Threads per edge of the one-block-per-edge kernel (`edge_wigner`).
const THREADS_PER_EDGE: u32 = 128;

/// The concatenated `J_l` blocks for `l ≤ lmax`, laid out like a Wigner row.
fn j_blocks(lmax: usize) -> Result<Vec<f64>> {
    let mut all = Vec::with_capacity(blocks_len(lmax));
    for l in 0..=lmax {
        all.extend_from_slice(j_matrix(l)?);
    }
    Ok(all)
}

fn launch<T: CudaFloat>(
    edge: (&CudaStorage, &Layout),
    helpers: Option<(&CudaStorage, &Layout)>,
    lmax: usize,
    edges: usize,
) -> candle_core::Result<(CudaStorage, i32)> {
    const NAME: &str = "edge-wigner";
    let dev = &edge.0.device;
    let ev = view::<T>(edge.0, edge.1, NAME)?;
    let wlen = blocks_len(lmax);
    let two_pass = crate::switch::WIGNER_TWO_PASS.enabled();
    // SAFETY: either launch shape writes every output entry (zeros for a degenerate edge): the
    // entries kernel one thread per entry, `edge_wigner` every entry of every edge of its
    // edge-stride loop.
    let mut out = unsafe { super::uninit::<T>(dev, edges * wlen) }?;
    let sentinel = i32::try_from(edges).map_err(candle_core::Error::wrap)?;
    let mut bad = upload(dev, &[sentinel])?;
    if edges > 0 {
        let j = upload(dev, &j_blocks(lmax).map_err(candle_core::Error::wrap)?)?;
        let dummy = upload(dev, &[0.0f64])?;
        let hv = helpers.map(|h| view::<f64>(h.0, h.1, NAME)).transpose()?;
        let (e, l, w, has) = (
            long(edges),
            lmax as i32,
            wlen as i32,
            i32::from(hv.is_some()),
        );
        if two_pass {
            // SAFETY: the tables kernel writes every edge's flag, and the tables of every edge
            // whose flag is set (the only ones the entries kernel reads).
            let mut tables = unsafe { dev.alloc::<f64>(edges * 3 * (lmax + 1) * 2) }?;
            let mut ok = unsafe { dev.alloc::<i32>(edges) }?;
            let func = kernel::<T>(dev, WIGNER, "edge_wigner_tables")?;
            let mut b = func.builder();
            b.arg(&e).arg(&l).arg(&ev);
            match &hv {
                Some(h) => b.arg(h),
                None => b.arg(&dummy),
            };
            b.arg(&has).arg(&mut tables).arg(&mut ok).arg(&mut bad);
            // SAFETY: edge_vec [edges, 3], helpers [edges, 3] f64 when present, tables
            // [edges, 3, lmax + 1, 2], ok [edges], bad one int.
            unsafe { b.launch(launch_cfg(edges)) }.w()?;
            let total = edges * wlen;
            let t = long(total);
            let func = kernel::<T>(dev, WIGNER, "edge_wigner_entries")?;
            let mut b = func.builder();
            b.arg(&t)
                .arg(&l)
                .arg(&w)
                .arg(&tables)
                .arg(&ok)
                .arg(&j)
                .arg(&mut out);
            // SAFETY: tables and ok as written above, J blocks_len(lmax), out [edges, wlen].
            unsafe { b.launch(launch_cfg(total)) }.w()?;
        } else {
            let func = kernel::<T>(dev, WIGNER, "edge_wigner")?;
            let mut b = func.builder();
            b.arg(&e).arg(&l).arg(&w).arg(&ev);
            match &hv {
                Some(h) => b.arg(h),
                None => b.arg(&dummy),
            };
            b.arg(&has).arg(&j).arg(&mut out).arg(&mut bad);
            let cfg = LaunchConfig {
                grid_dim: (u32::try_from(edges.min(1 << 20)).expect("capped"), 1, 1),
                block_dim: (THREADS_PER_EDGE, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: edge_vec [edges, 3], helpers [edges, 3] f64 when present, J
            // blocks_len(lmax), out [edges, wlen], bad one int.
            unsafe { b.launch(cfg) }.w()?;
        }
    }
    let first_bad = dev.clone_dtoh(&bad)?[0];
    Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), first_bad))
}

/// The custom op that runs the kernel: `(edge_vec [E, 3][, helpers [E, 3] f64])` →
/// `[E, blocks_len(lmax)]`; the first degenerate edge index (or `E`) is reported through
/// `bad`.
struct EdgeWignerOp {
    lmax: usize,
    bad: std::sync::Mutex<Option<usize>>,
}

impl EdgeWignerOp {
    fn run(
        &self,
        edge: (&CudaStorage, &Layout),
        helpers: Option<(&CudaStorage, &Layout)>,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (edges, three) = edge.1.shape().dims2()?;
        if three != 3 {
            candle_core::bail!("edge-wigner: expected [E, 3] edge vectors");
        }
        let (out, first_bad) = match edge.0.dtype() {
            DType::F32 => launch::<f32>(edge, helpers, self.lmax, edges)?,
            DType::F64 => launch::<f64>(edge, helpers, self.lmax, edges)?,
            other => candle_core::bail!("edge-wigner: unsupported dtype {other:?}"),
        };
        let first_bad = usize::try_from(first_bad).unwrap_or(0);
        *self
            .bad
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            (first_bad < edges).then_some(first_bad);
        Ok((out, Shape::from((edges, blocks_len(self.lmax)))))
    }
}

impl candle_core::CustomOp1 for EdgeWignerOp {
    fn name(&self) -> &'static str {
        "edge-wigner"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!(
            "edge-wigner: the device path runs on CUDA only (frames.rs is the CPU path)"
        )
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        self.run((s, l), None)
    }
}

impl candle_core::CustomOp2 for EdgeWignerOp {
    fn name(&self) -> &'static str {
        "edge-wigner-helpers"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!(
            "edge-wigner: the device path runs on CUDA only (frames.rs is the CPU path)"
        )
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.run((s1, l1), Some((s2, l2)))
    }
}

fn check_rows(t: &Tensor, arg: &'static str, edges: Option<usize>) -> Result<()> {
    match (t.dims(), edges) {
        ([e, 3], Some(n)) if *e == n => Ok(()),
        ([_, 3], None) => Ok(()),
        (found, _) => Err(EquivariantError::ShapeMismatch {
            arg,
            expected: match edges {
                Some(n) => format!("[{n}, 3] (one helper per edge)"),
                None => "[num_edges, 3]".into(),
            },
            found: found.to_vec(),
        }),
    }
}

/// [`crate::frames::edge_wigner`] on a CUDA device: the Wigner-D blocks of the edge frames of
/// `edge_vec` (`[E, 3]`, f32 or f64, on CUDA), detached, in its dtype and on its device.
///
/// # Errors
/// As [`crate::frames::edge_wigner`]: [`EquivariantError::DegenerateEdge`] names the first
/// zero or non-finite edge (or aligned helper); shape, dtype and degree errors as there.
pub fn edge_wigner(edge_vec: &Tensor, lmax: usize, roll: &Roll<'_>) -> Result<WignerBlocks> {
    if lmax > WIGNER_LMAX {
        return Err(EquivariantError::InvalidDegree {
            name: "lmax",
            value: lmax,
            limit: WIGNER_LMAX,
        });
    }
    let dtype = edge_vec.dtype();
    if !matches!(dtype, DType::F32 | DType::F64) {
        return Err(EquivariantError::UnsupportedDType {
            arg: "edge_vec",
            found: dtype,
        });
    }
    check_rows(edge_vec, "edge_vec", None)?;
    let edges = edge_vec.dim(0)?;
    let device: &Device = edge_vec.device();
    let helpers = match roll {
        Roll::Helpers(t) => {
            check_rows(t, "helpers", Some(edges))?;
            Some(
                t.detach()
                    .to_device(device)?
                    .to_dtype(DType::F64)?
                    .contiguous()?,
            )
        }
        Roll::Random { seed } => {
            // The same draws as `frames::edge_rotations`: three uniform f64 per edge, minus 0.5.
            let mut rng = ChaCha8Rng::seed_from_u64(*seed);
            let h: Vec<f64> = (0..3 * edges).map(|_| rng.gen::<f64>() - 0.5).collect();
            Some(Tensor::from_vec(h, (edges, 3), device)?)
        }
        Roll::Zero => None,
    };
    let op = EdgeWignerOp {
        lmax,
        bad: std::sync::Mutex::new(None),
    };
    let ev = edge_vec.detach().contiguous()?;
    let blocks = match &helpers {
        Some(h) => ev.apply_op2_no_bwd(h, &op)?,
        None => ev.apply_op1_no_bwd(&op)?,
    };
    let bad = *op
        .bad
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(index) = bad {
        let e: Vec<f64> = ev.get(index)?.to_dtype(DType::F64)?.to_vec1()?;
        let reason = match &helpers {
            Some(h) => {
                let hv: Vec<f64> = h.get(index)?.to_vec1()?;
                format!(
                    "edge vector {e:?} with helper {hv:?}: a zero or non-finite vector, or a helper \
                     aligned with the edge (|cos| ≥ 0.99)"
                )
            }
            None => format!("edge vector {e:?} has zero or non-finite length"),
        };
        return Err(EquivariantError::DegenerateEdge { index, reason });
    }
    WignerBlocks::new(blocks, lmax)
}
