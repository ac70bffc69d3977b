// LayerNorm over the last dimension fused with a pointwise activation, and the same followed
// by one dot product per row (crates/equivariant/src/norm_act.rs): forward and first-order
// backward. One warp per row of A values; `act` < 0 is no activation, otherwise the function
// code of `activation` (common.cuh). The weight-gradient sums are deterministic: each warp
// adds its fixed range of rows into its own partial row, and `ln_act_reduce` adds the
// partials in warp order.
#include "common.cuh"

// (mean, 1/√(var + eps)) of one row, every lane getting both (biased variance, two passes).
template <typename T>
__device__ __forceinline__ void row_stats(const T* __restrict__ x, int a, T eps, int lane, T& mean, T& r) {
    T s = T(0);
    for (int j = lane; j < a; j += 32) s += x[j];
    mean = warp_sum(s) / T(a);
    T q = T(0);
    for (int j = lane; j < a; j += 32) {
        const T d = x[j] - mean;
        q += d * d;
    }
    r = T(1) / sqrt(warp_sum(q) / T(a) + eps);
}

template <typename T> __device__ __forceinline__ T act_of(int act, T slope, T y) {
    return act < 0 ? y : activation(act, 0, slope, y);
}

// out[row, j] = act((x − μ) r w_j + b_j).
template <typename T>
__device__ void ln_act_forward_impl(long long rows, int a, int act, T slope, T eps, const T* __restrict__ x,
                                    const T* __restrict__ w, const T* __restrict__ b, T* __restrict__ out) {
    const int lane = threadIdx.x & 31;
    MATSCALE_WARP_STRIDE(row, rows) {
        const T* xr = x + row * a;
        T mean, r;
        row_stats(xr, a, eps, lane, mean, r);
        for (int j = lane; j < a; j += 32) out[row * a + j] = act_of(act, slope, (xr[j] - mean) * r * w[j] + b[j]);
    }
}

MATSCALE_F32_F64(ln_act_forward,
    (long long rows, int a, int act, float slope, float eps, const float* x, const float* w, const float* b, float* out),
    (long long rows, int a, int act, double slope, double eps, const double* x, const double* w, const double* b, double* out),
    (rows, a, act, slope, eps, x, w, b, out))

// out[row] = Σ_j act((x − μ) r w_j + b_j) · dot[row % heads, j]; wb = [w ‖ b].
template <typename T>
__device__ void ln_act_dot_forward_impl(long long rows, int a, int heads, int act, T slope, T eps,
                                        const T* __restrict__ x, const T* __restrict__ wb,
                                        const T* __restrict__ dot, T* __restrict__ out) {
    const int lane = threadIdx.x & 31;
    MATSCALE_WARP_STRIDE(row, rows) {
        const T* xr = x + row * a;
        const T* d = dot + (row % heads) * a;
        T mean, r;
        row_stats(xr, a, eps, lane, mean, r);
        T s = T(0);
        for (int j = lane; j < a; j += 32) s += act_of(act, slope, (xr[j] - mean) * r * wb[j] + wb[a + j]) * d[j];
        s = warp_sum(s);
        if (lane == 0) out[row] = s;
    }
}

MATSCALE_F32_F64(ln_act_dot_forward,
    (long long rows, int a, int heads, int act, float slope, float eps, const float* x, const float* wb, const float* dot, float* out),
    (long long rows, int a, int heads, int act, double slope, double eps, const double* x, const double* wb, const double* dot, double* out),
    (rows, a, heads, act, slope, eps, x, wb, dot, out))

// Backward over rows [warp · rpw, (warp + 1) · rpw): dx into `dx`, the warp's [dw | db | ddot]
// sums into partial[warp · width ..] (width = 2a + heads · a; heads = 0: plain LayerNorm-act
// with g [rows, a]; heads > 0: the dot variant with g [rows] and packed = [w ‖ b ‖ dot]).
template <typename T>
__device__ void ln_act_backward_rows_impl(long long rows, int a, int heads, int rpw, int act, T slope, T eps,
                                          const T* __restrict__ x, const T* __restrict__ g,
                                          const T* __restrict__ packed, T* __restrict__ dx,
                                          T* __restrict__ partial) {
    const int lane = threadIdx.x & 31;
    const T* w = packed;
    const T* b = packed + a;
    const T* dot = packed + 2 * a;
    const long long width = 2LL * a + (long long)heads * a;
    const long long warps = (rows + rpw - 1) / rpw;
    const T inv_a = T(1) / T(a);
    MATSCALE_WARP_STRIDE(wp, warps) {
        T* acc = partial + wp * width;
        for (long long j = lane; j < width; j += 32) acc[j] = T(0);
        // Lanes add into entries other lanes zeroed (width is not a multiple of 32 in
        // general): the warp barrier orders the zeroing before every addition.
        __syncwarp();
        const long long r0 = wp * rpw;
        const long long r1 = r0 + rpw < rows ? r0 + rpw : rows;
        for (long long row = r0; row < r1; ++row) {
            const T* xr = x + row * a;
            T* dxr = dx + row * a;
            T mean, r;
            row_stats(xr, a, eps, lane, mean, r);
            const int h = heads > 0 ? (int)(row % heads) : 0;
            const T gs = heads > 0 ? g[row] : T(0);
            // dn_j = ∂loss/∂(n_j w_j + b_j), stored times w_j in dx for the second pass.
            T s1 = T(0), s2 = T(0);
            for (int j = lane; j < a; j += 32) {
                const T n = (xr[j] - mean) * r;
                const T y = n * w[j] + b[j];
                T gj;
                if (heads > 0) {
                    const T d = dot[h * a + j];
                    acc[2 * a + h * a + j] += gs * act_of(act, slope, y);
                    gj = gs * d;
                } else {
                    gj = g[row * a + j];
                }
                const T dn = act < 0 ? gj : gj * activation(act, 1, slope, y);
                acc[j] += dn * n;
                acc[a + j] += dn;
                const T dnw = dn * w[j];
                dxr[j] = dnw;
                s1 += dnw;
                s2 += dnw * n;
            }
            const T mean_dn = warp_sum(s1) * inv_a;
            const T mean_dn_n = warp_sum(s2) * inv_a;
            for (int j = lane; j < a; j += 32) {
                const T n = (xr[j] - mean) * r;
                dxr[j] = r * (dxr[j] - mean_dn - n * mean_dn_n);
            }
        }
    }
}

MATSCALE_F32_F64(ln_act_backward_rows,
    (long long rows, int a, int heads, int rpw, int act, float slope, float eps, const float* x, const float* g, const float* packed, float* dx, float* partial),
    (long long rows, int a, int heads, int rpw, int act, double slope, double eps, const double* x, const double* g, const double* packed, double* dx, double* partial),
    (rows, a, heads, rpw, act, slope, eps, x, g, packed, dx, partial))

// out[j] = Σ_w partial[w · width + j] in warp order.
template <typename T>
__device__ void ln_act_reduce_impl(long long width, long long warps, const T* __restrict__ partial, T* __restrict__ out) {
    MATSCALE_GRID_STRIDE(j, width) {
        T s = T(0);
        for (long long w = 0; w < warps; ++w) s += partial[w * width + j];
        out[j] = s;
    }
}

MATSCALE_F32_F64(ln_act_reduce,
    (long long width, long long warps, const float* partial, float* out),
    (long long width, long long warps, const double* partial, double* out),
    (width, warps, partial, out))

// EquiformerV2's layer_norm_sh (norms.rs `LayerNormShOp`), one warp per node of K rows of C:
// the l = 0 row LayerNorm'd over channels (γ₀, β₀), the rows 1..K scaled by
// s = 1/√(m + eps), m = Σ_r a_r Σ_c x[r, c]² / C, and by w[wrow(r), c]. p = [γ₀ | β₀ | w].
template <typename T>
__device__ void ln_sh_forward_impl(long long nodes, int k, int c, T eps, const T* __restrict__ x,
                                   const T* __restrict__ p, const double* __restrict__ row_coef,
                                   const int* __restrict__ wrow, T* __restrict__ out) {
    const int lane = threadIdx.x & 31;
    const T* g0 = p;
    const T* b0 = p + c;
    const T* w = p + 2 * c;
    MATSCALE_WARP_STRIDE(node, nodes) {
        const T* xn = x + node * k * c;
        T* on = out + node * k * c;
        T mean, r;
        row_stats(xn, c, eps, lane, mean, r);
        for (int j = lane; j < c; j += 32) on[j] = (xn[j] - mean) * r * g0[j] + b0[j];
        T m = T(0);
        for (int row = 1; row < k; ++row) {
            T acc = T(0);
            for (int j = lane; j < c; j += 32) acc += xn[row * c + j] * xn[row * c + j];
            m += T(row_coef[row - 1]) * acc;
        }
        m = warp_sum(m) / T(c);
        const T s = T(1) / sqrt(m + eps);
        for (int row = 1; row < k; ++row) {
            const T* wl = w + wrow[row - 1] * c;
            for (int j = lane; j < c; j += 32) on[row * c + j] = xn[row * c + j] * s * wl[j];
        }
    }
}

MATSCALE_F32_F64(ln_sh_forward,
    (long long nodes, int k, int c, float eps, const float* x, const float* p, const double* row_coef, const int* wrow, float* out),
    (long long nodes, int k, int c, double eps, const double* x, const double* p, const double* row_coef, const int* wrow, double* out),
    (nodes, k, c, eps, x, p, row_coef, wrow, out))

// Its backward over nodes [warp · npw, (warp + 1) · npw): dx, and the warp's
// [dγ₀ | dβ₀ | dw] sums into partial[warp · width ..] (width = p's length), summed across
// warps by `ln_act_reduce`. Per node: the l = 0 row as LayerNorm's backward; the other rows
// ∂x[r, c] = s w g − (Σ x w g) s³ / C · a_r x[r, c], ∂w[wrow(r), c] += x s g.
template <typename T>
__device__ void ln_sh_backward_rows_impl(long long nodes, int k, int c, int npw, T eps,
                                         const T* __restrict__ x, const T* __restrict__ g,
                                         const T* __restrict__ p, const double* __restrict__ row_coef,
                                         const int* __restrict__ wrow, int width, T* __restrict__ dx,
                                         T* __restrict__ partial) {
    const int lane = threadIdx.x & 31;
    const T* g0 = p;
    const T* w = p + 2 * c;
    const long long warps = (nodes + npw - 1) / npw;
    const T inv_c = T(1) / T(c);
    MATSCALE_WARP_STRIDE(wp, warps) {
        T* acc = partial + wp * width;
        for (int j = lane; j < width; j += 32) acc[j] = T(0);
        __syncwarp();  // lanes add into entries other lanes zeroed
        const long long n0 = wp * npw;
        const long long n1 = n0 + npw < nodes ? n0 + npw : nodes;
        for (long long node = n0; node < n1; ++node) {
            const T* xn = x + node * k * c;
            const T* gn = g + node * k * c;
            T* dxn = dx + node * k * c;
            // l = 0: LayerNorm backward (no activation).
            T mean, r;
            row_stats(xn, c, eps, lane, mean, r);
            T s1 = T(0), s2 = T(0);
            for (int j = lane; j < c; j += 32) {
                const T n = (xn[j] - mean) * r;
                const T dn = gn[j];
                acc[j] += dn * n;
                acc[c + j] += dn;
                const T dnw = dn * g0[j];
                dxn[j] = dnw;
                s1 += dnw;
                s2 += dnw * n;
            }
            const T mean_dn = warp_sum(s1) * inv_c;
            const T mean_dn_n = warp_sum(s2) * inv_c;
            for (int j = lane; j < c; j += 32) {
                const T n = (xn[j] - mean) * r;
                dxn[j] = r * (dxn[j] - mean_dn - n * mean_dn_n);
            }
            // Rows 1..K.
            T m = T(0), ds = T(0);
            for (int row = 1; row < k; ++row) {
                const T* wl = w + wrow[row - 1] * c;
                T a2 = T(0);
                for (int j = lane; j < c; j += 32) {
                    const T v = xn[row * c + j];
                    a2 += v * v;
                    ds += v * wl[j] * gn[row * c + j];
                }
                m += T(row_coef[row - 1]) * a2;
            }
            m = warp_sum(m) * inv_c;
            ds = warp_sum(ds);
            const T s = T(1) / sqrt(m + eps);
            const T coef = ds * s * s * s * inv_c;
            for (int row = 1; row < k; ++row) {
                const int wr = wrow[row - 1];
                const T* wl = w + wr * c;
                T* dw = acc + 2 * c + wr * c;
                const T a = coef * T(row_coef[row - 1]);
                for (int j = lane; j < c; j += 32) {
                    const T v = xn[row * c + j], gv = gn[row * c + j];
                    dw[j] += v * s * gv;
                    dxn[row * c + j] = s * wl[j] * gv - a * v;
                }
            }
        }
    }
}

MATSCALE_F32_F64(ln_sh_backward_rows,
    (long long nodes, int k, int c, int npw, float eps, const float* x, const float* g, const float* p, const double* row_coef, const int* wrow, int width, float* dx, float* partial),
    (long long nodes, int k, int c, int npw, double eps, const double* x, const double* g, const double* p, const double* row_coef, const int* wrow, int width, double* dx, double* partial),
    (nodes, k, c, npw, eps, x, g, p, row_coef, wrow, width, dx, partial))
