// cuda_on_cpu.h - just enough of CUDA to run the kernels of kernels/ on the host, for tests.
//
// Include this, then a .cu file, with -DSIPL_CUDA_ON_CPU -std=c++20 -pthread. A launch runs
// the grid's blocks one after another; the threads of a block are real threads (so
// __syncthreads is a real barrier and shared memory is shared: each __shared__ array is a
// static, one block at a time). Wrong indexing, races across a barrier, halo or bounds
// mistakes show up as wrong numbers; speed and warp-level behaviour are not emulated.
#pragma once
#include <barrier>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

#define __device__
#define __global__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx;
inline dim3 blockIdx, gridDim, blockDim;
inline std::barrier<>* block_barrier = nullptr;

inline void __syncthreads() { block_barrier->arrive_and_wait(); }
inline float __uint_as_float(unsigned u) { return __builtin_bit_cast(float, u); }
inline unsigned __float_as_uint(float f) { return __builtin_bit_cast(unsigned, f); }

// kernel<<<grid, block>>>(args...) for a 1-D grid and a 2-D block.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), unsigned grid, dim3 block, Args... args) {
  const unsigned threads = block.x * block.y * block.z;
  gridDim = dim3{grid, 1, 1};
  blockDim = block;
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx = dim3{b, 0, 0};
    std::barrier<> barrier(threads);
    block_barrier = &barrier;
    std::vector<std::thread> team;
    for (unsigned t = 0; t < threads; ++t)
      team.emplace_back([=] {
        threadIdx = dim3{t % block.x, t / block.x % block.y, t / (block.x * block.y)};
        kernel(args...);
      });
    for (auto& th : team) th.join();
  }
}
