// The S2 activations of crates/equivariant/src/s2grid.rs in one kernel each, on the grid
// matrices factored over β and α (src/s2grid/factored.rs): one thread per (row, channel)
// computes, ring by ring, t[j] = Σ_{c in group j} u_to[β, c] x[c], the ring's grid values
// g[α] = Σ_j v[α, j] t[j], SiLU, s[j] = Σ_α v[α, j] SiLU(g[α]) and out[c] += u_from[β, c] s[j],
// so the grid values never leave registers. The separate path (two batched GEMMs with the
// dense [G, K] matrices and an elementwise SiLU between them) writes and re-reads the
// `G / K` ≈ 17 times larger grid values through memory and runs about 3× more operations.
//
// Layout of the tables (built by `Factored::grouped` on the host):
// - `order[q]`, q < K: the coefficients grouped by α profile, ascending within a group;
//   group j holds q in [offsets[j], offsets[j + 1]);
// - `u_to[β · K + q]`, `u_from[β · K + q]`: the β factors of coefficient order[q];
// - `v[α · NJ + j]`: the α profiles.
// x, out are [N, K, C] (row-major); thread item i = row · C + channel, so a warp reads and
// writes consecutive channels of one coefficient row (coalesced). Each thread keeps its own
// column of coefficients (and accumulators) in shared memory, `col[q · blockDim + tid]`: no
// thread reads another's column, so the kernels need no barrier.
#include "common.cuh"


// σ(x) for the grid points. f32: the hardware exponential (`__expf`, ex2.approx on x·log₂e)
// and a correctly rounded reciprocal, a few instructions instead of expf's range reduction and
// an IEEE division: SiLU runs at every one of the G grid points per (row, channel, pass), as
// often as the J-term sums around it. Its error (a few ulp, growing with |x|) stays far below
// the 1e-5 the f32 tests allow; f64 keeps the exact expression.
template <typename T> __device__ __forceinline__ T grid_sigmoid(T x) { return sigmoid_of(x); }
template <> __device__ __forceinline__ float grid_sigmoid<float>(float x) {
    return __frcp_rn(1.0f + __expf(-x));
}

template <typename T, int NJ>
__device__ void s2_fused_forward_body(long long items, int c, int k, int nb, int na, int skip,
                                      const T* __restrict__ x, const T* __restrict__ scalars,
                                      const T* __restrict__ u_to, const T* __restrict__ u_from,
                                      const T* __restrict__ v, const int* __restrict__ order,
                                      const int* __restrict__ offsets, T* __restrict__ out) {
    extern __shared__ unsigned char smem_raw[];
    const int bd = blockDim.x, tid = threadIdx.x;
    T* xs = reinterpret_cast<T*>(smem_raw) + tid;  // xs[q * bd]: coefficient order[q]
    T* os = xs + (long long)k * bd;                // os[q * bd]: output of order[q]
    MATSCALE_GRID_STRIDE(i, items) {
        const long long row = i / c;
        const long long ch = i - row * c;
        const T* xr = x + row * k * c + ch;
        for (int q = 0; q < k; ++q) {
            xs[q * bd] = xr[(long long)order[q] * c];
            os[q * bd] = T(0);
        }
        for (int b = 0; b < nb; ++b) {
            const T* ut = u_to + (long long)b * k;
            const T* uf = u_from + (long long)b * k;
            T t[NJ], s[NJ];
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                T acc = T(0);
                for (int q = offsets[j]; q < offsets[j + 1]; ++q) acc += ut[q] * xs[q * bd];
                t[j] = acc;
                s[j] = T(0);
            }
            for (int a = 0; a < na; ++a) {
                const T* va = v + a * NJ;
                T g = T(0);
#pragma unroll
                for (int j = 0; j < NJ; ++j) g += va[j] * t[j];
                const T h = g * grid_sigmoid(g);
#pragma unroll
                for (int j = 0; j < NJ; ++j) s[j] += va[j] * h;
            }
#pragma unroll
            for (int j = 0; j < NJ; ++j)
                for (int q = offsets[j]; q < offsets[j + 1]; ++q) os[q * bd] += uf[q] * s[j];
        }
        T* orow = out + row * k * c + ch;
        for (int q = 0; q < k; ++q) {
            const int cc = order[q];
            if (cc >= skip) orow[(long long)cc * c] = os[q * bd];
        }
        if (skip) {
            const T sv = scalars[row * c + ch];
            orow[0] = sv * sigmoid_of(sv);
        }
    }
}

template <typename T, int NJ>
__device__ void s2_fused_backward_body(long long items, int c, int k, int nb, int na, int skip,
                                       const T* __restrict__ x, const T* __restrict__ dy,
                                       const T* __restrict__ u_to, const T* __restrict__ u_from,
                                       const T* __restrict__ v, const int* __restrict__ order,
                                       const int* __restrict__ offsets, T* __restrict__ dx) {
    extern __shared__ unsigned char smem_raw[];
    const int bd = blockDim.x, tid = threadIdx.x;
    T* xs = reinterpret_cast<T*>(smem_raw) + tid;
    T* gs = xs + (long long)k * bd;  // dy of order[q], 0 for the skipped rows
    T* ds = gs + (long long)k * bd;  // dx of order[q]
    MATSCALE_GRID_STRIDE(i, items) {
        const long long row = i / c;
        const long long ch = i - row * c;
        const T* xr = x + row * k * c + ch;
        const T* gr = dy + row * k * c + ch;
        for (int q = 0; q < k; ++q) {
            const int cc = order[q];
            xs[q * bd] = xr[(long long)cc * c];
            gs[q * bd] = cc >= skip ? gr[(long long)cc * c] : T(0);
            ds[q * bd] = T(0);
        }
        for (int b = 0; b < nb; ++b) {
            const T* ut = u_to + (long long)b * k;
            const T* uf = u_from + (long long)b * k;
            T t[NJ], s[NJ], t2[NJ];
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                T acc = T(0), accg = T(0);
                for (int q = offsets[j]; q < offsets[j + 1]; ++q) {
                    acc += ut[q] * xs[q * bd];
                    accg += uf[q] * gs[q * bd];
                }
                t[j] = acc;
                s[j] = accg;
                t2[j] = T(0);
            }
            for (int a = 0; a < na; ++a) {
                const T* va = v + a * NJ;
                T g = T(0), gg = T(0);
#pragma unroll
                for (int j = 0; j < NJ; ++j) {
                    g += va[j] * t[j];
                    gg += va[j] * s[j];
                }
                const T sg = grid_sigmoid(g);
                const T d = gg * sg * (T(1) + g * (T(1) - sg));
#pragma unroll
                for (int j = 0; j < NJ; ++j) t2[j] += va[j] * d;
            }
#pragma unroll
            for (int j = 0; j < NJ; ++j)
                for (int q = offsets[j]; q < offsets[j + 1]; ++q) ds[q * bd] += ut[q] * t2[j];
        }
        T* dxr = dx + row * k * c + ch;
        for (int q = 0; q < k; ++q) dxr[(long long)order[q] * c] = ds[q * bd];
    }
}

// The kernels, one per group count J (the t, s register arrays need a compile-time size, and
// a kernel's register budget is that of its largest case): `s2_fused_forward_j{J}_{f32,f64}`
// and `s2_fused_backward_j{J}_{f32,f64}` for odd J = 2 · mmax + 1 up to
// 13 (mmax ≤ 6); the host uses the GEMM path for any other J.
//
// forward: out[row, c ≥ skip, :] = fromᵀ · SiLU(to · x[row]); with skip = 1 (the separable
// activation) out[row, 0, :] = SiLU(scalars[row, :]).
// backward: dx[row] = toᵀ · (SiLU'(to · x[row]) ⊙ (from_{c ≥ skip} · dy[row, c ≥ skip])).
#define S2_FUSED_PARAMS(T)                                                                    \
    long long items, int c, int k, int nb, int na, int skip, const T *x, const T *second,     \
        const T *u_to, const T *u_from, const T *v, const int *order, const int *offsets,     \
        T *out
#define S2_FUSED_ARGS items, c, k, nb, na, skip, x, second, u_to, u_from, v, order, offsets, out
#define S2_FUSED_INSTANCE(NJ)                                                                 \
    template <typename T> __device__ void s2_fused_forward_j##NJ##_impl(S2_FUSED_PARAMS(T)) {  \
        s2_fused_forward_body<T, NJ>(S2_FUSED_ARGS);                                          \
    }                                                                                         \
    template <typename T> __device__ void s2_fused_backward_j##NJ##_impl(S2_FUSED_PARAMS(T)) { \
        s2_fused_backward_body<T, NJ>(S2_FUSED_ARGS);                                         \
    }

#define S2_FUSED_F32 (S2_FUSED_PARAMS(float))
#define S2_FUSED_F64 (S2_FUSED_PARAMS(double))
#define S2_FUSED_CALL (S2_FUSED_ARGS)

S2_FUSED_INSTANCE(1)
S2_FUSED_INSTANCE(3)
S2_FUSED_INSTANCE(5)
S2_FUSED_INSTANCE(7)
S2_FUSED_INSTANCE(9)
S2_FUSED_INSTANCE(11)
S2_FUSED_INSTANCE(13)
MATSCALE_F32_F64(s2_fused_forward_j1, S2_FUSED_F32, S2_FUSED_F64, S2_FUSED_CALL)
MATSCALE_F32_F64(s2_fused_forward_j3, S2_FUSED_F32, S2_FUSED_F64, S2_FUSED_CALL)
MATSCALE_F32_F64(s2_fused_forward_j5, S2_FUSED_F32, S2_FUSED_F64, S2_FUSED_CALL)
MATSCALE_F32_F64(s2_fused_forward_j7, S2_FUSED_F32, S2_FUSED_F64, S2_FUSED_CALL)
MATSCALE_F32_F64(s2_fused_forward_j9, S2_FUSED_F32, S2_FUSED_F64, S2_FUSED_CALL)
MATSCALE_F32_F64(s2_fused_forward_j11, S2_FUSED_F32, S2_FUSED_F64, S2_FUSED_CALL)
MATSCALE_F32_F64(s2_fused_forward_j13, S2_FUSED_F32, S2_FUSED_F64, S2_FUSED_CALL)
MATSCALE_F32_F64(s2_fused_backward_j1, S2_FUSED_F32, S2_FUSED_F64, S2_FUSED_CALL)
MATSCALE_F32_F64(s2_fused_backward_j3, S2_FUSED_F32, S2_FUSED_F64, S2_FUSED_CALL)
MATSCALE_F32_F64(s2_fused_backward_j5, S2_FUSED_F32, S2_FUSED_F64, S2_FUSED_CALL)
MATSCALE_F32_F64(s2_fused_backward_j7, S2_FUSED_F32, S2_FUSED_F64, S2_FUSED_CALL)
MATSCALE_F32_F64(s2_fused_backward_j9, S2_FUSED_F32, S2_FUSED_F64, S2_FUSED_CALL)
MATSCALE_F32_F64(s2_fused_backward_j11, S2_FUSED_F32, S2_FUSED_F64, S2_FUSED_CALL)
MATSCALE_F32_F64(s2_fused_backward_j13, S2_FUSED_F32, S2_FUSED_F64, S2_FUSED_CALL)
