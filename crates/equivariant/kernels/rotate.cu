// Block-diagonal rotation between the l-major layout and the truncated m-major edge-frame
// layout (crates/equivariant/src/so2.rs `RotateOp`), plus the small row kernels that the
// fused SO(2) layer (so2_fused.rs) runs between its cuBLAS GEMMs.
//
// Wigner rows: [E, wlen], block l at block_off[l], row-major (2l+1)². `slot` maps the l-major
// index l² + m + l to the m-major row (−1 where |m| > mmax).
//
// to the edge frame: out[e, slot(l, m), ch] = scale[l] Σ_j D^l[m + l][j] x[e, l² + j, ch]
// back:              out[e, l² + j, ch] = scale[l] Σ_{|m| ≤ min(l, mmax)} D^l[m + l][j] y[e, slot(l, m), ch]
//
// Both run one block per (edge, tile of blockDim.x ≤ 128 channels): the block copies its edge's
// Wigner blocks into shared memory once; each thread then takes one channel degree by degree,
// loads that degree's inputs into registers (K of them at most: kernels for K = 5, 9, 13, 25,
// the host picks the smallest that holds 2l + 1, resp. 2·min(l, mmax) + 1), and computes every
// output row of the degree from them, reading the Wigner entries as shared-memory broadcasts.
// Loads and stores are contiguous across the warp; every input element is read from device
// memory once, every output written once, with no index division.
#include "common.cuh"

template <typename T, int K>
__device__ void rotate_to_edge_tiled(long long edges, int c, int lmax, int trunc, int wlen,
                                     int mmax, const T* __restrict__ x, const T* __restrict__ w,
                                     const int* __restrict__ slot, const int* __restrict__ block_off,
                                     const T* __restrict__ scale, T* __restrict__ out) {
    extern __shared__ unsigned char rotate_shared[];
    T* sw = reinterpret_cast<T*>(rotate_shared);
    const int ch = blockIdx.y * blockDim.x + threadIdx.x;
    const int full = (lmax + 1) * (lmax + 1);
    for (long long e = blockIdx.x; e < edges; e += gridDim.x) {
        __syncthreads();
        for (int q = threadIdx.x; q < wlen; q += blockDim.x) sw[q] = w[e * wlen + q];
        __syncthreads();
        if (ch >= c) continue;
        const T* xe = x + e * full * c + ch;
        T* oe = out + e * trunc * c + ch;
        for (int l = 0; l <= lmax; ++l) {
            const int k = 2 * l + 1, mm = l < mmax ? l : mmax;
            T xr[K];
#pragma unroll
            for (int j = 0; j < K; ++j) xr[j] = j < k ? xe[(long long)(l * l + j) * c] : T(0);
            const int* sl = slot + l * l + l;
            const T s = scale[l];
            for (int m = -mm; m <= mm; ++m) {
                const T* row = sw + block_off[l] + (m + l) * k;
                T acc = T(0);
#pragma unroll
                for (int j = 0; j < K; ++j) {
                    if (j < k) acc += row[j] * xr[j];
                }
                oe[(long long)sl[m] * c] = acc * s;
            }
        }
    }
}

template <typename T, int K>
__device__ void rotate_from_edge_tiled(long long edges, int c, int lmax, int trunc, int wlen,
                                       int mmax, const T* __restrict__ y, const T* __restrict__ w,
                                       const int* __restrict__ slot,
                                       const int* __restrict__ block_off,
                                       const T* __restrict__ scale, T* __restrict__ out) {
    extern __shared__ unsigned char rotate_shared[];
    T* sw = reinterpret_cast<T*>(rotate_shared);
    const int ch = blockIdx.y * blockDim.x + threadIdx.x;
    const int full = (lmax + 1) * (lmax + 1);
    for (long long e = blockIdx.x; e < edges; e += gridDim.x) {
        __syncthreads();
        for (int q = threadIdx.x; q < wlen; q += blockDim.x) sw[q] = w[e * wlen + q];
        __syncthreads();
        if (ch >= c) continue;
        const T* ye = y + e * trunc * c + ch;
        T* oe = out + e * full * c + ch;
        for (int l = 0; l <= lmax; ++l) {
            const int k = 2 * l + 1, mm = l < mmax ? l : mmax, nm = 2 * mm + 1;
            const int* sl = slot + l * l + l - mm;  // sl[t] is the slot of m = t − mm
            T yr[K];
#pragma unroll
            for (int t = 0; t < K; ++t) yr[t] = t < nm ? ye[(long long)sl[t] * c] : T(0);
            const T* d = sw + block_off[l] + (l - mm) * k;  // row m + l of m = −mm
            const T s = scale[l];
            for (int j = 0; j < k; ++j) {
                T acc = T(0);
#pragma unroll
                for (int t = 0; t < K; ++t) {
                    if (t < nm) acc += d[t * k + j] * yr[t];
                }
                oe[(long long)(l * l + j) * c] = acc * s;
            }
        }
    }
}

#define MATSCALE_ROTATE_PARAMS(T)                                                              \
    (long long edges, int c, int lmax, int trunc, int wlen, int mmax, const T* in,             \
     const T* w, const int* slot, const int* block_off, const T* scale, T* out)
#define MATSCALE_ROTATE_ARGS (edges, c, lmax, trunc, wlen, mmax, in, w, slot, block_off, scale, out)
#define MATSCALE_ROTATE_TILED(K)                                                               \
    template <typename T>                                                                      \
    __device__ void rotate_to_edge_k##K##_impl MATSCALE_ROTATE_PARAMS(T) {                     \
        rotate_to_edge_tiled<T, K> MATSCALE_ROTATE_ARGS;                                       \
    }                                                                                          \
    template <typename T>                                                                      \
    __device__ void rotate_from_edge_k##K##_impl MATSCALE_ROTATE_PARAMS(T) {                   \
        rotate_from_edge_tiled<T, K> MATSCALE_ROTATE_ARGS;                                     \
    }

MATSCALE_ROTATE_TILED(5)
MATSCALE_ROTATE_TILED(9)
MATSCALE_ROTATE_TILED(13)
MATSCALE_ROTATE_TILED(25)

MATSCALE_F32_F64(rotate_to_edge_k5, MATSCALE_ROTATE_PARAMS(float), MATSCALE_ROTATE_PARAMS(double), MATSCALE_ROTATE_ARGS)
MATSCALE_F32_F64(rotate_to_edge_k9, MATSCALE_ROTATE_PARAMS(float), MATSCALE_ROTATE_PARAMS(double), MATSCALE_ROTATE_ARGS)
MATSCALE_F32_F64(rotate_to_edge_k13, MATSCALE_ROTATE_PARAMS(float), MATSCALE_ROTATE_PARAMS(double), MATSCALE_ROTATE_ARGS)
MATSCALE_F32_F64(rotate_to_edge_k25, MATSCALE_ROTATE_PARAMS(float), MATSCALE_ROTATE_PARAMS(double), MATSCALE_ROTATE_ARGS)
MATSCALE_F32_F64(rotate_from_edge_k5, MATSCALE_ROTATE_PARAMS(float), MATSCALE_ROTATE_PARAMS(double), MATSCALE_ROTATE_ARGS)
MATSCALE_F32_F64(rotate_from_edge_k9, MATSCALE_ROTATE_PARAMS(float), MATSCALE_ROTATE_PARAMS(double), MATSCALE_ROTATE_ARGS)
MATSCALE_F32_F64(rotate_from_edge_k13, MATSCALE_ROTATE_PARAMS(float), MATSCALE_ROTATE_PARAMS(double), MATSCALE_ROTATE_ARGS)
MATSCALE_F32_F64(rotate_from_edge_k25, MATSCALE_ROTATE_PARAMS(float), MATSCALE_ROTATE_PARAMS(double), MATSCALE_ROTATE_ARGS)

// The gradient of a rotation with respect to its blocks (so2.rs `BlockOuterOp`), one warp per
// (edge e, block entry t): for entry (i, j) of block l,
// out[e, t] = scale[l] Σ_ch a[e, slot(l² + i), ch] · b[e, l² + j, ch], 0 where the slot is −1
// (|i − l| > mmax); a is m-major [E, trunc, c], b l-major [E, full, c].
template <typename T>
__device__ void block_outer_impl(long long total, int c, int trunc, int full, int wlen,
                                 const T* __restrict__ a, const T* __restrict__ b,
                                 const int* __restrict__ slot, const T* __restrict__ scale,
                                 T* __restrict__ out) {
    const int lane = threadIdx.x & 31;
    MATSCALE_WARP_STRIDE(idx, total) {
        const long long e = idx / wlen;
        const int t = (int)(idx % wlen);
        int l = 0;
        while ((l + 1) * (2 * l + 1) * (2 * l + 3) / 3 <= t) ++l;
        const int n = 2 * l + 1;
        const int off = l * (2 * l - 1) * (2 * l + 1) / 3;
        const int i = (t - off) / n, j = (t - off) % n;
        const int s = slot[l * l + i];  // the same for the whole warp
        T acc = T(0);
        if (s >= 0) {
            const T* ar = a + (e * trunc + s) * c;
            const T* br = b + (e * full + l * l + j) * c;
            for (int ch = lane; ch < c; ch += 32) acc += ar[ch] * br[ch];
        }
        acc = warp_sum(acc);
        if (lane == 0) out[idx] = s >= 0 ? scale[l] * acc : T(0);
    }
}

MATSCALE_F32_F64(block_outer,
    (long long total, int c, int trunc, int full, int wlen, const float* a, const float* b, const int* slot, const float* scale, float* out),
    (long long total, int c, int trunc, int full, int wlen, const double* a, const double* b, const int* slot, const double* scale, double* out),
    (total, c, trunc, full, wlen, a, b, slot, scale, out))

// dst[e, s, ch] = src[e, s, ch] · rad[e, rows[s], ch] (dst may be src).
template <typename T>
__device__ void radial_scale_impl(long long total, int c, int trunc, int num_rows, const T* src,
                                  const T* __restrict__ rad, const int* __restrict__ rows, T* dst) {
    MATSCALE_GRID_STRIDE(idx, total) {
        const int ch = (int)(idx % c);
        const long long es = idx / c;
        const int s = (int)(es % trunc);
        const long long e = es / trunc;
        dst[idx] = src[idx] * rad[(e * num_rows + rows[s]) * c + ch];
    }
}

MATSCALE_F32_F64(radial_scale,
    (long long total, int c, int trunc, int num_rows, const float* src, const float* rad, const int* rows, float* dst),
    (long long total, int c, int trunc, int num_rows, const double* src, const double* rad, const int* rows, double* dst),
    (total, c, trunc, num_rows, src, rad, rows, dst))

// Radial backward, one thread per (e, radial row q, ch): the one or two m-major slots of row q
// (`slots[2q]`, `slots[2q + 1]`, −1 if absent) give
// grad_rad[e, q, ch] = Σ_s g[e, s, ch] x[e, s, ch] and gx[e, s, ch] = g[e, s, ch] rad[e, q, ch].
template <typename T>
__device__ void radial_backward_impl(long long total, int c, int trunc, int num_rows,
                                     const T* __restrict__ g, const T* __restrict__ x,
                                     const T* __restrict__ rad, const int* __restrict__ slots,
                                     T* __restrict__ grad_rad, T* __restrict__ gx) {
    MATSCALE_GRID_STRIDE(idx, total) {
        const int ch = (int)(idx % c);
        const long long eq = idx / c;
        const int q = (int)(eq % num_rows);
        const long long e = eq / num_rows;
        const T r = rad[idx];
        T acc = T(0);
        for (int p = 0; p < 2; ++p) {
            const int s = slots[2 * q + p];
            if (s < 0) continue;
            const long long at = (e * trunc + s) * c + ch;
            acc += g[at] * x[at];
            gx[at] = g[at] * r;
        }
        grad_rad[idx] = acc;
    }
}

MATSCALE_F32_F64(radial_backward,
    (long long total, int c, int trunc, int num_rows, const float* g, const float* x, const float* rad, const int* slots, float* grad_rad, float* gx),
    (long long total, int c, int trunc, int num_rows, const double* g, const double* x, const double* rad, const int* slots, double* grad_rad, double* gx),
    (total, c, trunc, num_rows, g, x, rad, slots, grad_rad, gx))

// dst[e, j] = a[e·rs + off1 + j] + a[e·rs + off2 + j] for j < n (dst dense [E, n]).
template <typename T>
__device__ void add_rows_impl(long long total, int n, const T* __restrict__ a, long long off1,
                              long long off2, long long rs, T* __restrict__ dst) {
    MATSCALE_GRID_STRIDE(idx, total) {
        const long long e = idx / n;
        const int j = (int)(idx % n);
        dst[idx] = a[e * rs + off1 + j] + a[e * rs + off2 + j];
    }
}

MATSCALE_F32_F64(add_rows,
    (long long total, int n, const float* a, long long off1, long long off2, long long rs, float* dst),
    (long long total, int n, const double* a, long long off1, long long off2, long long rs, double* dst),
    (total, n, a, off1, off2, rs, dst))

// dst[e·drs + doff + j] = src[e·srs + soff + j] for j < n (non-overlapping rows).
template <typename T>
__device__ void copy_rows_impl(long long total, int n, const T* src, long long soff, long long srs,
                               T* dst, long long doff, long long drs) {
    MATSCALE_GRID_STRIDE(idx, total) {
        const long long e = idx / n;
        const int j = (int)(idx % n);
        dst[e * drs + doff + j] = src[e * srs + soff + j];
    }
}

MATSCALE_F32_F64(copy_rows,
    (long long total, int n, const float* src, long long soff, long long srs, float* dst, long long doff, long long drs),
    (long long total, int n, const double* src, long long soff, long long srs, double* dst, long long doff, long long drs),
    (total, n, src, soff, srs, dst, doff, drs))

// dst[e·drs + doff + j] = v[j] for j < n (the bias of every edge's m = 0 outputs).
template <typename T>
__device__ void broadcast_rows_impl(long long total, int n, const T* __restrict__ v, T* dst,
                                    long long doff, long long drs) {
    MATSCALE_GRID_STRIDE(idx, total) {
        const long long e = idx / n;
        const int j = (int)(idx % n);
        dst[e * drs + doff + j] = v[j];
    }
}

MATSCALE_F32_F64(broadcast_rows,
    (long long total, int n, const float* v, float* dst, long long doff, long long drs),
    (long long total, int n, const double* v, double* dst, long long doff, long long drs),
    (total, n, v, dst, doff, drs))

// dst[i] = value.
template <typename T> __device__ void fill_impl(long long total, T value, T* dst) {
    MATSCALE_GRID_STRIDE(idx, total) { dst[idx] = value; }
}

MATSCALE_F32_F64(fill, (long long total, float value, float* dst),
    (long long total, double value, double* dst), (total, value, dst))
