// Real spherical harmonics (e3nn convention, y polar, l-major rows) and their gradient.
// Port of the CPU kernels of crates/equivariant/src/sh.rs: the forward evaluates the
// normalised recurrence Q̃_l^m = α_lm y Q̃_{l-1}^m − β_lm r² Q̃_{l-2}^m in the storage type,
// one thread per vector, staging the block's rows in shared memory so that the global
// stores are coalesced; the backward works in double for both storage types, as the CPU.
#include "common.cuh"

template <typename T>
__device__ void sh_forward_impl(long long n, int lmax, int normalize, const T* __restrict__ xyz,
                                const T* __restrict__ start, const T* __restrict__ alpha,
                                const T* __restrict__ beta, T* __restrict__ out) {
    extern __shared__ unsigned char smem_raw[];
    T* tile = reinterpret_cast<T*>(smem_raw);
    const int nl = lmax + 1;
    const int dim = nl * nl;
    const long long first = (long long)blockIdx.x * blockDim.x;
    const long long v = first + threadIdx.x;
    T* row = tile + (long long)threadIdx.x * dim;
    if (v < n) {
        T x = xyz[3 * v], y = xyz[3 * v + 1], z = xyz[3 * v + 2];
        if (normalize) {
            const T eps = T(1e-12);
            T r = sqrt(x * x + y * y + z * z);
            T inv = T(1) / (r > eps ? r : eps);
            x *= inv;
            y *= inv;
            z *= inv;
        }
        const T r2 = x * x + y * y + z * z;
        T c = T(1), s = T(0);  // (c + i s) = (z + i x)^m
        for (int m = 0; m <= lmax; ++m) {
            if (m > 0) {
                T cn = z * c - x * s;
                T sn = x * c + z * s;
                c = cn;
                s = sn;
            }
            T q_prev2 = T(0), q = start[m];
            for (int l = m;;) {
                const int centre = l * l + l;
                if (m == 0) {
                    row[centre] = q;
                } else {
                    row[centre + m] = q * c;
                    row[centre - m] = q * s;
                }
                if (++l > lmax) break;
                const T next = alpha[l * nl + m] * y * q - beta[l * nl + m] * r2 * q_prev2;
                q_prev2 = q;
                q = next;
            }
        }
    }
    __syncthreads();
    long long rows = n - first;
    if (rows > blockDim.x) rows = blockDim.x;
    for (long long i = threadIdx.x; i < rows * dim; i += blockDim.x) out[first * dim + i] = tile[i];
}

MATSCALE_F32_F64(sh_forward,
    (long long n, int lmax, int normalize, const float* xyz, const float* start, const float* alpha, const float* beta, float* out),
    (long long n, int lmax, int normalize, const double* xyz, const double* start, const double* alpha, const double* beta, double* out),
    (n, lmax, normalize, xyz, start, alpha, beta, out))

// Gradient of Σ_lm g_lm Y_lm(v) with respect to v; `k` holds the normalisation constants
// K_lm at l * (lmax + 1) + m (unnormalised Q_l^m are used here, as on the CPU). Forward-mode:
// each Q_l^m is carried with its three partial derivatives through the recurrence
// (l − m) Q_l^m = (2l − 1) y Q_{l−1}^m − (l + m − 1) r² Q_{l−2}^m (r² = x² + y² + z²), and
// c_m + i s_m = (z + i x)^m has ∂_x = m (−s_{m−1}, c_{m−1}), ∂_z = m (c_{m−1}, s_{m−1}), so a
// thread keeps a handful of scalars and no table (the previous version zeroed and indexed a
// 12 × 13 table of doubles per vector in local memory).
template <typename T>
__device__ void sh_backward_impl(long long n, int lmax, int normalize, const T* __restrict__ xyz,
                                 const T* __restrict__ grad, const double* __restrict__ k,
                                 T* __restrict__ out) {
    const int nl = lmax + 1;
    const int dim = nl * nl;
    MATSCALE_GRID_STRIDE(v, n) {
        const T* g = grad + v * dim;
        double x = xyz[3 * v], y = xyz[3 * v + 1], z = xyz[3 * v + 2];
        const double r = sqrt(x * x + y * y + z * z);
        const double scale = r > 1e-12 ? r : 1e-12;
        if (normalize) {
            x /= scale;
            y /= scale;
            z /= scale;
        }
        const double r2 = x * x + y * y + z * z;
        double gx = 0.0, gy = 0.0, gz = 0.0;
        double c = 1.0, s = 0.0, cp = 0.0, sp = 0.0;  // c_m, s_m and c_{m−1}, s_{m−1}
        double dfact = 1.0;                           // (2m − 1)!! = Q_m^m
        for (int m = 0; m <= lmax; ++m) {
            if (m > 0) {
                dfact *= (double)(2 * m - 1);
                cp = c;
                sp = s;
                c = z * cp - x * sp;
                s = x * cp + z * sp;
            }
            const double mf = (double)m;
            // ∂c_m, ∂s_m along x and z (neither depends on y).
            const double dcx = -mf * sp, dsx = mf * cp, dcz = mf * cp, dsz = mf * sp;
            // Q_l^m and its gradient (q1) and Q_{l−1}^m with its gradient (q2).
            double q1 = dfact, q1x = 0.0, q1y = 0.0, q1z = 0.0;
            double q2 = 0.0, q2x = 0.0, q2y = 0.0, q2z = 0.0;
            for (int l = m; l <= lmax; ++l) {
                if (l > m) {
                    const double a = (double)(2 * l - 1), b = (double)(l + m - 1);
                    const double inv = 1.0 / (double)(l - m);
                    const double nq = (a * y * q1 - b * r2 * q2) * inv;
                    const double nqx = (a * y * q1x - b * (2.0 * x * q2 + r2 * q2x)) * inv;
                    const double nqy = (a * (q1 + y * q1y) - b * (2.0 * y * q2 + r2 * q2y)) * inv;
                    const double nqz = (a * y * q1z - b * (2.0 * z * q2 + r2 * q2z)) * inv;
                    q2 = q1;
                    q2x = q1x;
                    q2y = q1y;
                    q2z = q1z;
                    q1 = nq;
                    q1x = nqx;
                    q1y = nqy;
                    q1z = nqz;
                }
                if (l == 0) continue;  // Y_0^0 is constant
                const int centre = l * l + l;
                const double kk = k[l * nl + m];
                if (m == 0) {
                    const double w = (double)g[centre] * kk;
                    gx += w * q1x;
                    gy += w * q1y;
                    gz += w * q1z;
                } else {
                    const double wc = (double)g[centre + m] * kk;
                    const double ws = (double)g[centre - m] * kk;
                    gx += wc * (q1x * c + q1 * dcx) + ws * (q1x * s + q1 * dsx);
                    gy += (wc * c + ws * s) * q1y;
                    gz += wc * (q1z * c + q1 * dcz) + ws * (q1z * s + q1 * dsz);
                }
            }
        }
        if (normalize) {
            if (r > 1e-12) {
                const double dot = x * gx + y * gy + z * gz;
                gx = (gx - x * dot) / r;
                gy = (gy - y * dot) / r;
                gz = (gz - z * dot) / r;
            } else {
                gx /= scale;
                gy /= scale;
                gz /= scale;
            }
        }
        out[3 * v] = (T)gx;
        out[3 * v + 1] = (T)gy;
        out[3 * v + 2] = (T)gz;
    }
}

MATSCALE_F32_F64(sh_backward,
    (long long n, int lmax, int normalize, const float* xyz, const float* grad, const double* k, float* out),
    (long long n, int lmax, int normalize, const double* xyz, const double* grad, const double* k, double* out),
    (n, lmax, normalize, xyz, grad, k, out))
