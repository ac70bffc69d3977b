// Host emulation of the CUDA dialect used by ../*.cu, for testing kernel logic without a GPU
// (crates/equivariant/src/host_kernels.rs compiles a driver such as s2fused_main.cpp with the
// system C++ compiler).
//
// Threads run one after another: block 0 thread 0, block 0 thread 1, … This is exact for the
// kernels where no thread reads what another thread of its block wrote; a kernel that needs
// a barrier cannot run here: `__syncthreads` aborts (so a source file may hold such kernels
// as long as the driver does not launch them), and the warp intrinsics are left undefined.
// It checks the arithmetic, the indexing and the grid-stride loops, not races, occupancy or
// anything about speed.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdlib>

struct EmuDim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline EmuDim3 threadIdx, blockIdx, blockDim, gridDim;

// Dynamic shared memory (`extern __shared__ unsigned char smem_raw[]` in a kernel): one
// block runs at a time, so one buffer serves them all.
alignas(16) inline unsigned char smem_raw[1 << 20];

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__

// A barrier cannot be emulated with threads run one after another.
inline void __syncthreads() {
    std::fprintf(stderr, "emu.h: this kernel needs __syncthreads, which the host emulation lacks\n");
    std::abort();
}

using std::exp;
using std::fabs;
using std::log1p;
using std::sqrt;

// Runs `kernel(args...)` for every thread of a `grid × block` launch (x dimension only).
template <typename F, typename... Args>
void emu_launch(unsigned grid, unsigned block, F kernel, Args... args) {
    gridDim.x = grid;
    blockDim.x = block;
    for (unsigned b = 0; b < grid; ++b) {
        blockIdx.x = b;
        for (unsigned t = 0; t < block; ++t) {
            threadIdx.x = t;
            kernel(args...);
        }
    }
}
