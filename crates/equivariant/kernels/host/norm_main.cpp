// Driver of the host test of norm.cu (src/norm_act.rs): reads one launch from argv[1], runs
// it under emu.h, writes the output to argv[2].
//
// Input, little-endian: seven i64 — bytes per float (4 or 8), mode, rows, a (row width),
// heads, act (-1 none, else `activation`'s function code), rows per warp — then slope and eps
// and x [rows·a] as floats, then
// - mode 0 (`ln_act_forward`): w [a], b [a]; output [rows·a];
// - mode 1 (`ln_act_dot_forward`): wb [2a], dot [heads·a]; output [rows];
// - mode 2 (`ln_act_backward_rows` then `ln_act_reduce`): g ([rows·a] when heads = 0, else
//   [rows]) and packed [(2 + heads)·a]; output [rows·a + (2 + heads)·a].
// - mode 3 (`ln_sh_forward`, `a` = C and `heads` = K rows per node, `rows` nodes): p
//   [(2 + lmax)·C] as floats, row_coef [K − 1] as f64, weight rows [K − 1] as i32; output
//   [rows·K·C];
// - mode 4 (`ln_sh_backward_rows` then `ln_act_reduce`, nodes per warp = rows per warp): g
//   [rows·K·C], then p, row_coef and weight rows as for mode 3; output [rows·K·C + |p|].
// Launches use 64 threads per block and at most two blocks, so the warp-stride loops run
// several rounds.
#include "emu.h"
#include "driver.h"
#include "norm.cu"

#include <vector>

static unsigned blocks_for(long long threads) {
    long long b = (threads + 63) / 64;
    return (unsigned)(b > 2 ? 2 : (b < 1 ? 1 : b));
}

template <typename T> static int run(const std::int64_t* h, const char* out_path) {
    const long long mode = h[1], rows = h[2], a = h[3], heads = h[4], act = h[5], rpw = h[6];
    auto consts = read<T>(2);
    const T slope = consts[0], eps = consts[1];
    std::vector<T> out;
    if (mode == 3 || mode == 4) {
        const long long c = a, k = heads, lmax_plus_1 = (long long)std::lround(std::sqrt((double)k));
        const long long width = (1 + lmax_plus_1) * c;
        auto x = read<T>((std::size_t)(rows * k * c));
        auto g = read<T>(mode == 4 ? (std::size_t)(rows * k * c) : 0);
        auto p = read<T>((std::size_t)width);
        auto coef = read<double>((std::size_t)(k - 1));
        auto wrow = read<int>((std::size_t)(k - 1));
        if (mode == 3) {
            out.assign((std::size_t)(rows * k * c), T(-12345));
            emu_launch(blocks_for(rows * 32), 64, ln_sh_forward_impl<T>, rows, (int)k, (int)c, eps,
                       (const T*)x.data(), (const T*)p.data(), (const double*)coef.data(),
                       (const int*)wrow.data(), out.data());
        } else {
            const long long warps = (rows + rpw - 1) / rpw;
            std::vector<T> partial((std::size_t)(warps * width), T(-777));
            out.assign((std::size_t)(rows * k * c + width), T(-12345));
            emu_launch(blocks_for(warps * 32), 64, ln_sh_backward_rows_impl<T>, rows, (int)k,
                       (int)c, (int)rpw, eps, (const T*)x.data(), (const T*)g.data(),
                       (const T*)p.data(), (const double*)coef.data(), (const int*)wrow.data(),
                       (int)width, out.data(), partial.data());
            emu_launch(blocks_for(width), 64, ln_act_reduce_impl<T>, width, warps,
                       (const T*)partial.data(), out.data() + rows * k * c);
        }
        return write_output(out_path, out.data(), out.size());
    }
    auto x = read<T>((std::size_t)(rows * a));
    if (mode == 0) {
        auto w = read<T>((std::size_t)a);
        auto b = read<T>((std::size_t)a);
        out.assign((std::size_t)(rows * a), T(-12345));
        emu_launch(blocks_for(rows * 32), 64, ln_act_forward_impl<T>, rows, (int)a, (int)act, slope,
                   eps, (const T*)x.data(), (const T*)w.data(), (const T*)b.data(), out.data());
    } else if (mode == 1) {
        auto wb = read<T>((std::size_t)(2 * a));
        auto dot = read<T>((std::size_t)(heads * a));
        out.assign((std::size_t)rows, T(-12345));
        emu_launch(blocks_for(rows * 32), 64, ln_act_dot_forward_impl<T>, rows, (int)a, (int)heads,
                   (int)act, slope, eps, (const T*)x.data(), (const T*)wb.data(),
                   (const T*)dot.data(), out.data());
    } else {
        const long long width = (2 + heads) * a;
        auto g = read<T>((std::size_t)(heads > 0 ? rows : rows * a));
        auto packed = read<T>((std::size_t)width);
        const long long warps = (rows + rpw - 1) / rpw;
        std::vector<T> partial((std::size_t)(warps * width), T(-777));
        out.assign((std::size_t)(rows * a + width), T(-12345));
        emu_launch(blocks_for(warps * 32), 64, ln_act_backward_rows_impl<T>, rows, (int)a,
                   (int)heads, (int)rpw, (int)act, slope, eps, (const T*)x.data(),
                   (const T*)g.data(), (const T*)packed.data(), out.data(), partial.data());
        emu_launch(blocks_for(width), 64, ln_act_reduce_impl<T>, width, warps,
                   (const T*)partial.data(), out.data() + rows * a);
    }
    return write_output(out_path, out.data(), out.size());
}

int main(int argc, char** argv) {
    return driver_main<7>(argc, argv, run<float>, run<double>);
}
