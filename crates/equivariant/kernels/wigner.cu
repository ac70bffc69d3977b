// Per-edge frames and their block-diagonal Wigner-D matrices, on the device
// (the host path is frames.rs `edge_rotations` + wigner.rs `WignerBlocks::from_angles`).
//
// Two passes: one thread per edge builds the frame rotation R (fairchem's helper-vector frame,
// or the zero-roll frame), its e3nn Euler angles (α, β, γ) and the tables cos(kθ), sin(kθ) by
// complex multiplication (as the CPU), all in double, into a per-edge table; then one thread
// per output entry writes D^l = Z(α) J Z(β) J Z(γ), l ≤ lmax, as a short sum over the two
// non-zeros per row of the Z matrices (8 (2l+1) products). Output rows are
// [E, blocks_len(lmax)] in the storage type; `bad` receives the smallest degenerate edge index.
// (The first version ran one thread block per edge with thread 0 doing the serial part while
// the block waited: 3–4 % of the H200's bound.)
#include "common.cuh"


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

// Pass 1, one thread per edge: the frame, its Euler angles and the tables cos(kθ), sin(kθ)
// (k ≤ lmax) of the three angles into tables[e][angle][k][2]; ok[e] = 0 for a degenerate edge
// (and `bad` gets the smallest such index).
template <typename T>
__device__ void edge_wigner_tables_impl(long long edges, int lmax, const T* __restrict__ edge_vec,
                                        const double* __restrict__ helpers, int has_helpers,
                                        double* __restrict__ tables, int* __restrict__ ok,
                                        int* __restrict__ bad) {
    MATSCALE_GRID_STRIDE(e, edges) {
        const double ev[3] = {(double)edge_vec[3 * e], (double)edge_vec[3 * e + 1], (double)edge_vec[3 * e + 2]};
        double r[3][3];
        const bool good = edge_frame(ev, has_helpers ? helpers + 3 * e : nullptr, r);
        ok[e] = good ? 1 : 0;
        if (!good) {
            atomicMin(bad, (int)e);
            continue;
        }
        // e3nn matrix_to_angles with atan2 for β (wigner.rs `matrix_to_angles`).
        const double x = r[0][1], y = r[1][1], z = r[2][1];
        const double beta = atan2(sqrt(x * x + z * z), y);
        const double alpha = (x == 0.0 && z == 0.0) ? 0.0 : atan2(x, z);
        double sa, ca;
        sincos(alpha, &sa, &ca);
        const double gamma = atan2(ca * r[0][2] - sa * r[2][2], ca * r[0][0] - sa * r[2][0]);
        const double angles[3] = {alpha, beta, gamma};
        double* tab = tables + e * 3 * (lmax + 1) * 2;
        for (int a = 0; a < 3; ++a) {
            double s, c;
            sincos(angles[a], &s, &c);
            double* t = tab + a * (lmax + 1) * 2;
            t[0] = 1.0;
            t[1] = 0.0;
            for (int k = 1; k <= lmax; ++k) {
                const double pc = t[2 * (k - 1)], ps = t[2 * (k - 1) + 1];
                t[2 * k] = pc * c - ps * s;
                t[2 * k + 1] = pc * s + ps * c;
            }
        }
    }
}

MATSCALE_F32_F64(edge_wigner_tables,
    (long long edges, int lmax, const float* edge_vec, const double* helpers, int has_helpers, double* tables, int* ok, int* bad),
    (long long edges, int lmax, const double* edge_vec, const double* helpers, int has_helpers, double* tables, int* ok, int* bad),
    (edges, lmax, edge_vec, helpers, has_helpers, tables, ok, bad))

// Pass 2, one thread per output entry (edge e, entry t of its blocks): D^l[i][j] =
// (Z(α) J Z(β) J Z(γ))[i][j] from the edge's tables, as a short sum over the two non-zeros per
// row of the Z matrices; zeros for a degenerate edge.
template <typename T>
__device__ void edge_wigner_entries_impl(long long total, int lmax, int wlen,
                                         const double* __restrict__ tables, const int* __restrict__ ok,
                                         const double* __restrict__ j_blocks, T* __restrict__ out) {
    MATSCALE_GRID_STRIDE(idx, total) {
        const long long e = idx / wlen;
        const int t = (int)(idx % wlen);
        if (!ok[e]) {
            out[idx] = T(0);
            continue;
        }
        const double* tab = tables + e * 3 * (lmax + 1) * 2;
        const double(*ta)[2] = reinterpret_cast<const double(*)[2]>(tab);
        const double(*tb)[2] = reinterpret_cast<const double(*)[2]>(tab + (lmax + 1) * 2);
        const double(*tg)[2] = reinterpret_cast<const double(*)[2]>(tab + 2 * (lmax + 1) * 2);
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
        out[idx] = (T)d;
    }
}

MATSCALE_F32_F64(edge_wigner_entries,
    (long long total, int lmax, int wlen, const double* tables, const int* ok, const double* j_blocks, float* out),
    (long long total, int lmax, int wlen, const double* tables, const int* ok, const double* j_blocks, double* out),
    (total, lmax, wlen, tables, ok, j_blocks, out))
