// The divergence guard: a step whose gradients hold Inf or NaN is found on the
// device, its update skipped (the optimizer kernels read the flag, as for fp16
// overflow), and counted, with the first bad step noted, for the host to read at
// its next sync (every 16 steps and at each epoch's end): no sync per step, and
// the parameters never take a non-finite update.
#include "common.cuh"

// *flag = 1 if any element of g is Inf or NaN (every writer stores the same 1).
template <typename T>
__global__ void flag_nonfinite(const T* __restrict__ g, long long n, unsigned* __restrict__ flag) {
    typedef typename Compute<T>::type C;
    bool bad = false;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x) {
        const C v = ld(g + i);
        bad |= !(v - v == C(0));  // Inf - Inf and NaN - NaN are NaN
    }
    if (bad) *flag = 1u;
}

// One thread, after the update: count a flagged step, note the first one (the
// optimizer's step count when it happened), clear the flag. Launched as one warp,
// like update_loss_scale.
__global__ void count_nonfinite(unsigned* flag, unsigned* count, unsigned* first_bad, const unsigned* steps) {
    if (threadIdx.x != 0) return;
    if (*flag) {
        if (*count == 0u) *first_bad = *steps;
        *count += 1u;
    }
    *flag = 0u;
}
