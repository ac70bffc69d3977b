// Real spherical harmonics (e3nn convention, y polar, l-major rows) and their gradient.
// Port of the CPU kernels of crates/equivariant/src/sh.rs: the forward evaluates the
// normalised recurrence Q̃_l^m = α_lm y Q̃_{l-1}^m − β_lm r² Q̃_{l-2}^m in the storage type,
// one thread per vector, staging the block's rows in shared memory so that the global
// stores are coalesced; the backward works in double for both storage types, as the CPU.
#include "common.cuh"

#define SH_MAX_DEGREES 12  // SH_LMAX + 1

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
// K_lm at l * (lmax + 1) + m (unnormalised Q_l^m are used here, as on the CPU).
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
        double q[SH_MAX_DEGREES][SH_MAX_DEGREES + 1];
        double c[SH_MAX_DEGREES], s[SH_MAX_DEGREES];
        for (int a = 0; a < SH_MAX_DEGREES; ++a)
            for (int b = 0; b <= SH_MAX_DEGREES; ++b) q[a][b] = 0.0;
        c[0] = 1.0;
        s[0] = 0.0;
        double dfact = 1.0;
        for (int m = 0; m <= lmax; ++m) {
            if (m > 0) {
                dfact *= (double)(2 * m - 1);
                c[m] = z * c[m - 1] - x * s[m - 1];
                s[m] = x * c[m - 1] + z * s[m - 1];
            }
            q[m][m] = dfact;
            for (int l = m + 1; l <= lmax; ++l) {
                const double prev2 = l >= m + 2 ? q[l - 2][m] : 0.0;
                q[l][m] = ((double)(2 * l - 1) * y * q[l - 1][m] - (double)(l + m - 1) * r2 * prev2) /
                          (double)(l - m);
            }
        }
        double gx = 0.0, gy = 0.0, gz = 0.0;
        for (int l = 1; l <= lmax; ++l) {
            const int centre = l * l + l;
            for (int m = 0; m <= l; ++m) {
                const double kk = k[l * nl + m];
                const double q_lm = q[l][m];
                const double q_up = q[l - 1][m + 1];
                const double q_down = q[l - 1][m];
                const double dq0 = -x * q_up, dq1 = (double)(l + m) * q_down, dq2 = -z * q_up;
                if (m == 0) {
                    const double w = (double)g[centre] * kk;
                    gx += w * dq0;
                    gy += w * dq1;
                    gz += w * dq2;
                } else {
                    const double mf = (double)m;
                    const double wc = (double)g[centre + m] * kk;
                    const double ws = (double)g[centre - m] * kk;
                    gx += wc * (dq0 * c[m] - mf * q_lm * s[m - 1]) + ws * (dq0 * s[m] + mf * q_lm * c[m - 1]);
                    gy += (wc * c[m] + ws * s[m]) * dq1;
                    gz += wc * (dq2 * c[m] + mf * q_lm * c[m - 1]) + ws * (dq2 * s[m] + mf * q_lm * s[m - 1]);
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
