// Elementwise kernels: the activations of crates/equivariant/src/activation.rs (SiLU, sigmoid,
// smooth leaky ReLU and their first two derivatives), SchNet's shifted softplus
// (crates/models/src/schnet.rs), the Gaussian smearing of radial.rs, and the SiLU steps of the
// S2 grid activation (s2grid.rs) that run between its batched GEMMs.
#include "common.cuh"

// `activation(function, order, slope, x)` is in common.cuh (shared with norm.cu).
template <typename T>
__device__ void activation_impl(long long n, int function, int order, T slope, const T* __restrict__ x,
                                T* __restrict__ out) {
    MATSCALE_GRID_STRIDE(i, n) { out[i] = activation(function, order, slope, x[i]); }
}

MATSCALE_F32_F64(activation,
    (long long n, int function, int order, float slope, const float* x, float* out),
    (long long n, int function, int order, double slope, const double* x, double* out),
    (n, function, order, slope, x, out))

// Shifted softplus ssp(x) = max(x, 0) + ln(1 + e^{−|x|}) − ln 2 (order 0), σ(x) (order 1),
// σ(x)(1 − σ(x)) (order 2).
template <typename T>
__device__ void shifted_softplus_impl(long long n, int order, const T* __restrict__ x, T* __restrict__ out) {
    MATSCALE_GRID_STRIDE(i, n) {
        const T v = x[i];
        T r;
        if (order == 0) {
            r = (v > T(0) ? v : T(0)) + log1p(exp(-fabs(v))) - T(0.69314718055994530942);
        } else {
            const T s = sigmoid_of(v);
            r = order == 1 ? s : s * (T(1) - s);
        }
        out[i] = r;
    }
}

MATSCALE_F32_F64(shifted_softplus, (long long n, int order, const float* x, float* out),
    (long long n, int order, const double* x, double* out), (n, order, x, out))

// out[e, k] = exp(coeff (d[e] − μ_k)²).
template <typename T>
__device__ void gaussian_smearing_impl(long long total, int k, T coeff, const T* __restrict__ d,
                                       const T* __restrict__ mu, T* __restrict__ out) {
    MATSCALE_GRID_STRIDE(idx, total) {
        const T x = d[idx / k] - mu[idx % k];
        out[idx] = exp(coeff * x * x);
    }
}

MATSCALE_F32_F64(gaussian_smearing,
    (long long total, int k, float coeff, const float* d, const float* mu, float* out),
    (long long total, int k, double coeff, const double* d, const double* mu, double* out),
    (total, k, coeff, d, mu, out))

// x ← SiLU(x) in place.
template <typename T> __device__ void silu_inplace_impl(long long n, T* x) {
    MATSCALE_GRID_STRIDE(i, n) { x[i] = x[i] * sigmoid_of(x[i]); }
}

MATSCALE_F32_F64(silu_inplace, (long long n, float* x), (long long n, double* x), (n, x))

// x ← g · SiLU'(x) in place (g = 0 where `zero_grad`).
template <typename T> __device__ void silu_backward_inplace_impl(long long n, int zero_grad, T* x, const T* g) {
    MATSCALE_GRID_STRIDE(i, n) {
        const T s = sigmoid_of(x[i]);
        const T gi = zero_grad ? T(0) : g[i];
        x[i] = gi * s * (T(1) + x[i] * (T(1) - s));
    }
}

MATSCALE_F32_F64(silu_backward_inplace, (long long n, int zero_grad, float* x, const float* g),
    (long long n, int zero_grad, double* x, const double* g), (n, zero_grad, x, g))

// out[r · rs + j] = SiLU(scalars[r · c + j]) for j < c (row 0 of the separable S2 activation).
template <typename T>
__device__ void silu_rows_impl(long long total, int c, const T* __restrict__ scalars, T* out, long long rs) {
    MATSCALE_GRID_STRIDE(idx, total) {
        const long long r = idx / c;
        const int j = (int)(idx % c);
        const T v = scalars[idx];
        out[r * rs + j] = v * sigmoid_of(v);
    }
}

MATSCALE_F32_F64(silu_rows, (long long total, int c, const float* scalars, float* out, long long rs),
    (long long total, int c, const double* scalars, double* out, long long rs), (total, c, scalars, out, rs))

// AdamW, the parameter half (run before `adamw_moments`): with mv = [m | v] (n each) the moments
// before this step, m' = β₁ m + (1 − β₁) g, v' = β₂ v + (1 − β₂) g² and
// θ ← θ · decay − lr · (m' / c₁) / (√(v' / c₂) + eps).
template <typename T>
__device__ void adamw_param_impl(long long n, T b1, T om1, T b2, T om2, T lr, T decay, T inv_c1, T inv_c2,
                                 T eps, T* __restrict__ theta, const T* __restrict__ mv,
                                 const T* __restrict__ g) {
    MATSCALE_GRID_STRIDE(i, n) {
        const T gi = g[i];
        const T m = mv[i] * b1 + gi * om1;
        const T v = mv[n + i] * b2 + gi * gi * om2;
        theta[i] = theta[i] * decay - (m * inv_c1) / (sqrt(v * inv_c2) + eps) * lr;
    }
}

MATSCALE_F32_F64(adamw_param,
    (long long n, float b1, float om1, float b2, float om2, float lr, float decay, float inv_c1, float inv_c2, float eps, float* theta, const float* mv, const float* g),
    (long long n, double b1, double om1, double b2, double om2, double lr, double decay, double inv_c1, double inv_c2, double eps, double* theta, const double* mv, const double* g),
    (n, b1, om1, b2, om2, lr, decay, inv_c1, inv_c2, eps, theta, mv, g))

// AdamW, the moments half: mv = [m | v] ← [β₁ m + (1 − β₁) g | β₂ v + (1 − β₂) g²].
template <typename T>
__device__ void adamw_moments_impl(long long n, T b1, T om1, T b2, T om2, T* __restrict__ mv, const T* __restrict__ g) {
    MATSCALE_GRID_STRIDE(i, n) {
        const T gi = g[i];
        mv[i] = mv[i] * b1 + gi * om1;
        mv[n + i] = mv[n + i] * b2 + gi * gi * om2;
    }
}

MATSCALE_F32_F64(adamw_moments,
    (long long n, float b1, float om1, float b2, float om2, float* mv, const float* g),
    (long long n, double b1, double om1, double b2, double om2, double* mv, const double* g),
    (n, b1, om1, b2, om2, mv, g))

// Sum of `v` over the 256 threads of a block (a tree in shared memory, fixed order: the same
// bits every run), returned to thread 0. Every thread of the block must call it.
__device__ __forceinline__ double block_sum_256(double v) {
    __shared__ double s[256];
    s[threadIdx.x] = v;
    __syncthreads();
    for (int w = 128; w > 0; w >>= 1) {
        if (threadIdx.x < w) s[threadIdx.x] += s[threadIdx.x + w];
        __syncthreads();
    }
    return s[0];
}

// Partial sums of squares in f64 for a gradient-norm: block b of the launch (gridDim.x blocks of
// 256 threads) sums x[i]² over its fixed strided share of the n elements and writes
// partial[at + b] (every block writes, so the caller's row of gridDim.x partials is complete;
// fixed order, deterministic).
template <typename T>
__device__ void sum_squares_partials_impl(long long n, long long at, const T* __restrict__ x,
                                          double* __restrict__ partial) {
    double acc = 0.0;
    MATSCALE_GRID_STRIDE(i, n) {
        const double v = (double)x[i];
        acc += v * v;
    }
    const double total = block_sum_256(acc);
    if (threadIdx.x == 0) partial[at + blockIdx.x] = total;
}

MATSCALE_F32_F64(sum_squares_partials,
    (long long n, long long at, const float* x, double* partial),
    (long long n, long long at, const double* x, double* partial),
    (n, at, x, partial))

// Multi-tensor launches over the variables of a model (crates/trainer optim.rs): tensor t
// holds starts[t + 1] − starts[t] elements (`starts`: exclusive prefix sums, tensors + 1
// entries) at device addresses taken from `ptrs`. Element i of the flattened range belongs to
// the last tensor whose start is ≤ i (binary search over the starts, which stay in cache).
__device__ __forceinline__ int multi_tensor_of(long long i, int tensors, const long long* __restrict__ starts) {
    int lo = 0, hi = tensors - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (starts[mid] <= i) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// AdamW over every variable in one launch, parameter and moments in one pass: with g scaled
// by `gscale` (the clipping factor, 1 without), m' = β₁ m + (1 − β₁) g, v' = β₂ v + (1 − β₂) g²,
// θ ← θ · decay − lr · (m' / c₁) / (√(v' / c₂) + eps) — the arithmetic of `adamw_param` and
// `adamw_moments`. ptrs[3t .. 3t + 3] = (θ, [m | v], g) of tensor t.
template <typename T>
__device__ void adamw_multi_impl(long long total, int tensors, const long long* __restrict__ starts,
                                 const unsigned long long* __restrict__ ptrs, T gscale, T b1, T om1,
                                 T b2, T om2, T lr, T decay, T inv_c1, T inv_c2, T eps) {
    MATSCALE_GRID_STRIDE(i, total) {
        const int t = multi_tensor_of(i, tensors, starts);
        const long long n = starts[t + 1] - starts[t], j = i - starts[t];
        T* theta = reinterpret_cast<T*>(ptrs[3 * t]);
        T* mv = reinterpret_cast<T*>(ptrs[3 * t + 1]);
        const T* g = reinterpret_cast<const T*>(ptrs[3 * t + 2]);
        const T gi = g[j] * gscale;
        const T m = mv[j] * b1 + gi * om1;
        const T v = mv[n + j] * b2 + gi * gi * om2;
        mv[j] = m;
        mv[n + j] = v;
        theta[j] = theta[j] * decay - (m * inv_c1) / (sqrt(v * inv_c2) + eps) * lr;
    }
}

MATSCALE_F32_F64(adamw_multi,
    (long long total, int tensors, const long long* starts, const unsigned long long* ptrs, float gscale, float b1, float om1, float b2, float om2, float lr, float decay, float inv_c1, float inv_c2, float eps),
    (long long total, int tensors, const long long* starts, const unsigned long long* ptrs, double gscale, double b1, double om1, double b2, double om2, double lr, double decay, double inv_c1, double inv_c2, double eps),
    (total, tensors, starts, ptrs, gscale, b1, om1, b2, om2, lr, decay, inv_c1, inv_c2, eps))

// Partial sums of squares in f64 over every tensor in one launch: block b (of gridDim.x, 256
// threads each) sums x² over its fixed strided share of the flattened elements into
// partial[b]. ptrs[t] is tensor t. Fixed order: deterministic.
template <typename T>
__device__ void sum_squares_multi_impl(long long total, int tensors, const long long* __restrict__ starts,
                                       const unsigned long long* __restrict__ ptrs,
                                       double* __restrict__ partial) {
    double acc = 0.0;
    MATSCALE_GRID_STRIDE(i, total) {
        const int t = multi_tensor_of(i, tensors, starts);
        const double v = (double)reinterpret_cast<const T*>(ptrs[t])[i - starts[t]];
        acc += v * v;
    }
    const double sum = block_sum_256(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

MATSCALE_F32_F64(sum_squares_multi,
    (long long total, int tensors, const long long* starts, const unsigned long long* ptrs, double* partial),
    (long long total, int tensors, const long long* starts, const unsigned long long* ptrs, double* partial),
    (total, tensors, starts, ptrs, partial))
