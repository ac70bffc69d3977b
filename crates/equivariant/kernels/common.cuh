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

// function: 0 SiLU, 1 sigmoid, 2 smooth leaky ReLU with `slope`; order 0, 1 or 2.
template <typename T> __device__ __forceinline__ T activation(int function, int order, T slope, T x) {
    const T one = T(1), two = T(2);
    if (function == 0) {
        const T s = sigmoid_of(x);
        if (order == 0) return x * s;
        if (order == 1) return s * (one + x * (one - s));
        return s * (one - s) * (two + x * (one - two * s));
    }
    if (function == 1) {
        const T s = sigmoid_of(x);
        if (order == 0) return s;
        if (order == 1) return s * (one - s);
        return s * (one - s) * (one - two * s);
    }
    const T a = (one + slope) / two, b = (one - slope) / two;
    const T t = two * sigmoid_of(x) - one;
    if (order == 0) return a * x + b * x * t;
    if (order == 1) return a + b * t + b * x * (one - t * t) / two;
    return b * (one - t * t) * (one - x * t / two);
}

// Sum of `v` over the 32 lanes of a warp, returned to every lane (butterfly: fixed order, so
// deterministic). Every lane of the warp must call it.
template <typename T> __device__ __forceinline__ T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Warp-per-item loops: `w` runs over the warps of the grid (grid-stride), the same count for
// every lane of a warp, so `warp_sum` may be called inside.
#define MATSCALE_WARP_STRIDE(w, n)                                                             \
    for (long long w = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32; w < (n);       \
         w += ((long long)blockDim.x * gridDim.x) / 32)
