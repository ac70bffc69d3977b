// Driver of the host test of the rotation kernels of rotate.cu (src/so2.rs): reads one
// launch from argv[1], runs `rotate_to_edge_k{K}` or `rotate_from_edge_k{K}` under emu.h with
// the launch shape of src/cuda/so2.rs `rotate_cfg` (but at most three edge blocks, so that
// the edge-stride loop runs several rounds), writes the output to argv[2].
//
// Input, little-endian: nine i64 — bytes per float (4 or 8), direction (0 to the edge frame,
// 1 back), edges, c, lmax, mmax, trunc, wlen, K — then in [edges·rows_in·c] and w
// [edges·wlen] as floats, slot [(lmax+1)²] and block_off [lmax + 2] as i32, scale [lmax + 1]
// as floats. Output: [edges·rows_out·c] floats (zeros where the kernel writes nothing).
// Direction 2 runs `block_outer` (one warp per block entry, 64 threads per block, at most three
// blocks): a [edges·trunc·c] and b [edges·(lmax+1)²·c] as floats, slot [(lmax+1)²] as i32,
// scale [lmax + 1] as floats (K unused). Output: [edges·wlen] floats.
#include "emu.h"
#include "driver.h"
#include "rotate.cu"

#include <vector>

template <typename T> static int run(const std::int64_t* h, const char* out_path) {
    const long long dir = h[1], edges = h[2], c = h[3], lmax = h[4], mmax = h[5], trunc = h[6],
                    wlen = h[7], k = h[8];
    const long long full = (lmax + 1) * (lmax + 1);
    if (dir == 2) {
        auto a = read<T>((std::size_t)(edges * trunc * c));
        auto b = read<T>((std::size_t)(edges * full * c));
        auto slot = read<int>((std::size_t)full);
        auto scale = read<T>((std::size_t)(lmax + 1));
        const long long total = edges * wlen;
        std::vector<T> out((std::size_t)total + 1, T(-12345));
        long long blocks = (total * 32 + 63) / 64;
        if (blocks > 3) blocks = 3;
        if (blocks < 1) blocks = 1;
        emu_launch((unsigned)blocks, 64, block_outer_impl<T>, total, (int)c, (int)trunc,
                   (int)full, (int)wlen, (const T*)a.data(), (const T*)b.data(),
                   (const int*)slot.data(), (const T*)scale.data(), out.data());
        return write_output(out_path, out.data(), (std::size_t)total);
    }
    const long long rows_in = dir == 0 ? full : trunc, rows_out = dir == 0 ? trunc : full;
    auto in = read<T>((std::size_t)(edges * rows_in * c));
    auto w = read<T>((std::size_t)(edges * wlen));
    auto slot = read<int>((std::size_t)full);
    auto block_off = read<int>((std::size_t)(lmax + 2));
    auto scale = read<T>((std::size_t)(lmax + 1));
    std::vector<T> out((std::size_t)(edges * rows_out * c) + 1, T(0));
    long long threads = (c + 31) / 32 * 32;
    if (threads > 128) threads = 128;
    const unsigned tiles = (unsigned)((c + threads - 1) / threads);
    const unsigned grid = (unsigned)(edges < 3 ? (edges < 1 ? 1 : edges) : 3);
    using Kernel = void (*)(long long, int, int, int, int, int, const T*, const T*, const int*,
                            const int*, const T*, T*);
    Kernel kernel = nullptr;
    if (dir == 0) {
        if (k == 5) kernel = rotate_to_edge_k5_impl<T>;
        if (k == 9) kernel = rotate_to_edge_k9_impl<T>;
        if (k == 13) kernel = rotate_to_edge_k13_impl<T>;
        if (k == 25) kernel = rotate_to_edge_k25_impl<T>;
    } else {
        if (k == 5) kernel = rotate_from_edge_k5_impl<T>;
        if (k == 9) kernel = rotate_from_edge_k9_impl<T>;
        if (k == 13) kernel = rotate_from_edge_k13_impl<T>;
        if (k == 25) kernel = rotate_from_edge_k25_impl<T>;
    }
    if (!kernel) {
        std::fprintf(stderr, "no kernel for K = %lld\n", k);
        return 2;
    }
    emu_launch_2d(grid, tiles, (unsigned)threads, kernel, edges, (int)c, (int)lmax, (int)trunc,
                  (int)wlen, (int)mmax, (const T*)in.data(), (const T*)w.data(),
                  (const int*)slot.data(), (const int*)block_off.data(), (const T*)scale.data(),
                  out.data());
    return write_output(out_path, out.data(), (std::size_t)(edges * rows_out * c));
}

int main(int argc, char** argv) {
    return driver_main<9>(argc, argv, run<float>, run<double>);
}
