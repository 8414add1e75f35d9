// What every kernel file shares: the compute type of each storage type, loads and
// stores through it, the activations g and g', and fixed-order reductions.
//
// The same text is compiled three ways: by NVRTC (the CUDA backend, through
// gpubackprop/backend/nvrtc.py; CI compiles it so too), by nvcc (CI's compile
// check for sm_80 / sm_90, registers and spills), and by g++ as
// plain C++ with tests/kernels/cuda_host.h standing in for the CUDA runtime (CI's
// host harness), where cuda_host.h defines GPUBACKPROP_HOST and stands in for
// the CUDA headers.
//
// float16 / bfloat16 need cuda_fp16.h / cuda_bf16.h, which NVRTC finds only where
// the CUDA toolkit headers are installed (cupy-cuda13x[ctk]); so they are compiled
// only with GPUBACKPROP_LOW_PRECISION, into modules of their own, and a missing
// header can never stop float32 / float64 training.
#pragma once
#if defined(GPUBACKPROP_LOW_PRECISION) && !defined(GPUBACKPROP_HOST)
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif

// float16 and bfloat16 are storage types: their arithmetic runs in float.
template <typename T> struct Compute { typedef float type; };
template <> struct Compute<double> { typedef double type; };

__device__ __forceinline__ float ld(const float* p) { return *p; }
__device__ __forceinline__ double ld(const double* p) { return *p; }
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(double* p, double v) { *p = v; }
#ifdef GPUBACKPROP_LOW_PRECISION
__device__ __forceinline__ float ld(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float ld(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void st(__half* p, float v) { *p = __float2half(v); }
__device__ __forceinline__ void st(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }
#endif

// Overloads by precision, so templates never call a double function on floats.
__device__ __forceinline__ float c_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double c_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float c_exp(float x) { return expf(x); }
__device__ __forceinline__ double c_exp(double x) { return exp(x); }
__device__ __forceinline__ float c_log(float x) { return logf(x); }
__device__ __forceinline__ double c_log(double x) { return log(x); }
__device__ __forceinline__ float c_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double c_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float c_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double c_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float c_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double c_abs(double x) { return fabs(x); }

// ---- activations (the table, maths and codes are in gpubackprop/nn/activations.py;
// tests/nn/test_activations.py holds this enum and these constants to it) ------------
enum { ACT_IDENTITY = 0, ACT_RELU = 1, ACT_LEAKY_RELU = 2, ACT_TANH = 3, ACT_SIGMOID = 4, ACT_GELU = 5, ACT_SILU = 6 };
#define LEAKY_SLOPE 0.01
#define GELU_C 0.7978845608028654  // sqrt(2 / pi)
#define GELU_K 0.044715

// t = tanh(c z (1 + k z^2)), in the NumPy backend's order of operations.
template <typename C> __device__ __forceinline__ C gelu_t(C z) {
    return c_tanh((((z * z) * C(GELU_K) + C(1)) * z) * C(GELU_C));
}

// Whether g' needs z as well as a (g is not invertible): then the forward pass keeps z.
template <int ACT> __device__ __forceinline__ constexpr bool act_needs_z() { return ACT == ACT_GELU || ACT == ACT_SILU; }

// a = g(z). NaN stays NaN (as NumPy's maximum), so a diverging run is not masked.
template <int ACT, typename C> __device__ __forceinline__ C act_forward(C z) {
    if (ACT == ACT_RELU) return z < C(0) ? C(0) : z;
    if (ACT == ACT_LEAKY_RELU) return z < C(0) ? z * C(LEAKY_SLOPE) : z;
    if (ACT == ACT_TANH) return c_tanh(z);
    if (ACT == ACT_SIGMOID) return c_tanh(z * C(0.5)) * C(0.5) + C(0.5);  // no exp: no overflow
    if (ACT == ACT_GELU) return (gelu_t(z) + C(1)) * z * C(0.5);
    if (ACT == ACT_SILU) return (c_tanh(z * C(0.5)) * C(0.5) + C(0.5)) * z;
    return z;
}

// g'(.) from the activation a (and z, where act_needs_z).
template <int ACT, typename C> __device__ __forceinline__ C act_grad(C a, C z) {
    if (ACT == ACT_RELU) return a > C(0) ? C(1) : C(0);
    if (ACT == ACT_LEAKY_RELU) return a > C(0) ? C(1) : C(LEAKY_SLOPE);
    if (ACT == ACT_TANH) return C(1) - a * a;
    if (ACT == ACT_SIGMOID) return (C(1) - a) * a;
    if (ACT == ACT_GELU) {
        C s = C(1) - gelu_t(z);
        C r = ((z * z) * C(3 * GELU_K) + C(1)) * z * C(0.5 * GELU_C);
        return (r * s + C(0.5)) * (C(2) - s);
    }
    if (ACT == ACT_SILU) {
        C s = c_tanh(z * C(0.5)) * C(0.5) + C(0.5);
        return ((C(1) - s) * z + C(1)) * s;
    }
    return C(1);
}

// ---- dropout ---------------------------------------------------------------------
// Whether element i of a hidden layer is kept in a step: a counter-based hash of
// (seed, step, layer, i), so the backward pass regenerates the forward pass's
// mask instead of storing it, a captured step draws a new mask on every replay
// (step is read from the device), and the NumPy backend (gpubackprop/nn/dropout.py)
// draws the very same masks. Kept with probability 1 - threshold / 2^32.
// i counts from the global batch's first element: a rank of data-parallel
// training adds its shard's offset, so ranks draw one process's masks.
__device__ __forceinline__ unsigned mix32(unsigned x) {  // "lowbias32", a full-avalanche 32-bit mixer
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

__device__ __forceinline__ bool dropout_keep(unsigned seed, unsigned step, unsigned layer, size_t i, unsigned threshold) {
    const unsigned key = mix32(layer ^ mix32(step ^ mix32(seed)));
    return mix32((unsigned)i ^ mix32((unsigned)(i >> 32) ^ key)) >= threshold;
}

// ---- fixed-order reductions ----------------------------------------------------
// Sums are formed in an order fixed by the launch shape alone (no float atomics),
// so a result is the same bits on every run: the bias gradient and the loss are
// deterministic.

// Every lane ends with the sum over the warp (addition is commutative, so the
// butterfly gives all lanes the same bits).
template <typename C> __device__ __forceinline__ C warp_sum(C v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Called by a block after it stored its partial result and before it returns:
// true in the one block that arrives last (of `expected` blocks counted on
// *counter), which may then read every block's partial. It resets the counter,
// so the counters stay zero between launches.
__device__ __forceinline__ bool arrived_last(unsigned* counter, unsigned expected) {
    __shared__ bool last;
    __threadfence();  // this block's partials are visible before it is counted
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        last = atomicAdd(counter, 1u) == expected - 1;
        if (last) *counter = 0;
    }
    __syncthreads();
    return last;
}

// Adds (a, b) over the block's warps, one value per warp (held by every lane), in
// warp order; the totals are valid in thread 0. Blocks hold whole warps.
template <typename C> __device__ __forceinline__ void sum_warps(C& a, C& b) {
    __shared__ C per_warp[2][32];
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads();  // a previous call's reads of per_warp are done
    if (lane == 0) {
        per_warp[0][warp] = a;
        per_warp[1][warp] = b;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        a = b = C(0);
        for (unsigned w = 0; w < warps; ++w) {
            a += per_warp[0][w];
            b += per_warp[1][w];
        }
    }
}

// Two sums over a 1-D grid, each of one value per warp (every lane of a warp
// holds it); the last block stores *out = a_total * scale and, when running is
// given, adds to the running totals: running[0] += *out * count (as rounded to
// T, the same bits the caller sees; count: the rows, or their weights' sum) and
// running[1] += b_total. partials holds 2 * gridDim.x values.
template <typename C, typename T>
__device__ void sum_over_grid(C a, C b, C* partials, unsigned* counter, T* out, C scale, double* running,
                              double count) {
    sum_warps(a, b);
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = a;
        partials[gridDim.x + blockIdx.x] = b;
    }
    if (!arrived_last(counter, gridDim.x)) return;
    const volatile C* done = partials;  // written by other blocks: not from a stale cache
    C sa = C(0), sb = C(0);
    for (unsigned i = threadIdx.x; i < gridDim.x; i += blockDim.x) {
        sa += done[i];
        sb += done[gridDim.x + i];
    }
    sa = warp_sum(sa);
    sb = warp_sum(sb);
    sum_warps(sa, sb);
    if (threadIdx.x == 0) {
        st(out, sa * scale);
        if (running) {
            running[0] += (double)ld(out) * count;
            running[1] += (double)sb;
        }
    }
}
