// Runs CUDA C kernels on the CPU, so CI (which has no GPU) executes the very
// sources of kernels/*.cu that the GPU runs.
//
// A launch runs the grid's blocks one after another; the threads of a block are
// the threads of one OpenMP team, so a block really runs in parallel and
// __syncthreads is a team barrier. The mapping:
//   threadIdx, blockIdx      thread-local, set by host_launch
//   __shared__               a static local: one copy, shared by the team (blocks
//                            run one at a time, so that is one copy per block)
//   __syncthreads()          #pragma omp barrier
//   __shfl_xor/down_sync     each lane posts its value, the warp meets at a
//                            barrier of its 32 threads, each reads its partner's
//   atomicAdd, __threadfence GCC atomics and a full fence
//   __half, __nv_bfloat16    float16 through _Float16; bfloat16 as the top half of
//                            a float, rounded to nearest even as CUDA does
#pragma once
#define GPUBACKPROP_HOST 1
#define GPUBACKPROP_LOW_PRECISION 1

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <omp.h>
#include <pthread.h>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static

using std::max;
using std::min;

struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x, y, z; };

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local unsigned host_lane_id;  // threadIdx flattened, as CUDA forms warps
inline dim3 blockDim, gridDim;

inline void __syncthreads() {
#pragma omp barrier
}

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

inline unsigned atomicAdd(unsigned* address, unsigned value) {
    return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
}

// ---- warps ---------------------------------------------------------------------
inline pthread_barrier_t host_warp_barrier[32];
inline unsigned long long host_warp_slot[1024];

template <typename T> T host_shuffle(T value, unsigned source_lane) {
    static_assert(sizeof(T) <= sizeof(unsigned long long), "shuffle of a type wider than 8 bytes");
    const unsigned warp = host_lane_id / 32;
    std::memcpy(&host_warp_slot[host_lane_id], &value, sizeof(T));
    pthread_barrier_wait(&host_warp_barrier[warp]);  // every lane has posted
    T result;
    std::memcpy(&result, &host_warp_slot[warp * 32 + source_lane], sizeof(T));
    pthread_barrier_wait(&host_warp_barrier[warp]);  // every lane has read before the next post
    return result;
}

template <typename T> T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
    if (mask != 0xffffffffu) std::abort();  // the harness models full warps only
    return host_shuffle(value, (host_lane_id % 32) ^ (unsigned)lane_mask);
}

template <typename T> T __shfl_down_sync(unsigned mask, T value, unsigned delta) {
    if (mask != 0xffffffffu) std::abort();
    const unsigned lane = host_lane_id % 32;
    return host_shuffle(value, lane + delta < 32 ? lane + delta : lane);
}

// ---- storage types ---------------------------------------------------------------
struct __half { _Float16 value; };
inline float __half2float(__half h) { return (float)h.value; }
inline __half __float2half(float f) { return __half{(_Float16)f}; }  // rounds to nearest even

struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t u = (uint32_t)b.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40)};  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}

// ---- launches ----------------------------------------------------------------------
// Runs kernel<<<grid, block>>>(args...) where args[i] points at the i-th argument,
// as for cudaLaunchKernel. Returns 0, or 1 with a message on stderr.
template <typename... A, size_t... I>
int host_launch_unpacked(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
    if (threads == 0 || threads > 1024 || threads % 32 != 0) {
        std::fprintf(stderr, "cuda_host: block of %u threads; the harness needs 32..1024, whole warps\n", threads);
        return 1;
    }
    for (unsigned w = 0; w < threads / 32; ++w) pthread_barrier_init(&host_warp_barrier[w], nullptr, 32);
    int team_size = 0;
    omp_set_dynamic(0);
#pragma omp parallel num_threads(threads)
    {
#pragma omp single
        team_size = omp_get_num_threads();
        if (team_size == (int)threads) {  // else every thread skips the grid, and we report
            const unsigned t = omp_get_thread_num();
            host_lane_id = t;
            threadIdx = {t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
            for (unsigned z = 0; z < gridDim.z; ++z)
                for (unsigned y = 0; y < gridDim.y; ++y)
                    for (unsigned x = 0; x < gridDim.x; ++x) {
                        blockIdx = {x, y, z};
                        kernel(*static_cast<A*>(args[I])...);
#pragma omp barrier
                    }
        }
    }
    for (unsigned w = 0; w < threads / 32; ++w) pthread_barrier_destroy(&host_warp_barrier[w]);
    if (team_size != (int)threads) {
        std::fprintf(stderr, "cuda_host: OpenMP gave %d threads for a block of %u\n", team_size, threads);
        return 1;
    }
    return 0;
}

template <typename... A>
int host_launch(void (*kernel)(A...), const unsigned* grid, const unsigned* block, void** args) {
    gridDim = {grid[0], grid[1], grid[2]};
    blockDim = {block[0], block[1], block[2]};
    return host_launch_unpacked(kernel, args, std::index_sequence_for<A...>{});
}
