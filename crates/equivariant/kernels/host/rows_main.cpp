// Driver of the host test of the small row kernels of rotate.cu that the fused SO(2) layer runs
// between its GEMMs (src/host_kernels.rs `row_kernels_match_their_definitions_on_the_host`):
// reads one launch from argv[1], runs it under emu.h (64 threads per block, at most three
// blocks, so the grid-stride loops run several rounds), writes the output to argv[2].
//
// Input, little-endian: three i64 — bytes per float (4 or 8), mode, edges E — then per mode:
// - 0 `radial_scale`: c, trunc, num_rows as i64; src [E·trunc·c], rad [E·num_rows·c] as
//   floats, rows [trunc] as i32. Output: dst [E·trunc·c].
// - 1 `radial_backward`: c, trunc, num_rows as i64; g and x [E·trunc·c], rad [E·num_rows·c]
//   as floats, slots [2·num_rows] as i32. Output: grad_rad [E·num_rows·c], then gx
//   [E·trunc·c] (-12345 where the kernel wrote nothing).
// - 2 `add_rows`: n, off1, off2, rs as i64; a [E·rs]. Output: dst [E·n].
// - 3 `copy_rows`: n, soff, srs, doff, drs as i64; src [E·srs]. Output: dst [E·drs], -12345
//   where the kernel wrote nothing.
// - 4 `broadcast_rows`: n, doff, drs as i64; v [n]. Output: dst [E·drs] as in 3.
// - 5 `fill`: total as i64, value as one float. Output: dst [total].
#include "emu.h"
#include "driver.h"
#include "rotate.cu"

#include <vector>

static unsigned blocks_for(long long total) {
    long long g = (total + 63) / 64;
    return (unsigned)(g > 3 ? 3 : (g < 1 ? 1 : g));
}

template <typename T> static int run(const std::int64_t* h, const char* out_path) {
    const long long mode = h[1], e = h[2];
    const T unset = T(-12345);
    if (mode == 0 || mode == 1) {
        auto dims = read<long long>(3);
        const long long c = dims[0], trunc = dims[1], nr = dims[2];
        const long long total_s = e * trunc * c, total_r = e * nr * c;
        if (mode == 0) {
            auto src = read<T>((std::size_t)total_s);
            auto rad = read<T>((std::size_t)total_r);
            auto rows = read<int>((std::size_t)trunc);
            std::vector<T> dst((std::size_t)total_s + 1, unset);
            emu_launch(blocks_for(total_s), 64, radial_scale_impl<T>, total_s, (int)c, (int)trunc,
                       (int)nr, (const T*)src.data(), (const T*)rad.data(),
                       (const int*)rows.data(), dst.data());
            return write_output(out_path, dst.data(), (std::size_t)total_s);
        }
        auto g = read<T>((std::size_t)total_s);
        auto x = read<T>((std::size_t)total_s);
        auto rad = read<T>((std::size_t)total_r);
        auto slots = read<int>((std::size_t)(2 * nr));
        std::vector<T> out((std::size_t)(total_r + total_s) + 1, unset);
        emu_launch(blocks_for(total_r), 64, radial_backward_impl<T>, total_r, (int)c, (int)trunc,
                   (int)nr, (const T*)g.data(), (const T*)x.data(), (const T*)rad.data(),
                   (const int*)slots.data(), out.data(), out.data() + total_r);
        return write_output(out_path, out.data(), (std::size_t)(total_r + total_s));
    }
    if (mode == 2) {
        auto p = read<long long>(4);
        const long long n = p[0], rs = p[3];
        auto a = read<T>((std::size_t)(e * rs));
        std::vector<T> dst((std::size_t)(e * n) + 1, unset);
        emu_launch(blocks_for(e * n), 64, add_rows_impl<T>, e * n, (int)n, (const T*)a.data(), p[1],
                   p[2], rs, dst.data());
        return write_output(out_path, dst.data(), (std::size_t)(e * n));
    }
    if (mode == 3 || mode == 4) {
        auto p = read<long long>(mode == 3 ? 5 : 3);
        const long long n = p[0];
        const long long doff = mode == 3 ? p[3] : p[1], drs = mode == 3 ? p[4] : p[2];
        auto src = read<T>((std::size_t)(mode == 3 ? e * p[2] : n));
        std::vector<T> dst((std::size_t)(e * drs) + 1, unset);
        if (mode == 3)
            emu_launch(blocks_for(e * n), 64, copy_rows_impl<T>, e * n, (int)n,
                       (const T*)src.data(), p[1], p[2], dst.data(), doff, drs);
        else
            emu_launch(blocks_for(e * n), 64, broadcast_rows_impl<T>, e * n, (int)n,
                       (const T*)src.data(), dst.data(), doff, drs);
        return write_output(out_path, dst.data(), (std::size_t)(e * drs));
    }
    auto total = read<long long>(1);
    auto value = read<T>(1);
    std::vector<T> dst((std::size_t)total[0] + 1, unset);
    emu_launch(blocks_for(total[0]), 64, fill_impl<T>, total[0], value[0], dst.data());
    return write_output(out_path, dst.data(), (std::size_t)total[0]);
}

int main(int argc, char** argv) {
    return driver_main<3>(argc, argv, run<float>, run<double>);
}
