// Driver of the host test of segment.cu (src/segment.rs): reads one launch from argv[1], runs
// it under emu.h as src/cuda/segment.rs launches it (grid-stride, 64 threads per block, at
// most three blocks so that the loops run several rounds), writes the output to argv[2].
//
// Input, little-endian: ten i64 — bytes per float (4 or 8), mode, segments S, items E, cols,
// has_order, k, hv, v, heads — then offsets [S + 1], order [E] and index [E] (segment of each
// item) as u32, then per mode (floats):
// - 0 `segment_sum`: src [E·cols]; output [S·cols];
// - 1 `segment_gather`: src [S·cols]; output [E·cols];
// - 2 `segment_softmax` (eps 1e-16): src [E·cols]; output [E·cols];
// - 3 `segment_softmax_backward`: y [E·cols], g [E·cols]; output [E·cols];
// - 4 `segment_weighted_sum`: x [E·k·hv], w [E·heads]; output [S·k·hv];
// - 5 `segment_weighted_sum_dx` then `_dw`: x [E·k·hv], w [E·heads], g [S·k·hv]; output
//   [E·k·hv + E·heads].
#include "emu.h"
#include "driver.h"
#include "segment.cu"

#include <vector>

static unsigned blocks_for(long long threads) {
    long long b = (threads + 63) / 64;
    return (unsigned)(b > 3 ? 3 : (b < 1 ? 1 : b));
}

template <typename T> static int run(const std::int64_t* h, const char* out_path) {
    const long long mode = h[1], s = h[2], e = h[3], cols = h[4], has_order = h[5], k = h[6],
                    hv = h[7], v = h[8], heads = h[9];
    auto offsets = read<unsigned int>((std::size_t)(s + 1));
    auto order = read<unsigned int>((std::size_t)e);
    auto index = read<unsigned int>((std::size_t)e);
    const unsigned int* off = offsets.data();
    const unsigned int* ord = order.data();
    const unsigned int* idx = index.data();
    const int ho = (int)has_order, c = (int)cols;
    std::vector<T> out;
    if (mode == 0) {
        auto src = read<T>((std::size_t)(e * cols));
        out.assign((std::size_t)(s * cols), T(-12345));
        emu_launch(blocks_for(s * cols), 64, segment_sum_impl<T>, s * cols, c, off, ord, ho,
                   (const T*)src.data(), out.data());
    } else if (mode == 1) {
        auto src = read<T>((std::size_t)(s * cols));
        out.assign((std::size_t)(e * cols), T(-12345));
        emu_launch(blocks_for(e * cols), 64, segment_gather_impl<T>, e * cols, c, idx,
                   (const T*)src.data(), out.data());
    } else if (mode == 2) {
        auto src = read<T>((std::size_t)(e * cols));
        out.assign((std::size_t)(e * cols), T(-12345));
        emu_launch(blocks_for(s * cols), 64, segment_softmax_impl<T>, s * cols, c, off, ord, ho,
                   T(1e-16), (const T*)src.data(), out.data());
    } else if (mode == 3) {
        auto y = read<T>((std::size_t)(e * cols));
        auto g = read<T>((std::size_t)(e * cols));
        out.assign((std::size_t)(e * cols), T(-12345));
        emu_launch(blocks_for(s * cols), 64, segment_softmax_backward_impl<T>, s * cols, c, off,
                   ord, ho, (const T*)y.data(), (const T*)g.data(), out.data());
    } else {
        const long long row = k * hv;
        auto x = read<T>((std::size_t)(e * row));
        auto w = read<T>((std::size_t)(e * heads));
        if (mode == 4) {
            out.assign((std::size_t)(s * row), T(-12345));
            emu_launch(blocks_for(s * row), 64, segment_weighted_sum_impl<T>, s * row, (int)row,
                       (int)hv, (int)v, (int)heads, off, ord, ho, (const T*)x.data(),
                       (const T*)w.data(), out.data());
        } else {
            auto g = read<T>((std::size_t)(s * row));
            out.assign((std::size_t)(e * row + e * heads), T(-12345));
            emu_launch(blocks_for(e * row), 64, segment_weighted_sum_dx_impl<T>, e * row, (int)row,
                       (int)hv, (int)v, (int)heads, idx, (const T*)w.data(), (const T*)g.data(),
                       out.data());
            emu_launch(blocks_for(e * heads * 32), 64, segment_weighted_sum_dw_impl<T>, e * heads,
                       (int)k, (int)hv, (int)v, (int)heads, idx, (const T*)x.data(),
                       (const T*)g.data(), out.data() + e * row);
        }
    }
    return write_output(out_path, out.data(), out.size());
}

int main(int argc, char** argv) {
    return driver_main<10>(argc, argv, run<float>, run<double>);
}
