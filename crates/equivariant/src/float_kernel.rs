//! The step from candle's `CpuStorage` to a typed CPU kernel, written once for every op.
//!
//! A custom op's `cpu_fwd` receives untyped storages. Its kernel is generic over the float
//! type. Between the two, every op would otherwise repeat the same `match` over `(F32, F32, …)`
//! and `(F64, F64, …)`, the contiguity check of each input and the wrapping of the output.
//! An op implements [`FloatKernel`] instead, and its `cpu_fwd` calls [`run_float`].

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout};

use crate::activation::Float;
use crate::buffer::contiguous_input;

/// The CPU kernel of an op with `N` inputs of one float dtype (f32 or f64).
pub(crate) trait FloatKernel<const N: usize> {
    /// The output data, from the contiguous data of the `N` inputs and their layouts (for
    /// their shapes).
    ///
    /// # Errors
    /// Whatever the kernel finds wrong with its inputs.
    fn run<T: Float>(&self, inputs: [(&[T], &Layout); N]) -> candle_core::Result<Vec<T>>;
}

/// Runs `kernel` on the data of `inputs` and wraps its output as a storage of their dtype.
///
/// # Errors
/// The first input is neither f32 nor f64, the inputs differ in dtype, one is not contiguous
/// (each error names the op `name`), or the kernel fails.
pub(crate) fn run_float<const N: usize, K: FloatKernel<N>>(
    name: &str,
    inputs: [(&CpuStorage, &Layout); N],
    kernel: &K,
) -> candle_core::Result<CpuStorage> {
    fn typed<T: Float, const N: usize, K: FloatKernel<N>>(
        name: &str,
        inputs: [(&CpuStorage, &Layout); N],
        kernel: &K,
    ) -> candle_core::Result<CpuStorage> {
        let mut data: [(&[T], &Layout); N] = inputs.map(|(_, layout)| (&[][..], layout));
        for ((slot, _), (storage, layout)) in data.iter_mut().zip(inputs) {
            if storage.dtype() != T::DTYPE {
                candle_core::bail!(
                    "{name}: inputs of one dtype expected, got {:?} and {:?}",
                    T::DTYPE,
                    storage.dtype()
                );
            }
            *slot = contiguous_input(T::cpu_storage_as_slice(storage)?, layout, name)?;
        }
        Ok(T::to_cpu_storage_owned(kernel.run(data)?))
    }
    match inputs.first().map(|(storage, _)| storage.dtype()) {
        Some(DType::F32) => typed::<f32, N, K>(name, inputs, kernel),
        Some(DType::F64) => typed::<f64, N, K>(name, inputs, kernel),
        Some(other) => candle_core::bail!("{name}: needs f32 or f64 inputs, got {other:?}"),
        None => candle_core::bail!("{name}: an op without inputs"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sums its two inputs elementwise.
    struct Add;

    impl FloatKernel<2> for Add {
        fn run<T: Float>(
            &self,
            [(a, _), (b, _)]: [(&[T], &Layout); 2],
        ) -> candle_core::Result<Vec<T>> {
            Ok(a.iter().zip(b).map(|(&x, &y)| x + y).collect())
        }
    }

    fn layout(n: usize) -> Layout {
        Layout::contiguous(n)
    }

    #[test]
    fn runs_f32_and_f64_and_refuses_mixed_or_other_dtypes() {
        let (a, b) = (
            CpuStorage::F32(vec![1.0, 2.0]),
            CpuStorage::F32(vec![0.5, 0.25]),
        );
        let Ok(CpuStorage::F32(sum)) = run_float("add", [(&a, &layout(2)), (&b, &layout(2))], &Add)
        else {
            panic!("f32 inputs give an f32 output");
        };
        assert_eq!(sum, vec![1.5, 2.25]);
        let (a, b) = (CpuStorage::F64(vec![1.0]), CpuStorage::F64(vec![2.0]));
        let Ok(CpuStorage::F64(sum)) = run_float("add", [(&a, &layout(1)), (&b, &layout(1))], &Add)
        else {
            panic!("f64 inputs give an f64 output");
        };
        assert_eq!(sum, vec![3.0]);
        let mixed = CpuStorage::F32(vec![1.0]);
        let err = run_float("add", [(&a, &layout(1)), (&mixed, &layout(1))], &Add).unwrap_err();
        assert!(
            err.to_string().contains("add: inputs of one dtype"),
            "{err}"
        );
        let ints = CpuStorage::U32(vec![1]);
        let err = run_float("add", [(&ints, &layout(1)), (&ints, &layout(1))], &Add).unwrap_err();
        assert!(err.to_string().contains("add: needs f32 or f64"), "{err}");
    }

    #[test]
    fn refuses_non_contiguous_inputs_and_reads_offsets() {
        let a = CpuStorage::F32(vec![9.0, 1.0, 2.0]);
        let offset = Layout::contiguous_with_offset(2, 1);
        let Ok(CpuStorage::F32(sum)) = run_float("add", [(&a, &offset), (&a, &offset)], &Add)
        else {
            panic!("an offset layout is contiguous");
        };
        assert_eq!(sum, vec![2.0, 4.0]);
        let strided = Layout::new((2,).into(), vec![2], 0);
        let err = run_float("add", [(&a, &strided), (&a, &offset)], &Add).unwrap_err();
        assert!(
            err.to_string().contains("add: input must be contiguous"),
            "{err}"
        );
    }
}
