// Shared helpers of matscale's CUDA kernels (included by every .cu file of this folder).
//
// Conventions: every kernel exists as `<name>_f32` and `<name>_f64` (extern "C", so the PTX
// symbol is exactly that name); element counts that can exceed 2^31 are `long long`; a
// grid-stride loop covers any launch size, so the host may cap the grid.
#pragma once

#define MATSCALE_GRID_STRIDE(i, n)                                                             \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n);              \
         i += (long long)blockDim.x * gridDim.x)

// Instantiates a templated kernel body `name##_impl<T>` as `name_f32` and `name_f64` with
// the parameter list given twice: once with types (T) and once the argument names.
#define MATSCALE_F32_F64(name, PARAMS_F32, PARAMS_F64, ARGS)                                   \
    extern "C" __global__ void name##_f32 PARAMS_F32 { name##_impl<float> ARGS; }               \
    extern "C" __global__ void name##_f64 PARAMS_F64 { name##_impl<double> ARGS; }

template <typename T> __device__ __forceinline__ T sigmoid_of(T x) {
    return T(1) / (T(1) + exp(-x));
}
