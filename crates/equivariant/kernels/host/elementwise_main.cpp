// Driver of the host test of the multi-tensor kernels of elementwise.cu (src/host_kernels.rs):
// reads one launch from argv[1], runs it under emu.h, writes the output to argv[2].
//
// Input, little-endian: three i64 — bytes per float (4 or 8), mode, tensors T — then the T
// sizes as i64, then per mode:
// - 0 (`adamw_multi` against `adamw_param` + `adamw_moments` per tensor): the ten scalars
//   gscale, β₁, 1 − β₁, β₂, 1 − β₂, lr, decay, 1/c₁, 1/c₂, eps, then per tensor θ [n], [m | v]
//   [2n] and g [n] as floats. Output: θ and [m | v] of every tensor after the multi-tensor
//   launch, then the same after the per-tensor launches (g pre-scaled by gscale there).
// - 1 (`sum_squares_multi`): per tensor x [n] as floats. Output: the 5 f64 partials of a
//   5-block launch.
// - 2 (`activation`, one tensor of n): function, order as i64, slope and x [n] as floats;
//   output [n].
// - 3 (`silu_backward_inplace`, one tensor): zero_grad as i64, x [n] and g [n]; output [n].
// - 4 (`sum_squares_partials`, one tensor, 64 blocks of 256 as cuda/elementwise.rs launches
//   it): x [n]; output the 64 f64 partials.
// - 5 (`shifted_softplus`, one tensor): order as i64, x [n]; output [n].
// - 6 (`gaussian_smearing`, n = edges · K): K as i64, coeff, d [edges], μ [K]; output [n].
// - 7 (`silu_rows`, n = rows · c): c and the row stride rs as i64, scalars [n]; output
//   [rows · rs], the untouched entries 0.
// - 8 (`silu_inplace`, one tensor): x [n]; output [n].
// Launches use 64 threads per block (256 for the sums, which reduce over 256 shared slots)
// and at most three blocks, so the grid-stride loops run several rounds and cross tensors.
#include "emu.h"
#include "driver.h"
#include "elementwise.cu"

#include <vector>

template <typename T> static int run(const std::int64_t* h, const char* out_path) {
    const long long mode = h[1], tensors = h[2];
    auto sizes = read<long long>((std::size_t)tensors);
    std::vector<long long> starts((std::size_t)tensors + 1, 0);
    for (long long t = 0; t < tensors; ++t) starts[t + 1] = starts[t] + sizes[t];
    const long long total = starts[tensors];
    if (mode >= 2) {
        const long long n = sizes[0];
        unsigned grid = (unsigned)((n + 63) / 64);
        if (grid > 3) grid = 3;
        if (grid == 0) grid = 1;
        if (mode == 2) {
            auto ints = read<long long>(2);
            auto slope = read<T>(1);
            auto x = read<T>((std::size_t)n);
            std::vector<T> out((std::size_t)n + 1, T(-12345));
            emu_launch(grid, 64, activation_impl<T>, n, (int)ints[0], (int)ints[1], slope[0],
                       (const T*)x.data(), out.data());
            return write_output(out_path, out.data(), (std::size_t)n);
        }
        if (mode == 3) {
            auto zero = read<long long>(1);
            auto x = read<T>((std::size_t)n);
            auto g = read<T>((std::size_t)n);
            emu_launch(grid, 64, silu_backward_inplace_impl<T>, n, (int)zero[0], x.data(),
                       (const T*)g.data());
            return write_output(out_path, x.data(), (std::size_t)n);
        }
        if (mode == 5) {
            auto order = read<long long>(1);
            auto x = read<T>((std::size_t)n);
            std::vector<T> out((std::size_t)n + 1, T(-12345));
            emu_launch(grid, 64, shifted_softplus_impl<T>, n, (int)order[0], (const T*)x.data(),
                       out.data());
            return write_output(out_path, out.data(), (std::size_t)n);
        }
        if (mode == 6) {
            auto k = read<long long>(1);
            auto coeff = read<T>(1);
            auto d = read<T>((std::size_t)(n / k[0]));
            auto mu = read<T>((std::size_t)k[0]);
            std::vector<T> out((std::size_t)n + 1, T(-12345));
            emu_launch(grid, 64, gaussian_smearing_impl<T>, n, (int)k[0], coeff[0],
                       (const T*)d.data(), (const T*)mu.data(), out.data());
            return write_output(out_path, out.data(), (std::size_t)n);
        }
        if (mode == 7) {
            auto cr = read<long long>(2);
            auto sc = read<T>((std::size_t)n);
            const long long rows = n / cr[0];
            std::vector<T> out((std::size_t)(rows * cr[1]) + 1, T(0));
            emu_launch(grid, 64, silu_rows_impl<T>, n, (int)cr[0], (const T*)sc.data(), out.data(),
                       cr[1]);
            return write_output(out_path, out.data(), (std::size_t)(rows * cr[1]));
        }
        if (mode == 8) {
            auto x = read<T>((std::size_t)n);
            emu_launch(grid, 64, silu_inplace_impl<T>, n, x.data());
            return write_output(out_path, x.data(), (std::size_t)n);
        }
        auto x = read<T>((std::size_t)n);
        std::vector<double> partial(64, -1.0);
        emu_launch(64, 256, sum_squares_partials_impl<T>, n, 0LL, (const T*)x.data(),
                   partial.data());
        return write_output(out_path, partial.data(), partial.size());
    }
    if (mode == 1) {
        std::vector<std::vector<T>> xs;
        std::vector<unsigned long long> ptrs;
        for (long long t = 0; t < tensors; ++t) {
            xs.push_back(read<T>((std::size_t)sizes[t]));
            ptrs.push_back((unsigned long long)xs.back().data());
        }
        std::vector<double> partial(5, -1.0);
        emu_launch(5, 256, sum_squares_multi_impl<T>, total, (int)tensors,
                   (const long long*)starts.data(), (const unsigned long long*)ptrs.data(),
                   partial.data());
        return write_output(out_path, partial.data(), partial.size());
    }
    auto s = read<T>(10);
    std::vector<std::vector<T>> theta, mv, g, theta_b, mv_b, g_b;
    std::vector<unsigned long long> ptrs;
    for (long long t = 0; t < tensors; ++t) {
        const std::size_t n = (std::size_t)sizes[t];
        theta.push_back(read<T>(n));
        mv.push_back(read<T>(2 * n));
        g.push_back(read<T>(n));
    }
    theta_b = theta;
    mv_b = mv;
    g_b = g;
    for (long long t = 0; t < tensors; ++t) {
        ptrs.push_back((unsigned long long)theta[t].data());
        ptrs.push_back((unsigned long long)mv[t].data());
        ptrs.push_back((unsigned long long)g[t].data());
    }
    unsigned grid = (unsigned)((total + 63) / 64);
    if (grid > 3) grid = 3;
    if (grid == 0) grid = 1;
    emu_launch(grid, 64, adamw_multi_impl<T>, total, (int)tensors, (const long long*)starts.data(),
               (const unsigned long long*)ptrs.data(), s[0], s[1], s[2], s[3], s[4], s[5], s[6],
               s[7], s[8], s[9]);
    for (long long t = 0; t < tensors; ++t) {
        const long long n = sizes[t];
        for (auto& v : g_b[t]) v = v * s[0];
        emu_launch(grid, 64, adamw_param_impl<T>, n, s[1], s[2], s[3], s[4], s[5], s[6], s[7],
                   s[8], s[9], theta_b[t].data(), (const T*)mv_b[t].data(), (const T*)g_b[t].data());
        emu_launch(grid, 64, adamw_moments_impl<T>, n, s[1], s[2], s[3], s[4], mv_b[t].data(),
                   (const T*)g_b[t].data());
    }
    std::vector<T> out;
    for (auto* set : {&theta, &mv}) {
        for (long long t = 0; t < tensors; ++t) {
            const std::size_t n = (std::size_t)sizes[t] * (set == &mv ? 2 : 1);
            out.insert(out.end(), (*set)[t].begin(), (*set)[t].begin() + n);
        }
    }
    for (auto* set : {&theta_b, &mv_b}) {
        for (long long t = 0; t < tensors; ++t) {
            const std::size_t n = (std::size_t)sizes[t] * (set == &mv_b ? 2 : 1);
            out.insert(out.end(), (*set)[t].begin(), (*set)[t].begin() + n);
        }
    }
    return write_output(out_path, out.data(), out.size());
}

int main(int argc, char** argv) {
    return driver_main<3>(argc, argv, run<float>, run<double>);
}
