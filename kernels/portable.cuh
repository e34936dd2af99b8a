// Lets one CUDA source build three ways: nvcc, NVRTC (run-time compilation on the GPU machine) and g++ (the CPU
// emulation the tests use). Under nvcc/NVRTC this header adds only a 64-bit index type and a launch macro; under
// g++ it supplies the few CUDA built-ins the kernels use, with every CUDA thread run in turn on the CPU.
#pragma once

typedef long long i64;  // <cstdint> does not exist under NVRTC

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)  // ---------------------------------------- nvcc and NVRTC

#define MMI_LAUNCH(kernel, grid, block, stream, ...) \
    kernel<<<(grid), (block), 0, (cudaStream_t)(stream)>>>(__VA_ARGS__)
#define MMI_LAST_ERROR() ((int)cudaGetLastError())

#else  // ------------------------------------------------------------------------------------------- g++ emulation

#include <atomic>
#include <math.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct dim3 { unsigned x = 1, y = 1, z = 1; };
// Each emulated CUDA thread sees its own coordinates; thread_local keeps OpenMP workers apart.
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

// Several emulated threads (on different OpenMP workers) may add to one gradient element, as on the GPU.
template <typename T>
inline T atomicAdd(T* address, T v) { return std::atomic_ref<T>(*address).fetch_add(v, std::memory_order_relaxed); }

// A 1-D launch: blocks are spread over OpenMP workers (when built with -fopenmp), threads of a block run in order.
// Only kernels whose threads never wait for each other (no __syncthreads, no shared memory) can run this way.
// Small launches stay on the calling thread: waking (and then spinning) workers costs far more than they save.
template <typename F>
void mmi_launch(unsigned grid, unsigned block, F&& kernel) {
#pragma omp parallel for schedule(dynamic, 1) if (grid > 1 && (long long)grid * block >= 1024)
    for (long long b = 0; b < (long long)grid; ++b) {
        gridDim.x = grid; blockDim.x = block; blockIdx.x = (unsigned)b;
        for (unsigned t = 0; t < block; ++t) { threadIdx.x = t; kernel(); }
    }
}

#define MMI_LAUNCH(kernel, grid, block, stream, ...) \
    ((void)(stream), mmi_launch((grid), (block), [&] { kernel(__VA_ARGS__); }))
#define MMI_LAST_ERROR() 0

#endif
