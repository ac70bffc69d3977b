// Per-edge frames and their block-diagonal Wigner-D matrices, on the device
// (the host path is frames.rs `edge_rotations` + wigner.rs `WignerBlocks::from_angles`).
//
// Per edge: the frame rotation R (fairchem's helper-vector frame, or the zero-roll frame), its
// e3nn Euler angles (α, β, γ) and the tables cos(kθ), sin(kθ) by complex multiplication (as the
// CPU), all in double (`edge_angle_tables`); then every entry of D^l = Z(α) J Z(β) J Z(γ),
// l ≤ lmax, as a short sum over the two non-zeros per row of the Z matrices (`wigner_entry`,
// 8 (2l+1) products). Output rows are [E, blocks_len(lmax)] in the storage type; `bad` receives
// the smallest degenerate edge index. Two launch shapes of the same arithmetic
// (src/cuda/wigner.rs chooses, `WIGNER_TWO_PASS`):
// - `edge_wigner`: one thread block per edge; thread 0 builds the tables in shared memory while
//   the block waits, then the block writes the entries (3–4 % of the H200's bound, session 17);
// - `edge_wigner_tables` + `edge_wigner_entries`: one thread per edge writes the tables to
//   global memory, then one thread per output entry.
#include "common.cuh"

#define WIGNER_MAX_DEGREES 12  // WIGNER_LMAX + 1

__device__ __forceinline__ double dot3(const double* a, const double* b) {
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
}

__device__ __forceinline__ void cross3(const double* a, const double* b, double* c) {
    c[0] = a[1] * b[2] - a[2] * b[1];
    c[1] = a[2] * b[0] - a[0] * b[2];
    c[2] = a[0] * b[1] - a[1] * b[0];
}

// Frame rotation rows of one edge; false for a degenerate edge or helper.
__device__ bool edge_frame(const double* edge, const double* helper, double r[3][3]) {
    const double en = sqrt(dot3(edge, edge));
    if (!isfinite(en) || en == 0.0) return false;
    const double x[3] = {edge[0] / en, edge[1] / en, edge[2] / en};
    if (helper == nullptr) {
        // Zero roll: R = (R_y(α) R_x(β))ᵀ with (α, β) the e3nn angles of the edge direction.
        const double beta = atan2(sqrt(x[0] * x[0] + x[2] * x[2]), x[1]);
        const double alpha = (x[0] == 0.0 && x[2] == 0.0) ? 0.0 : atan2(x[0], x[2]);
        double sa, ca, sb, cb;
        sincos(alpha, &sa, &ca);
        sincos(beta, &sb, &cb);
        const double m[3][3] = {{ca, sa * sb, sa * cb}, {0.0, cb, -sb}, {-sa, ca * sb, ca * cb}};
        for (int i = 0; i < 3; ++i)
            for (int j = 0; j < 3; ++j) r[i][j] = m[j][i];
        return true;
    }
    const double hn = sqrt(dot3(helper, helper));
    if (!isfinite(hn) || hn == 0.0) return false;
    const double h0[3] = {helper[0] / hn, helper[1] / hn, helper[2] / hn};
    const double hb[3] = {-h0[1], h0[0], h0[2]};
    const double hc[3] = {h0[0], -h0[2], h0[1]};
    const double* h = h0;
    if (fabs(dot3(h, x)) > fabs(dot3(hb, x))) h = hb;
    if (fabs(dot3(h, x)) > fabs(dot3(hc, x))) h = hc;
    if (fabs(dot3(h, x)) >= 0.99) return false;
    double z[3], y[3];
    cross3(x, h, z);
    const double zn = sqrt(dot3(z, z));
    for (int i = 0; i < 3; ++i) z[i] /= zn;
    cross3(x, z, y);
    const double yn = sqrt(dot3(y, y));
    for (int i = 0; i < 3; ++i) {
        r[0][i] = z[i];
        r[1][i] = x[i];
        r[2][i] = -(y[i] / yn);
    }
    return true;
}

// Entry (p, q) of Z(θ) for degree l from the table t[k] = (cos kθ, sin kθ).
__device__ __forceinline__ double zval(int l, int p, int q, const double (*t)[2]) {
    if (p == q) return p == l ? 1.0 : t[abs(l - p)][0];
    return p < l ? t[l - p][1] : -t[p - l][1];
}

// The frame of one edge, its Euler angles and their tables t[a·stride + 2k + {0,1}] =
// (cos kθ_a, sin kθ_a), a ∈ {α, β, γ}, k ≤ lmax; false (and nothing written) for a degenerate
// edge or helper.
__device__ bool edge_angle_tables(const double* ev, const double* helper, int lmax, double* t,
                                  int stride) {
    double r[3][3];
    if (!edge_frame(ev, helper, r)) return false;
    // e3nn matrix_to_angles with atan2 for β (wigner.rs `matrix_to_angles`).
    const double x = r[0][1], y = r[1][1], z = r[2][1];
    const double beta = atan2(sqrt(x * x + z * z), y);
    const double alpha = (x == 0.0 && z == 0.0) ? 0.0 : atan2(x, z);
    double sa, ca;
    sincos(alpha, &sa, &ca);
    const double gamma = atan2(ca * r[0][2] - sa * r[2][2], ca * r[0][0] - sa * r[2][0]);
    const double angles[3] = {alpha, beta, gamma};
    for (int a = 0; a < 3; ++a) {
        double s, c;
        sincos(angles[a], &s, &c);
        double* ta = t + a * stride;
        ta[0] = 1.0;
        ta[1] = 0.0;
        for (int k = 1; k <= lmax; ++k) {
            const double pc = ta[2 * (k - 1)], ps = ta[2 * (k - 1) + 1];
            ta[2 * k] = pc * c - ps * s;
            ta[2 * k + 1] = pc * s + ps * c;
        }
    }
    return true;
}

// Entry t of one edge's concatenated blocks (t < blocks_len(lmax)) from its angle tables
// (`edge_angle_tables`, angle a from tab + a·stride).
__device__ double wigner_entry(int t, const double* __restrict__ j_blocks, const double* tab,
                               int stride) {
    const double(*ta)[2] = reinterpret_cast<const double(*)[2]>(tab);
    const double(*tb)[2] = reinterpret_cast<const double(*)[2]>(tab + stride);
    const double(*tg)[2] = reinterpret_cast<const double(*)[2]>(tab + 2 * stride);
    int l = 0;
    while ((l + 1) * (2 * l + 1) * (2 * l + 3) / 3 <= t) ++l;
    const int n = 2 * l + 1;
    const int off = l * (2 * l - 1) * (2 * l + 1) / 3;
    const double* jl = j_blocks + off;
    const int i = (t - off) / n, j = (t - off) % n;
    double d = 0.0;
    for (int ai = 0; ai < 2; ++ai) {
        const int a = ai == 0 ? i : 2 * l - i;
        if (ai == 1 && a == i) break;
        const double za = zval(l, i, a, ta);
        double u = 0.0;  // (J Z(β) J Z(γ))[a][j]
        for (int k = 0; k < n; ++k) {
            const double jak = jl[a * n + k];
            if (jak == 0.0) continue;
            double v = 0.0;  // (Z(β) J Z(γ))[k][j]
            for (int bi = 0; bi < 2; ++bi) {
                const int b = bi == 0 ? k : 2 * l - k;
                if (bi == 1 && b == k) break;
                double w = 0.0;  // (J Z(γ))[b][j]
                for (int qi = 0; qi < 2; ++qi) {
                    const int q = qi == 0 ? j : 2 * l - j;
                    if (qi == 1 && q == j) break;
                    w += jl[b * n + q] * zval(l, q, j, tg);
                }
                v += zval(l, k, b, tb) * w;
            }
            u += jak * v;
        }
        d += za * u;
    }
    return d;
}

// One thread block per edge (a grid-stride loop over edges): thread 0 builds the tables in
// shared memory, then the block's threads write the edge's entries.
template <typename T>
__device__ void edge_wigner_impl(long long edges, int lmax, int wlen, const T* __restrict__ edge_vec,
                                 const double* __restrict__ helpers, int has_helpers,
                                 const double* __restrict__ j_blocks, T* __restrict__ out,
                                 int* __restrict__ bad) {
    __shared__ double table[3 * WIGNER_MAX_DEGREES * 2];
    __shared__ int ok;
    for (long long e = blockIdx.x; e < edges; e += gridDim.x) {
        if (threadIdx.x == 0) {
            const double ev[3] = {(double)edge_vec[3 * e], (double)edge_vec[3 * e + 1], (double)edge_vec[3 * e + 2]};
            ok = edge_angle_tables(ev, has_helpers ? helpers + 3 * e : nullptr, lmax, table,
                                   2 * WIGNER_MAX_DEGREES)
                     ? 1
                     : 0;
            if (!ok) atomicMin(bad, (int)e);
        }
        __syncthreads();
        T* row = out + e * wlen;
        for (int t = threadIdx.x; t < wlen; t += blockDim.x)
            row[t] = ok ? (T)wigner_entry(t, j_blocks, table, 2 * WIGNER_MAX_DEGREES) : T(0);
        __syncthreads();
    }
}

MATSCALE_F32_F64(edge_wigner,
    (long long edges, int lmax, int wlen, const float* edge_vec, const double* helpers, int has_helpers, const double* j_blocks, float* out, int* bad),
    (long long edges, int lmax, int wlen, const double* edge_vec, const double* helpers, int has_helpers, const double* j_blocks, double* out, int* bad),
    (edges, lmax, wlen, edge_vec, helpers, has_helpers, j_blocks, out, bad))

// Two passes. Pass 1, one thread per edge: the tables of the three angles into
// tables[e][angle][k][2] (k ≤ lmax); ok[e] = 0 for a degenerate edge (and `bad` gets the
// smallest such index).
template <typename T>
__device__ void edge_wigner_tables_impl(long long edges, int lmax, const T* __restrict__ edge_vec,
                                        const double* __restrict__ helpers, int has_helpers,
                                        double* __restrict__ tables, int* __restrict__ ok,
                                        int* __restrict__ bad) {
    MATSCALE_GRID_STRIDE(e, edges) {
        const double ev[3] = {(double)edge_vec[3 * e], (double)edge_vec[3 * e + 1], (double)edge_vec[3 * e + 2]};
        const bool good = edge_angle_tables(ev, has_helpers ? helpers + 3 * e : nullptr, lmax,
                                            tables + e * 3 * (lmax + 1) * 2, 2 * (lmax + 1));
        ok[e] = good ? 1 : 0;
        if (!good) atomicMin(bad, (int)e);
    }
}

MATSCALE_F32_F64(edge_wigner_tables,
    (long long edges, int lmax, const float* edge_vec, const double* helpers, int has_helpers, double* tables, int* ok, int* bad),
    (long long edges, int lmax, const double* edge_vec, const double* helpers, int has_helpers, double* tables, int* ok, int* bad),
    (edges, lmax, edge_vec, helpers, has_helpers, tables, ok, bad))

// Pass 2, one thread per output entry (edge e, entry t of its blocks); zeros for a degenerate
// edge.
template <typename T>
__device__ void edge_wigner_entries_impl(long long total, int lmax, int wlen,
                                         const double* __restrict__ tables, const int* __restrict__ ok,
                                         const double* __restrict__ j_blocks, T* __restrict__ out) {
    MATSCALE_GRID_STRIDE(idx, total) {
        const long long e = idx / wlen;
        const int t = (int)(idx % wlen);
        out[idx] = ok[e] ? (T)wigner_entry(t, j_blocks, tables + e * 3 * (lmax + 1) * 2, 2 * (lmax + 1))
                         : T(0);
    }
}

MATSCALE_F32_F64(edge_wigner_entries,
    (long long total, int lmax, int wlen, const double* tables, const int* ok, const double* j_blocks, float* out),
    (long long total, int lmax, int wlen, const double* tables, const int* ok, const double* j_blocks, double* out),
    (total, lmax, wlen, tables, ok, j_blocks, out))
