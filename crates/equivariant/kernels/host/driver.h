// What every host-test driver of this folder shares: reading its one launch from a file,
// writing the output, and `main`. A driver defines `template <typename T> int run(const
// std::int64_t* header, const char* out_path)` and calls `driver_main<HEADER>(argc, argv,
// run<float>, run<double>)`; header[0] is the bytes per float (4 or 8).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

inline std::FILE* driver_input = nullptr;

// The next `n` values of type T from the input (at least one element, so .data() is valid).
template <typename T> std::vector<T> read(std::size_t n) {
    std::vector<T> v(n ? n : 1);
    if (n && std::fread(v.data(), sizeof(T), n, driver_input) != n) {
        std::fprintf(stderr, "short input\n");
        std::exit(2);
    }
    return v;
}

// Writes the first `count` values of `data` to `path`; 0, or 2 with a message.
template <typename T> int write_output(const char* path, const T* data, std::size_t count) {
    std::FILE* f = std::fopen(path, "wb");
    if (!f || std::fwrite(data, sizeof(T), count, f) != count || std::fclose(f) != 0) {
        std::fprintf(stderr, "cannot write %s\n", path);
        return 2;
    }
    return 0;
}

// `main` of a driver: `prog INPUT OUTPUT`, HEADER i64 first, then `run` for f32 or f64.
template <int HEADER, typename F32, typename F64>
int driver_main(int argc, char** argv, F32 run_f32, F64 run_f64) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: %s INPUT OUTPUT\n", argv[0]);
        return 2;
    }
    driver_input = std::fopen(argv[1], "rb");
    if (!driver_input) {
        std::fprintf(stderr, "cannot read %s\n", argv[1]);
        return 2;
    }
    std::int64_t h[HEADER];
    if (std::fread(h, sizeof(h[0]), HEADER, driver_input) != (std::size_t)HEADER) {
        std::fprintf(stderr, "short header\n");
        return 2;
    }
    return h[0] == 4 ? run_f32(h, argv[2]) : run_f64(h, argv[2]);
}
