//! CUDA implementations of this crate's candle ops (`cuda` feature).
//!
//! Every op keeps its CPU kernel as the reference; the `cuda_fwd` of its `CustomOp` delegates
//! here in one line. The kernels (`kernels/*.cu`) are compiled to PTX by `build.rs` with nvcc
//! and embedded in the binary; each module is loaded once per device by candle's
//! `get_or_load_custom_func` and runs on candle's stream, on memory candle allocated
//! (`CudaStorage::as_cuda_slice` in, `CudaStorage::wrap_cuda_slice` out), so the ops mix
//! freely with candle's own CUDA ops. Dense products (the SO(2) maps, the S2 grid transforms)
//! go to candle's cuBLAS handle. Index tables (Wigner row maps, grid matrices) are small host
//! arrays copied to the device on each call; a segment grouping's CSR arrays are copied once
//! and kept with the grouping (`segment::DeviceCsrCache`).
//!
//! Device selection and the CPU fallback live in [`crate::device`].

pub(crate) mod elementwise;
pub(crate) mod norm;
pub(crate) mod s2grid;
pub(crate) mod segment;
pub(crate) mod sh;
pub(crate) mod so2;
pub mod wigner;

pub use crate::switch::{PathSwitch, FUSED_S2_ACTIVATION, LAYER_NORM_SH, WIGNER_TWO_PASS};

pub use elementwise::{
    adamw_moments, adamw_multi, adamw_param, shifted_softplus, sum_squares_multi,
    sum_squares_partials, AdamWScalars, SUM_SQUARES_BLOCKS,
};

use candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t;
use candle_core::cuda_backend::cudarc::cublas::{CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaStream, LaunchArgs};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, WithDType};

/// One PTX module: its name for candle's module cache and its text.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Module {
    name: &'static str,
    ptx: &'static str,
}

macro_rules! ptx_module {
    ($const:ident, $file:literal) => {
        pub(crate) const $const: Module = Module {
            name: concat!("matscale_", $file),
            ptx: include_str!(concat!(env!("OUT_DIR"), "/", $file, ".ptx")),
        };
    };
}

ptx_module!(SH, "sh");
ptx_module!(ROTATE, "rotate");
ptx_module!(SEGMENT, "segment");
ptx_module!(ELEMENTWISE, "elementwise");
ptx_module!(WIGNER, "wigner");
ptx_module!(NORM, "norm");
ptx_module!(S2FUSED, "s2fused");

/// Every PTX module (for the load test of `tests/cuda.rs`).
pub const MODULE_NAMES: [&str; 7] = [
    "sh",
    "rotate",
    "segment",
    "elementwise",
    "wigner",
    "norm",
    "s2fused",
];

/// Threads per block of the elementwise-style kernels.
const BLOCK: u32 = 256;

/// Most blocks of a grid-stride launch (enough to fill any current GPU many times over).
const MAX_BLOCKS: usize = 1 << 16;

/// Float types of the kernels (f32 and f64): the suffix of their PTX names and their GEMM.
pub(crate) trait CudaFloat:
    WithDType + DeviceRepr + ValidAsZeroBits + CudaDType + Copy + Default + Send + Sync
{
    /// `f32` or `f64`, the suffix of the kernel names.
    const SUFFIX: &'static str;

    /// cuBLAS `gemm` on this type.
    ///
    /// # Safety
    /// The matrices described by `cfg` must lie inside `a`, `b` and `c`.
    unsafe fn blas_gemm(
        blas: &CudaBlas,
        cfg: GemmConfig<Self>,
        a: &CudaView<'_, Self>,
        b: &CudaView<'_, Self>,
        c: &mut CudaSlice<Self>,
        c_off: usize,
    ) -> candle_core::Result<()>;

    /// cuBLAS strided-batched `gemm` on this type.
    ///
    /// # Safety
    /// Every batch's matrices must lie inside `a`, `b` and `c`.
    unsafe fn blas_gemm_batched(
        blas: &CudaBlas,
        cfg: StridedBatchedConfig<Self>,
        a: &CudaView<'_, Self>,
        b: &CudaView<'_, Self>,
        c: &mut CudaSlice<Self>,
        c_off: usize,
    ) -> candle_core::Result<()>;
}

macro_rules! cuda_float {
    ($t:ty, $suffix:literal) => {
        impl CudaFloat for $t {
            const SUFFIX: &'static str = $suffix;

            unsafe fn blas_gemm(
                blas: &CudaBlas,
                cfg: GemmConfig<Self>,
                a: &CudaView<'_, Self>,
                b: &CudaView<'_, Self>,
                c: &mut CudaSlice<Self>,
                c_off: usize,
            ) -> candle_core::Result<()> {
                let mut c = c.slice_mut(c_off..);
                // SAFETY: forwarded to the caller.
                unsafe { blas.gemm(cfg, a, b, &mut c) }.w()
            }

            unsafe fn blas_gemm_batched(
                blas: &CudaBlas,
                cfg: StridedBatchedConfig<Self>,
                a: &CudaView<'_, Self>,
                b: &CudaView<'_, Self>,
                c: &mut CudaSlice<Self>,
                c_off: usize,
            ) -> candle_core::Result<()> {
                let mut c = c.slice_mut(c_off..);
                // SAFETY: forwarded to the caller.
                unsafe { blas.gemm_strided_batched(cfg, a, b, &mut c) }.w()
            }
        }
    };
}

cuda_float!(f32, "f32");
cuda_float!(f64, "f64");

/// A loaded kernel and the stream it launches on (candle's stream of the device).
pub(crate) struct Kernel {
    func: CudaFunction,
    stream: std::sync::Arc<CudaStream>,
}

impl Kernel {
    /// A launch of this kernel; push the arguments in the kernel's order.
    pub(crate) fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

/// The kernel `{name}_{f32|f64}` of `module`, loaded on `dev` (cached by candle).
pub(crate) fn kernel<T: CudaFloat>(
    dev: &CudaDevice,
    module: Module,
    name: &str,
) -> candle_core::Result<Kernel> {
    let func =
        dev.get_or_load_custom_func(&format!("{name}_{}", T::SUFFIX), module.name, module.ptx)?;
    Ok(Kernel {
        func: func.into_cuda_function(),
        stream: dev.cuda_stream(),
    })
}

/// Grid-stride launch over `total` elements.
pub(crate) fn launch_cfg(total: usize) -> LaunchConfig {
    let blocks = total.div_ceil(BLOCK as usize).clamp(1, MAX_BLOCKS);
    LaunchConfig {
        grid_dim: (u32::try_from(blocks).expect("at most MAX_BLOCKS"), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The contiguous view of a storage described by `layout`, or an error naming `op`.
pub(crate) fn view<'a, T: CudaFloat>(
    storage: &'a CudaStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<CudaView<'a, T>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(storage.as_cuda_slice::<T>()?.slice(start..end)),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// A zeroed device buffer of `len` elements (at least one, so that it can be a kernel argument).
pub(crate) fn zeros<T: CudaFloat>(
    dev: &CudaDevice,
    len: usize,
) -> candle_core::Result<CudaSlice<T>> {
    dev.alloc_zeros::<T>(len.max(1))
}

/// An uninitialised device buffer of `len` elements (at least one), for outputs that are
/// written in full before anything reads them: it saves `zeros`' memset, a whole extra write
/// pass over the largest temporaries (the S2 grid values, `G/K` ≈ 6.6 times the coefficients).
///
/// # Safety
/// Every element must be written (a GEMM with β = 0, a kernel covering it) before it is read.
pub(crate) unsafe fn uninit<T: CudaFloat>(
    dev: &CudaDevice,
    len: usize,
) -> candle_core::Result<CudaSlice<T>> {
    // SAFETY: forwarded to the caller.
    unsafe { dev.alloc::<T>(len.max(1)) }
}

/// Copies a small host table to the device (at least one element).
pub(crate) fn upload<T: DeviceRepr + Copy + Default + 'static>(
    dev: &CudaDevice,
    data: &[T],
) -> candle_core::Result<CudaSlice<T>> {
    if data.is_empty() {
        dev.clone_htod(&[T::default()][..])
    } else {
        dev.clone_htod(data)
    }
}

/// Host floats as the kernel type.
pub(crate) fn cast<T: CudaFloat>(data: &[f64]) -> Vec<T> {
    data.iter().map(|&v| T::from_f64(v)).collect()
}

/// `i32` for a kernel argument, or an error if the size does not fit.
pub(crate) fn int(v: usize, what: &str) -> candle_core::Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what} = {v} exceeds i32")))
}

/// `i64` for a kernel argument (all sizes fit).
pub(crate) fn long(v: usize) -> i64 {
    i64::try_from(v).expect("device buffer sizes fit in i64")
}

/// A row-major matrix operand: `rows × cols` of `op(A)` where `A` starts at `off` of `data`
/// with row stride `ld`, used transposed when `trans` (then `A` itself is `cols × rows`).
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, 'b, T> {
    pub(crate) data: &'b CudaView<'a, T>,
    pub(crate) off: usize,
    pub(crate) ld: usize,
    pub(crate) trans: bool,
}

/// Shorthand for a [`Mat`].
pub(crate) fn mat<'a, 'b, T>(
    data: &'b CudaView<'a, T>,
    off: usize,
    ld: usize,
    trans: bool,
) -> Mat<'a, 'b, T> {
    Mat {
        data,
        off,
        ld,
        trans,
    }
}

fn op(trans: bool) -> cublasOperation_t {
    if trans {
        cublasOperation_t::CUBLAS_OP_T
    } else {
        cublasOperation_t::CUBLAS_OP_N
    }
}

/// Row-major `C[m × n] = alpha · op(A)[m × k] · op(B)[k × n] + beta · C` with `C` at `c_off`
/// of `c` (row stride `ldc`), through cuBLAS (column-major) as `Cᵀ = op(B)ᵀ op(A)ᵀ`.
pub(crate) fn gemm<T: CudaFloat>(
    dev: &CudaDevice,
    (m, n, k): (usize, usize, usize),
    alpha: T,
    a: Mat<'_, '_, T>,
    b: Mat<'_, '_, T>,
    beta: T,
    c: &mut CudaSlice<T>,
    c_off: usize,
    ldc: usize,
) -> candle_core::Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let cfg = GemmConfig {
        transa: op(b.trans),
        transb: op(a.trans),
        m: int(n, "gemm n")?,
        n: int(m, "gemm m")?,
        k: int(k.max(1), "gemm k")?,
        alpha: if k == 0 { T::zero() } else { alpha },
        lda: int(b.ld.max(1), "gemm ldb")?,
        ldb: int(a.ld.max(1), "gemm lda")?,
        beta,
        ldc: int(ldc.max(1), "gemm ldc")?,
    };
    let (av, bv) = (a.data.slice(a.off..), b.data.slice(b.off..));
    let blas = dev.cublas_handle();
    // SAFETY: the callers size every operand for the shapes and strides passed here.
    unsafe { T::blas_gemm(&blas, cfg, &bv, &av, c, c_off) }
}

/// [`gemm`] over `batch` problems whose operands advance by `(stride_a, stride_b, stride_c)`
/// elements (0 for an operand shared by all), in cuBLAS calls of at most 65,535 problems.
pub(crate) fn gemm_batched<T: CudaFloat>(
    dev: &CudaDevice,
    (m, n, k): (usize, usize, usize),
    a: Mat<'_, '_, T>,
    b: Mat<'_, '_, T>,
    c: &mut CudaSlice<T>,
    c_off: usize,
    ldc: usize,
    batch: usize,
    (stride_a, stride_b, stride_c): (usize, usize, usize),
) -> candle_core::Result<()> {
    const MAX_BATCH: usize = 65_535;
    if m == 0 || n == 0 || batch == 0 {
        return Ok(());
    }
    let blas = dev.cublas_handle();
    let mut first = 0;
    while first < batch {
        let count = (batch - first).min(MAX_BATCH);
        let cfg = StridedBatchedConfig {
            gemm: GemmConfig {
                transa: op(b.trans),
                transb: op(a.trans),
                m: int(n, "gemm n")?,
                n: int(m, "gemm m")?,
                k: int(k.max(1), "gemm k")?,
                alpha: if k == 0 { T::zero() } else { T::one() },
                lda: int(b.ld.max(1), "gemm ldb")?,
                ldb: int(a.ld.max(1), "gemm lda")?,
                beta: T::zero(),
                ldc: int(ldc.max(1), "gemm ldc")?,
            },
            batch_size: int(count, "gemm batch")?,
            stride_a: long(stride_b),
            stride_b: long(stride_a),
            stride_c: long(stride_c),
        };
        let av = a.data.slice(a.off + first * stride_a..);
        let bv = b.data.slice(b.off + first * stride_b..);
        // SAFETY: the callers size every operand for the shapes, strides and batch passed here.
        unsafe { T::blas_gemm_batched(&blas, cfg, &bv, &av, c, c_off + first * stride_c) }?;
        first += count;
    }
    Ok(())
}

/// The default stream-ordered memory pool of `device`'s GPU, with its context bound to this
/// thread. candle allocates through cudarc's `cuMemAllocAsync` (on every GPU that supports
/// memory pools, all current ones), which draws from this pool.
fn default_pool(
    device: &CudaDevice,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let stream = device.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().w()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out-pointer and the device handle comes from a live context.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .w()?;
    Ok(pool)
}

/// Reads (`set == false`) or writes a u64 attribute of `device`'s default memory pool.
fn pool_attribute(
    device: &CudaDevice,
    attribute: candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute,
    value: &mut u64,
    set: bool,
) -> candle_core::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let pool = default_pool(device)?;
    let ptr = (value as *mut u64).cast();
    // SAFETY: the callers pass attributes whose value is a u64 (cuuint64_t); `ptr` points to
    // one for the duration of the call.
    unsafe {
        if set {
            sys::cuMemPoolSetAttribute(pool, attribute, ptr)
        } else {
            sys::cuMemPoolGetAttribute(pool, attribute, ptr)
        }
    }
    .result()
    .w()
}

/// The most bytes in use at once in `device`'s default memory pool since
/// [`reset_peak_pool_bytes`] (or since the pool was created): the peak of candle's tensors
/// and matscale's kernel buffers, what `torch.cuda.max_memory_allocated` reports for PyTorch.
/// Call it after a synchronisation so that every queued allocation has happened.
///
/// # Errors
/// A driver error from querying the pool.
pub fn peak_pool_bytes(device: &CudaDevice) -> candle_core::Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute;
    let mut value = 0u64;
    pool_attribute(
        device,
        CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        &mut value,
        false,
    )?;
    Ok(value)
}

/// Resets the high watermark that [`peak_pool_bytes`] reads to the bytes in use now.
///
/// # Errors
/// A driver error from setting the pool attribute.
pub fn reset_peak_pool_bytes(device: &CudaDevice) -> candle_core::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute;
    // The driver accepts only zero here, meaning "the current use".
    let mut zero = 0u64;
    pool_attribute(
        device,
        CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        &mut zero,
        true,
    )
}

/// Keeps the memory that candle frees cached in the device's default stream-ordered pool.
///
/// candle allocates through cudarc's `cuMemAllocAsync`, whose default pool has a release
/// threshold of zero: at every synchronisation the driver unmaps all freed memory, and the next
/// allocation maps it again. A benchmark or training step synchronises between repetitions,
/// so its large temporaries may be mapped anew each time: the suspected reason why the
/// rotations on an H100 took about as long at any kernel design, scaling with the output size
/// (not yet verified on a GPU). With the threshold at its maximum, freed memory stays in the
/// pool for reuse, as PyTorch's caching allocator keeps it; it goes back to the system when
/// the process ends.
///
/// # Errors
/// A driver error from querying or setting the pool.
pub fn cache_freed_memory(device: &CudaDevice) -> candle_core::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute;
    let mut threshold = u64::MAX;
    pool_attribute(
        device,
        CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
        &mut threshold,
        true,
    )
}
