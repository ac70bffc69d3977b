// Driver of the host test of wigner.cu (src/frames.rs): reads one launch from argv[1], runs
// it under emu.h as src/cuda/wigner.rs launches it — mode 0: `edge_wigner`, one block of 128
// threads per edge (here at most three blocks, so that the edge-stride loop runs several
// rounds); mode 1: `edge_wigner_tables` then `edge_wigner_entries` — and writes the blocks and
// the first degenerate edge to argv[2].
//
// Input, little-endian: five i64 — bytes per float (4 or 8), edges, lmax, has_helpers, mode — then
// edge_vec [E·3] as floats, helpers [E·3] as f64 (when has_helpers) and the J blocks
// [wlen] as f64, wlen = Σ_{l ≤ lmax} (2l + 1)². Output: [E·wlen] floats, then one i32 (the
// smallest degenerate edge index, E if none).
#include "emu.h"
#include "driver.h"
#include "wigner.cu"

#include <vector>

// Threads per block 16 and at most three blocks: the grid-stride loops run several rounds.
static unsigned blocks_for(long long total) {
    long long g = (total + 15) / 16;
    return (unsigned)(g > 3 ? 3 : (g < 1 ? 1 : g));
}

template <typename T> static int run(const std::int64_t* h, const char* out_path) {
    const long long edges = h[1], lmax = h[2], has = h[3], mode = h[4];
    long long wlen = 0;
    for (long long l = 0; l <= lmax; ++l) wlen += (2 * l + 1) * (2 * l + 1);
    auto ev = read<T>((std::size_t)(3 * edges));
    auto helpers = read<double>(has ? (std::size_t)(3 * edges) : 0);
    auto j = read<double>((std::size_t)wlen);
    std::vector<double> tables((std::size_t)(edges * 3 * (lmax + 1) * 2) + 1, -7.0);
    std::vector<int> ok((std::size_t)edges + 1, -1);
    int bad = (int)edges;
    std::vector<T> out((std::size_t)(edges * wlen) + 1, T(-12345));
    const long long total = edges * wlen;
    if (mode == 0) {
        // src/cuda/wigner.rs THREADS_PER_EDGE.
        const unsigned grid = (unsigned)(edges < 3 ? (edges < 1 ? 1 : edges) : 3);
        emu_launch(grid, 128, edge_wigner_impl<T>, edges, (int)lmax, (int)wlen,
                   (const T*)ev.data(), (const double*)helpers.data(), (int)has,
                   (const double*)j.data(), out.data(), &bad);
    } else if constexpr (sizeof(T) == 4) {
        emu_launch(blocks_for(edges), 16, edge_wigner_tables_f32, edges, (int)lmax,
                   (const float*)ev.data(), (const double*)helpers.data(), (int)has, tables.data(),
                   ok.data(), &bad);
        emu_launch(blocks_for(total), 16, edge_wigner_entries_f32, total, (int)lmax, (int)wlen,
                   (const double*)tables.data(), (const int*)ok.data(), (const double*)j.data(),
                   out.data());
    } else {
        emu_launch(blocks_for(edges), 16, edge_wigner_tables_f64, edges, (int)lmax,
                   (const double*)ev.data(), (const double*)helpers.data(), (int)has,
                   tables.data(), ok.data(), &bad);
        emu_launch(blocks_for(total), 16, edge_wigner_entries_f64, total, (int)lmax, (int)wlen,
                   (const double*)tables.data(), (const int*)ok.data(), (const double*)j.data(),
                   out.data());
    }
    std::FILE* f = std::fopen(out_path, "wb");
    const std::size_t count = (std::size_t)total;
    if (!f || std::fwrite(out.data(), sizeof(T), count, f) != count ||
        std::fwrite(&bad, sizeof(bad), 1, f) != 1 || std::fclose(f) != 0) {
        std::fprintf(stderr, "cannot write %s\n", out_path);
        return 2;
    }
    return 0;
}

int main(int argc, char** argv) {
    return driver_main<5>(argc, argv, run<float>, run<double>);
}
