//! Output buffers for the CPU kernels.
//!
//! A large fresh allocation is mapped lazily by the kernel, 4 KiB page by page: writing a
//! 196 MB output the first time costs ~48,000 page faults, several times the arithmetic of
//! an op like the spherical harmonics. [`zeroed_vec`] asks Linux for transparent huge pages
//! (`madvise(MADV_HUGEPAGE)`, 2 MiB) on large buffers before they are first touched, which cuts
//! the fault count by ~500x, and zeroes large buffers with all rayon threads.
//!
//! [`tune_allocator`] is the heap policy of matscale's binaries (`cargo xtask` and the
//! benches): freed buffers stay in the process for reuse, so the large tensors and gradients
//! of every training step are not mapped, faulted in and zeroed anew.

use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{Layout, Storage, Tensor, WithDType};
use rayon::prelude::*;

/// Makes glibc keep every freed block in the heap for reuse: all sizes come from the heap
/// (`M_MMAP_MAX = 0`; by default blocks above 128 KiB–32 MiB are fresh `mmap`s, unmapped on
/// free) and the heap top is never trimmed. A step that frees and re-allocates the same
/// edge-sized tensors then reuses pages that are already mapped instead of taking a page fault
/// and a kernel zero-fill for each of them (measured on the SO(2) layer's forward+backward and
/// on EquiformerV2: docs/BENCHMARKS.md). The process keeps its peak heap until it exits. Call it
/// at program start, before other threads allocate. No effect outside Linux/glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters (it takes the arena locks itself).
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// Buffers smaller than this are left to the allocator as they are.
const HUGE_PAGE_MIN_BYTES: usize = 8 << 20;

/// Buffers at least this large are zeroed by all rayon threads instead of the calling one.
const PARALLEL_ZERO_MIN_BYTES: usize = 1 << 20;

/// Bytes each rayon task zeroes.
const ZERO_CHUNK_BYTES: usize = 256 << 10;

/// A zero-filled `Vec` of `len` elements for a kernel's output, backed by transparent huge
/// pages when it is large (Linux).
///
/// A large buffer is zeroed by all rayon threads in 256 KiB pieces. Under the heap policy of
/// [`tune_allocator`] freed blocks are reused, so `calloc` cannot hand out fresh zero pages and
/// zeroes the block itself, on the calling thread: in an EquiformerV2 step that serial
/// `memset` of every output held the other threads idle for several per cent of the step.
pub fn zeroed_vec<T: WithDType>(len: usize) -> Vec<T> {
    let bytes = len * std::mem::size_of::<T>();
    if bytes < PARALLEL_ZERO_MIN_BYTES || rayon::current_num_threads() < 2 {
        let v = vec![T::zero(); len];
        advise_huge_pages(v.as_ptr(), bytes);
        return v;
    }
    let mut v = Vec::<T>::with_capacity(len);
    advise_huge_pages(v.as_ptr(), bytes);
    let chunk = (ZERO_CHUNK_BYTES / std::mem::size_of::<T>()).max(1);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk)
        .for_each(|piece| {
            // SAFETY: `piece` is uninitialised memory owned by `v`; writing zero bytes into
            // it is always allowed, and the all-zero bit pattern is the value zero of every
            // candle dtype (u8, u32, i64, f16, bf16, f32, f64).
            unsafe { std::ptr::write_bytes(piece.as_mut_ptr(), 0, piece.len()) }
        });
    // SAFETY: every element of `0..len` was initialised (to zero) above.
    unsafe { v.set_len(len) };
    v
}

/// An output buffer of `len` elements that the parallel tasks of a kernel initialise piece by
/// piece ([`zero_init`]) right before they fill it, then [`assume_init`]: for outputs a kernel
/// writes in full, instead of a [`zeroed_vec`] pass over the whole buffer first.
///
/// Zeroing a piece just before the kernel overwrites it costs cache writes only; a separate
/// pass first costs one more trip to memory for every byte of the output (the SO(2) layer's
/// outputs and gradients are 25–150 MB at lmax 6, C 128, 10⁴ edges).
pub(crate) fn uninit_vec<T>(len: usize) -> Vec<MaybeUninit<T>> {
    let mut v = Vec::with_capacity(len);
    advise_huge_pages(v.as_ptr(), len * std::mem::size_of::<T>());
    // SAFETY: `MaybeUninit<T>` needs no initialisation, and the capacity is `len`.
    unsafe { v.set_len(len) };
    v
}

/// An output that a kernel overwrites in full without reading it: an initialised `[T]`, or a
/// `[MaybeUninit<T>]` piece of an [`uninit_vec`], which then needs no [`zero_init`] first.
///
/// A kernel generic over `Overwrite` only writes through [`put`](Overwrite::put); whoever
/// calls [`assume_init`] afterwards relies on the kernel's documented promise that it writes
/// every element of its output.
pub(crate) trait Overwrite<T: Copy> {
    /// The number of elements.
    fn out_len(&self) -> usize;
    /// `self[at..at + src.len()] = src`.
    fn put(&mut self, at: usize, src: &[T]);
}

impl<T: Copy> Overwrite<T> for [T] {
    #[inline(always)]
    fn out_len(&self) -> usize {
        self.len()
    }

    #[inline(always)]
    fn put(&mut self, at: usize, src: &[T]) {
        self[at..at + src.len()].copy_from_slice(src);
    }
}

impl<T: Copy> Overwrite<T> for [MaybeUninit<T>] {
    #[inline(always)]
    fn out_len(&self) -> usize {
        self.len()
    }

    #[inline(always)]
    fn put(&mut self, at: usize, src: &[T]) {
        for (d, &v) in self[at..at + src.len()].iter_mut().zip(src) {
            d.write(v);
        }
    }
}

/// Zero-fills a piece of an [`uninit_vec`] and returns it initialised.
pub(crate) fn zero_init<T: WithDType>(piece: &mut [MaybeUninit<T>]) -> &mut [T] {
    piece.fill(MaybeUninit::new(T::zero()));
    // SAFETY: every element was written just above, and `MaybeUninit<T>` has the size and
    // alignment of `T`.
    unsafe { &mut *(std::ptr::from_mut(piece) as *mut [T]) }
}

/// The `Vec<T>` of an [`uninit_vec`] whose every element has been initialised.
///
/// # Safety
/// Every element of `v` must have been initialised (through [`zero_init`] or otherwise).
pub(crate) unsafe fn assume_init<T>(v: Vec<MaybeUninit<T>>) -> Vec<T> {
    let mut v = std::mem::ManuallyDrop::new(v);
    let (ptr, len, cap) = (v.as_mut_ptr(), v.len(), v.capacity());
    // SAFETY: the allocation came from a `Vec<MaybeUninit<T>>` of this capacity, which has the
    // layout of a `Vec<T>`'s; `v` is not dropped (ManuallyDrop), so the memory has one owner;
    // the caller guarantees that all `len` elements are initialised.
    unsafe { Vec::from_raw_parts(ptr.cast::<T>(), len, cap) }
}

/// The smallest number of items a rayon task of a `for_each_init` / `map_init` loop over
/// `items` items should take: at most about two tasks per thread.
///
/// rayon calls the `init` closure once per task it splits off, which without a minimum is
/// close to once per item; a kernel whose per-task scratch is megabytes (the SO(2) layers, the
/// radial MLP, the grid MLP) then allocates and zero-fills it for nearly every chunk. Use as
/// `.with_min_len(buffer::min_task_len(n))`.
pub fn min_task_len(items: usize) -> usize {
    items
        .div_ceil(2 * rayon::current_num_threads().max(1))
        .max(1)
}

/// The data of a CPU op's input within `layout` (`v` is its storage's typed slice), or an
/// error naming the op `op` when the input is not contiguous. The CPU kernels of both
/// library crates read their inputs through it.
///
/// # Errors
/// `layout` is not contiguous.
pub fn contiguous_input<'a, T>(
    v: &'a [T],
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Splits `data` into consecutive pieces of `lens[i]` elements (for rayon tasks that each own
/// one piece of an output).
///
/// # Panics
/// The lengths add up to more than `data.len()`.
pub fn split_pieces<'a, T>(mut data: &'a mut [T], lens: &[usize]) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(lens.len());
    for &n in lens {
        let (head, tail) = std::mem::take(&mut data).split_at_mut(n);
        out.push(head);
        data = tail;
    }
    out
}

/// Runs `f` on the contiguous CPU data of a tensor that an op holds rather than takes as an
/// input (Wigner blocks, saved weights, the output gradient of a backward op), holding the
/// tensor's storage for the duration.
///
/// # Errors
/// The tensor is not on the CPU, is not of dtype `T`, or is not contiguous (each error names
/// the op `op`), or `f` fails.
pub fn with_cpu_slice<T: WithDType, R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("{op}: a tensor the op holds is not on the CPU");
    };
    if cpu.dtype() != T::DTYPE {
        candle_core::bail!(
            "{op}: a tensor the op holds is {:?}, its inputs are {:?}",
            cpu.dtype(),
            T::DTYPE
        );
    }
    f(contiguous_input(cpu.as_slice::<T>()?, layout, op)?)
}

#[cfg(target_os = "linux")]
fn advise_huge_pages<T>(start: *const T, bytes: usize) {
    const PAGE: usize = 4096;
    if bytes < HUGE_PAGE_MIN_BYTES {
        return;
    }
    let start = start as usize;
    let aligned = (start + PAGE - 1) & !(PAGE - 1);
    let len = (start + bytes - aligned) & !(PAGE - 1);
    // SAFETY: `[aligned, aligned + len)` lies inside an allocation of at least `bytes` bytes
    // starting at `start` (the caller's `Vec`) and is page-aligned as madvise requires.
    // MADV_HUGEPAGE only changes how the kernel backs the range with physical pages; it
    // neither reads, writes nor unmaps the memory. A failure (e.g. THP disabled) is harmless
    // and ignored.
    unsafe {
        libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages<T>(_start: *const T, _bytes: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_and_writable() {
        for len in [
            0,
            17,
            (PARALLEL_ZERO_MIN_BYTES / 4) + 3,
            (HUGE_PAGE_MIN_BYTES / 4) + 1001,
        ] {
            let mut v = zeroed_vec::<f32>(len);
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|x| *x == 0.0));
            v.iter_mut().enumerate().for_each(|(i, x)| *x = i as f32);
            assert!(v.iter().enumerate().all(|(i, x)| *x == i as f32));
        }
    }

    /// Pieces of an uninitialised buffer, zero-filled by parallel tasks and then written,
    /// make up the whole output.
    #[test]
    fn uninit_buffers_filled_piece_by_piece() {
        let lens = [5, 0, 1000, 37];
        let total: usize = lens.iter().sum();
        let mut v = uninit_vec::<f64>(total);
        split_pieces(&mut v, &lens)
            .into_par_iter()
            .enumerate()
            .for_each(|(p, piece)| {
                let piece = zero_init(piece);
                assert!(piece.iter().all(|x| *x == 0.0));
                piece
                    .iter_mut()
                    .step_by(2)
                    .for_each(|x| *x = p as f64 + 1.0);
            });
        // SAFETY: the pieces cover `v` and each was zero-filled.
        let v = unsafe { assume_init(v) };
        let mut expected = Vec::new();
        for (p, &n) in lens.iter().enumerate() {
            expected.extend((0..n).map(|i| if i % 2 == 0 { p as f64 + 1.0 } else { 0.0 }));
        }
        assert_eq!(v, expected);
    }

    #[test]
    #[should_panic(expected = "mid > len")]
    fn split_pieces_refuses_more_than_the_slice() {
        let mut data = [0u8; 4];
        let _ = split_pieces(&mut data, &[3, 2]);
    }

    /// A held tensor is read in its layout's window; a wrong dtype or a strided layout is an
    /// error naming the op.
    #[test]
    fn held_tensors_checked_for_dtype_and_contiguity() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        let t = Tensor::arange(0f32, 12., &dev)?.reshape((3, 4))?;
        let sum: f32 = with_cpu_slice(&t.narrow(0, 1, 2)?, "op", |d: &[f32]| Ok(d.iter().sum()))?;
        assert_eq!(sum, (4..12).sum::<i32>() as f32);
        let err = with_cpu_slice::<f64, _>(&t, "my-op", |_| Ok(())).unwrap_err();
        assert!(
            err.to_string()
                .contains("my-op: a tensor the op holds is F32"),
            "{err}"
        );
        let err = with_cpu_slice::<f32, _>(&t.t()?, "my-op", |_| Ok(())).unwrap_err();
        assert!(
            err.to_string().contains("my-op: input must be contiguous"),
            "{err}"
        );
        Ok(())
    }
}
