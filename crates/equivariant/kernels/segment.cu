// Segment sum / gather / softmax over a CSR grouping of items (crates/equivariant/src/segment.rs).
// `offsets[s]..offsets[s + 1]` are the grouped positions of segment s; item(k) is order[k] when
// `has_order` (unsorted index) and k otherwise. One thread per (segment, column) walks its
// items in a fixed order, so results are deterministic (no atomics).
#include "common.cuh"

__device__ __forceinline__ long long item_at(const unsigned int* order, int has_order, long long k) {
    return has_order ? (long long)order[k] : k;
}

template <typename T>
__device__ void segment_sum_impl(long long total, int cols, const unsigned int* __restrict__ offsets,
                                 const unsigned int* __restrict__ order, int has_order,
                                 const T* __restrict__ src, T* __restrict__ out) {
    MATSCALE_GRID_STRIDE(idx, total) {
        const long long s = idx / cols;
        const int j = (int)(idx % cols);
        T acc = T(0);
        for (long long k = offsets[s]; k < offsets[s + 1]; ++k)
            acc += src[item_at(order, has_order, k) * cols + j];
        out[idx] = acc;
    }
}

MATSCALE_F32_F64(segment_sum,
    (long long total, int cols, const unsigned int* offsets, const unsigned int* order, int has_order, const float* src, float* out),
    (long long total, int cols, const unsigned int* offsets, const unsigned int* order, int has_order, const double* src, double* out),
    (total, cols, offsets, order, has_order, src, out))

template <typename T>
__device__ void segment_gather_impl(long long total, int cols, const unsigned int* __restrict__ index,
                                    const T* __restrict__ src, T* __restrict__ out) {
    MATSCALE_GRID_STRIDE(idx, total) {
        const long long e = idx / cols;
        const int j = (int)(idx % cols);
        out[idx] = src[(long long)index[e] * cols + j];
    }
}

MATSCALE_F32_F64(segment_gather,
    (long long total, int cols, const unsigned int* index, const float* src, float* out),
    (long long total, int cols, const unsigned int* index, const double* src, double* out),
    (total, cols, index, src, out))

// out = exp(x − max) / (Σ exp(x − max) + eps) per segment and column (written in item order).
template <typename T>
__device__ void segment_softmax_impl(long long total, int cols, const unsigned int* __restrict__ offsets,
                                     const unsigned int* __restrict__ order, int has_order, T eps,
                                     const T* __restrict__ src, T* __restrict__ out) {
    MATSCALE_GRID_STRIDE(idx, total) {
        const long long s = idx / cols;
        const int j = (int)(idx % cols);
        const long long k0 = offsets[s], k1 = offsets[s + 1];
        if (k0 == k1) continue;
        T mx = src[item_at(order, has_order, k0) * cols + j];
        for (long long k = k0 + 1; k < k1; ++k) {
            const T v = src[item_at(order, has_order, k) * cols + j];
            if (v > mx) mx = v;
        }
        T sum = T(0);
        for (long long k = k0; k < k1; ++k) {
            const long long at = item_at(order, has_order, k) * cols + j;
            const T v = exp(src[at] - mx);
            out[at] = v;
            sum += v;
        }
        const T inv = T(1) / (sum + eps);
        for (long long k = k0; k < k1; ++k) out[item_at(order, has_order, k) * cols + j] *= inv;
    }
}

MATSCALE_F32_F64(segment_softmax,
    (long long total, int cols, const unsigned int* offsets, const unsigned int* order, int has_order, float eps, const float* src, float* out),
    (long long total, int cols, const unsigned int* offsets, const unsigned int* order, int has_order, double eps, const double* src, double* out),
    (total, cols, offsets, order, has_order, eps, src, out))

// Softmax backward: out = y (g − Σ_segment g y).
template <typename T>
__device__ void segment_softmax_backward_impl(long long total, int cols,
                                              const unsigned int* __restrict__ offsets,
                                              const unsigned int* __restrict__ order, int has_order,
                                              const T* __restrict__ y, const T* __restrict__ g,
                                              T* __restrict__ out) {
    MATSCALE_GRID_STRIDE(idx, total) {
        const long long s = idx / cols;
        const int j = (int)(idx % cols);
        const long long k0 = offsets[s], k1 = offsets[s + 1];
        T dot = T(0);
        for (long long k = k0; k < k1; ++k) {
            const long long at = item_at(order, has_order, k) * cols + j;
            dot += g[at] * y[at];
        }
        for (long long k = k0; k < k1; ++k) {
            const long long at = item_at(order, has_order, k) * cols + j;
            out[at] = y[at] * (g[at] - dot);
        }
    }
}

MATSCALE_F32_F64(segment_softmax_backward,
    (long long total, int cols, const unsigned int* offsets, const unsigned int* order, int has_order, const float* y, const float* g, float* out),
    (long long total, int cols, const unsigned int* offsets, const unsigned int* order, int has_order, const double* y, const double* g, double* out),
    (total, cols, offsets, order, has_order, y, g, out))

// Head-weighted segment sum: x [items, k, heads · v], w [items, heads] →
// out[s, kk, c] = Σ_{items i of s} w[i, c / v] · x[i, kk, c] (row = k · heads · v values).
template <typename T>
__device__ void segment_weighted_sum_impl(long long total, int row, int hv, int v, int heads,
                                          const unsigned int* __restrict__ offsets,
                                          const unsigned int* __restrict__ order, int has_order,
                                          const T* __restrict__ x, const T* __restrict__ w,
                                          T* __restrict__ out) {
    MATSCALE_GRID_STRIDE(idx, total) {
        const long long s = idx / row;
        const int j = (int)(idx % row);
        const int h = (j % hv) / v;
        T acc = T(0);
        for (long long k = offsets[s]; k < offsets[s + 1]; ++k) {
            const long long i = item_at(order, has_order, k);
            acc += w[i * heads + h] * x[i * row + j];
        }
        out[idx] = acc;
    }
}

MATSCALE_F32_F64(segment_weighted_sum,
    (long long total, int row, int hv, int v, int heads, const unsigned int* offsets, const unsigned int* order, int has_order, const float* x, const float* w, float* out),
    (long long total, int row, int hv, int v, int heads, const unsigned int* offsets, const unsigned int* order, int has_order, const double* x, const double* w, double* out),
    (total, row, hv, v, heads, offsets, order, has_order, x, w, out))

// Its backward, part 1: dx[i, kk, c] = w[i, c / v] · g[index[i], kk, c] (total = items · row).
template <typename T>
__device__ void segment_weighted_sum_dx_impl(long long total, int row, int hv, int v, int heads,
                                             const unsigned int* __restrict__ index,
                                             const T* __restrict__ w, const T* __restrict__ g,
                                             T* __restrict__ dx) {
    MATSCALE_GRID_STRIDE(idx, total) {
        const long long i = idx / row;
        const int j = (int)(idx % row);
        dx[idx] = w[i * heads + (j % hv) / v] * g[(long long)index[i] * row + j];
    }
}

MATSCALE_F32_F64(segment_weighted_sum_dx,
    (long long total, int row, int hv, int v, int heads, const unsigned int* index, const float* w, const float* g, float* dx),
    (long long total, int row, int hv, int v, int heads, const unsigned int* index, const double* w, const double* g, double* dx),
    (total, row, hv, v, heads, index, w, g, dx))

// Part 2, one warp per (item i, head h): dw[i, h] = Σ_{kk, vv} x[i, kk, h·v + vv] · g[index[i], kk, h·v + vv].
template <typename T>
__device__ void segment_weighted_sum_dw_impl(long long pairs, int k, int hv, int v, int heads,
                                             const unsigned int* __restrict__ index,
                                             const T* __restrict__ x, const T* __restrict__ g,
                                             T* __restrict__ dw) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)k * hv;
    const int kv = k * v;
    MATSCALE_WARP_STRIDE(p, pairs) {
        const long long i = p / heads;
        const int h = (int)(p % heads);
        const T* xi = x + i * row + h * v;
        const T* gi = g + (long long)index[i] * row + h * v;
        T s = T(0);
        for (int t = lane; t < kv; t += 32) {
            const long long at = (long long)(t / v) * hv + t % v;
            s += xi[at] * gi[at];
        }
        s = warp_sum(s);
        if (lane == 0) dw[p] = s;
    }
}

MATSCALE_F32_F64(segment_weighted_sum_dw,
    (long long pairs, int k, int hv, int v, int heads, const unsigned int* index, const float* x, const float* g, float* dw),
    (long long pairs, int k, int hv, int v, int heads, const unsigned int* index, const double* x, const double* g, double* dw),
    (pairs, k, hv, v, heads, index, x, g, dw))
