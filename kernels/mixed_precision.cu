// Mixed precision: float32 master parameters, 16-bit copies for the GEMMs, and
// dynamic loss scaling for float16 (the scheme of torch.cuda.amp's GradScaler).
//
// One step in float16: the loss kernel scales delta_L by S, so the backward pass
// yields S * gradients (small gradients stay above float16's underflow);
// unscale_and_check multiplies the float32 gradients by 1/S and raises
// *found_inf on any Inf or NaN; the optimizer kernels skip a step that found
// one (the step count does not advance); update_loss_scale halves S after an
// overflow, doubles it after `interval` clean steps, and clears the flag.
// Everything stays on the device, so a captured step replays it all.
#include "common.cuh"

// low = p rounded to the 16-bit type: the GEMMs' copy of the master weights. The
// copy starts each of its `segments` tensors at a multiple of 16 bytes (cuBLAS's
// tensor-core kernels need it; p itself is packed): p's tensor s, from
// starts[s] up to starts[s + 1] (or n), lands shifts[s] elements further on.
// A thread's i only grows, so its segment s only moves forward.
template <typename T>
__global__ void cast_parameters(const float* __restrict__ p, T* __restrict__ low, long long n,
                                const long long* __restrict__ starts, const long long* __restrict__ shifts,
                                int segments) {
    int s = 0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x) {
        while (s + 1 < segments && (long long)i >= starts[s + 1]) ++s;
        st(low + i + shifts[s], p[i]);
    }
}

// g *= 1 / S, and *found_inf = 1 if any element is Inf or NaN (a flag: every
// writer stores the same 1, so the race is benign and the result deterministic).
__global__ void unscale_and_check(float* __restrict__ g, long long n, const float* __restrict__ loss_scale,
                                  unsigned* __restrict__ found_inf) {
    const float inv = 1.0f / *loss_scale;
    bool bad = false;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x) {
        const float v = g[i] * inv;
        bad |= !(v - v == 0.0f);  // Inf - Inf and NaN - NaN are NaN
        g[i] = v;
    }
    if (bad) *found_inf = 1u;
}

// One thread: S and the count of clean steps since S last changed. Launched as one
// warp (the host harness runs whole warps); the others must not repeat the
// read-modify-write.
__global__ void update_loss_scale(float* loss_scale, unsigned* clean_steps, unsigned* found_inf,
                                  float backoff, float growth, unsigned interval) {
    if (threadIdx.x != 0) return;
    if (*found_inf) {
        *loss_scale *= backoff;
        *clean_steps = 0;
    } else if (++*clean_steps == interval) {
        *loss_scale *= growth;
        *clean_steps = 0;
    }
    *found_inf = 0u;
}
