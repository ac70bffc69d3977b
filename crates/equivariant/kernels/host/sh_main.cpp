// Driver of the host test of the spherical-harmonics kernels of sh.cu (src/sh.rs): reads
// one launch from argv[1], runs it under emu.h as src/cuda/sh.rs launches it, writes the
// output to argv[2].
//
// Input, little-endian: five i64 — bytes per float (4 or 8), n, lmax, normalize, mode — then
// - mode 0 (`sh_backward`): xyz [n·3] and grad [n·(lmax+1)²] as floats, K [(lmax+1)²] as f64;
//   output [n·3] floats;
// - mode 1 (`sh_forward`): xyz [n·3], start [lmax+1], alpha and beta [(lmax+1)²] as floats;
//   output [n·(lmax+1)²] floats.
#include "emu.h"
#include "driver.h"
#include "sh.cu"

#include <vector>

template <typename T> static int forward(const std::int64_t* h, const char* out_path) {
    const long long n = h[1], lmax = h[2], normalize = h[3];
    const std::size_t nl = (std::size_t)(lmax + 1), dim = nl * nl;
    auto xyz = read<T>((std::size_t)(3 * n));
    auto start = read<T>(nl);
    auto alpha = read<T>(dim);
    auto beta = read<T>(dim);
    std::vector<T> out((std::size_t)n * dim + 1, T(-12345));
    // As cuda/sh.rs `vectors_per_block`: 64 rows per block, 32 past 48 KiB of shared memory.
    const unsigned per_block = 64 * dim * sizeof(T) <= 48 * 1024 ? 64 : 32;
    const unsigned grid = (unsigned)((n + per_block - 1) / per_block);
    if constexpr (sizeof(T) == 4) {
        emu_launch(grid, per_block, sh_forward_f32, n, (int)lmax, (int)normalize,
                   (const float*)xyz.data(), (const float*)start.data(),
                   (const float*)alpha.data(), (const float*)beta.data(), out.data());
    } else {
        emu_launch(grid, per_block, sh_forward_f64, n, (int)lmax, (int)normalize,
                   (const double*)xyz.data(), (const double*)start.data(),
                   (const double*)alpha.data(), (const double*)beta.data(), out.data());
    }
    return write_output(out_path, out.data(), (std::size_t)n * dim);
}

template <typename T> static int run(const std::int64_t* h, const char* out_path) {
    if (h[4] == 1) return forward<T>(h, out_path);
    const long long n = h[1], lmax = h[2], normalize = h[3];
    const std::size_t dim = (std::size_t)((lmax + 1) * (lmax + 1));
    auto xyz = read<T>((std::size_t)(3 * n));
    auto grad = read<T>((std::size_t)n * dim);
    auto k = read<double>(dim);
    std::vector<T> out((std::size_t)(3 * n) + 1, T(-12345));
    // 16 threads per block and at most three blocks: the grid-stride loop runs several rounds.
    unsigned grid = (unsigned)((n + 15) / 16);
    if (grid > 3) grid = 3;
    if (grid == 0) grid = 1;
    if constexpr (sizeof(T) == 4) {
        emu_launch(grid, 16, sh_backward_f32, n, (int)lmax, (int)normalize, (const float*)xyz.data(),
                   (const float*)grad.data(), (const double*)k.data(), out.data());
    } else {
        emu_launch(grid, 16, sh_backward_f64, n, (int)lmax, (int)normalize,
                   (const double*)xyz.data(), (const double*)grad.data(), (const double*)k.data(),
                   out.data());
    }
    return write_output(out_path, out.data(), (std::size_t)(3 * n));
}

int main(int argc, char** argv) {
    return driver_main<5>(argc, argv, run<float>, run<double>);
}
