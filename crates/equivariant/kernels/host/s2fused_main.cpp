// Driver of the host test of s2fused.cu (src/s2grid.rs): reads one launch from the
// file argv[1], runs it under emu.h, writes the output to argv[2].
//
// Input, little-endian: ten i64 — bytes per float (4 or 8), mode (0 forward, 1 backward),
// n, c, k, b, a, j, skip, threads per block — then x [n·k·c], the second operand (scalars
// [n·c] for a forward with skip = 1, dy [n·k·c] for a backward, nothing otherwise), u_to
// [b·k], u_from [b·k], v [a·j] as floats, order [k] and offsets [j + 1] as i32.
// Output: [n·k·c] floats.
#include "emu.h"
#include "driver.h"
#include "s2fused.cu"

#include <vector>

// The kernel of `mode` (0 forward, 1 backward) for J = j α profiles, or null.
#define S2_SELECT(NJ, SUFFIX)                                                                 \
    if (j == NJ) return mode == 0 ? s2_fused_forward_j##NJ##_##SUFFIX : s2_fused_backward_j##NJ##_##SUFFIX;
template <typename T>
static auto select(long long mode, long long j) -> void (*)(long long, int, int, int, int, int,
                                                             const T*, const T*, const T*,
                                                             const T*, const T*, const int*,
                                                             const int*, T*) {
    if constexpr (sizeof(T) == 4) {
        S2_SELECT(1, f32) S2_SELECT(3, f32) S2_SELECT(5, f32) S2_SELECT(7, f32)
        S2_SELECT(9, f32) S2_SELECT(11, f32) S2_SELECT(13, f32)
    } else {
        S2_SELECT(1, f64) S2_SELECT(3, f64) S2_SELECT(5, f64) S2_SELECT(7, f64)
        S2_SELECT(9, f64) S2_SELECT(11, f64) S2_SELECT(13, f64)
    }
    return nullptr;
}

template <typename T> static int run(const std::int64_t* h, const char* out_path) {
    const long long mode = h[1], n = h[2], c = h[3], k = h[4], b = h[5], a = h[6], j = h[7],
                    skip = h[8], block = h[9];
    const std::size_t rows = (std::size_t)(n * k * c);
    auto x = read<T>(rows);
    std::size_t second = mode == 1 ? rows : (skip ? (std::size_t)(n * c) : 0);
    auto aux = read<T>(second);
    auto u_to = read<T>((std::size_t)(b * k));
    auto u_from = read<T>((std::size_t)(b * k));
    auto v = read<T>((std::size_t)(a * j));
    auto order = read<int>((std::size_t)k);
    auto offsets = read<int>((std::size_t)(j + 1));
    std::vector<T> out(rows ? rows : 1, T(-12345));
    const long long items = n * c;
    // At most three blocks, so that the grid-stride loop runs several rounds.
    unsigned grid = (unsigned)((items + block - 1) / block);
    if (grid > 3) grid = 3;
    if (grid == 0) grid = 1;
    using Kernel = void (*)(long long, int, int, int, int, int, const T*, const T*, const T*,
                            const T*, const T*, const int*, const int*, T*);
    Kernel kernel = select<T>(mode, j);
    if (!kernel) {
        std::fprintf(stderr, "no kernel for J = %lld\n", j);
        return 2;
    }
    emu_launch(grid, (unsigned)block, kernel, items, (int)c, (int)k, (int)b, (int)a, (int)skip,
               (const T*)x.data(), (const T*)aux.data(), (const T*)u_to.data(),
               (const T*)u_from.data(), (const T*)v.data(), (const int*)order.data(),
               (const int*)offsets.data(), out.data());
    return write_output(out_path, out.data(), rows);
}

int main(int argc, char** argv) {
    return driver_main<10>(argc, argv, run<float>, run<double>);
}
