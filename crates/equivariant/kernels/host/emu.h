// Host emulation of the CUDA dialect used by ../*.cu, for testing kernel logic without a GPU.
// crates/equivariant/src/host_kernels.rs copies the kernel sources next to this header with
// two rewrites (`extern __shared__ T name[];` becomes a pointer to the block's dynamic shared
// buffer, any other `__shared__` becomes `static`) and compiles a driver such as
// s2fused_main.cpp with the system C++ compiler.
//
// Blocks run one after another; the threads of a block run concurrently, one std::thread
// each, so `__syncthreads` (a barrier over the block), `__syncwarp` and `__shfl_xor_sync` (an
// exchange over the warp's 32 lanes, or fewer in a partial last warp) behave as on the
// device, and so does shared memory (one buffer and one copy of every `static` shared array,
// used by one block at a time). A thread that returns leaves both barriers, as exited threads
// do on the GPU. This checks the arithmetic, the indexing, the grid-stride loops and the
// barrier logic of a kernel, not its speed, and it finds a data race only if the race changes
// a result here.
#pragma once

#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct EmuDim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline thread_local EmuDim3 threadIdx, blockIdx;
inline EmuDim3 blockDim, gridDim;

// The dynamic shared memory of the running block.
alignas(16) inline unsigned char emu_shared_buffer[1 << 20];

#define EMU_DYNAMIC_SHARED(TYPE, NAME) TYPE* NAME = reinterpret_cast<TYPE*>(emu_shared_buffer)

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

// One warp's exchange slots and barrier.
struct EmuWarp {
    explicit EmuWarp(std::ptrdiff_t lanes) : bar(lanes) {}
    std::barrier<> bar;
    unsigned char slots[32][16];
};

inline thread_local std::barrier<>* emu_block_barrier = nullptr;
inline thread_local EmuWarp* emu_warp = nullptr;

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }

// A barrier over the warp (all lanes; the kernels call it with the full mask).
inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp->bar.arrive_and_wait(); }

// Lane l receives the value of lane l ^ mask (every lane of the warp must call it).
template <typename T> T __shfl_xor_sync(unsigned, T value, int lane_mask) {
    static_assert(sizeof(T) <= 16, "emu.h: shuffles of at most 16 bytes");
    EmuWarp& w = *emu_warp;
    const unsigned lane = threadIdx.x % 32;
    std::memcpy(w.slots[lane], &value, sizeof(T));
    w.bar.arrive_and_wait();
    T out;
    std::memcpy(&out, w.slots[lane ^ (unsigned)lane_mask], sizeof(T));
    w.bar.arrive_and_wait();
    return out;
}

// Atomics on the host: one lock for all (the emulation is about results, not speed).
#include <mutex>
inline std::mutex emu_atomic_lock;

inline int atomicMin(int* address, int value) {
    std::lock_guard<std::mutex> guard(emu_atomic_lock);
    const int old = *address;
    if (value < old) *address = value;
    return old;
}

// The fast single-precision intrinsics as the hardware computes them, up to the last ulp of
// ex2.approx: e^x as 2^(x·log₂e) with the product rounded to float first (the main error
// for large |x|), a correctly rounded reciprocal.
inline float __expf(float x) { return std::exp2(x * 1.44269504088896341f); }
inline float __frcp_rn(float x) { return 1.0f / x; }

using std::exp;
using std::fabs;
using std::isfinite;
using std::log1p;
using std::sqrt;

// Runs `kernel(args...)` for every thread of a `(grid_x, grid_y) × block` launch.
template <typename F, typename... Args>
void emu_launch_2d(unsigned grid_x, unsigned grid_y, unsigned block, F kernel, Args... args) {
    gridDim.x = grid_x;
    gridDim.y = grid_y;
    blockDim.x = block;
    for (unsigned by = 0; by < grid_y; ++by) {
        for (unsigned bx = 0; bx < grid_x; ++bx) {
            std::barrier<> block_bar((std::ptrdiff_t)block);
            std::vector<std::unique_ptr<EmuWarp>> warps;
            for (unsigned w = 0; w * 32 < block; ++w) {
                const unsigned lanes = block - w * 32 < 32 ? block - w * 32 : 32;
                warps.push_back(std::make_unique<EmuWarp>((std::ptrdiff_t)lanes));
            }
            std::vector<std::thread> threads;
            threads.reserve(block);
            for (unsigned t = 0; t < block; ++t) {
                threads.emplace_back([&, t] {
                    threadIdx.x = t;
                    blockIdx.x = bx;
                    blockIdx.y = by;
                    emu_block_barrier = &block_bar;
                    emu_warp = warps[t / 32].get();
                    kernel(args...);
                    block_bar.arrive_and_drop();
                    emu_warp->bar.arrive_and_drop();
                });
            }
            for (auto& th : threads) th.join();
        }
    }
}

// Runs `kernel(args...)` for every thread of a `grid × block` launch (x dimension only).
template <typename F, typename... Args>
void emu_launch(unsigned grid, unsigned block, F kernel, Args... args) {
    emu_launch_2d(grid, 1, block, kernel, args...);
}
