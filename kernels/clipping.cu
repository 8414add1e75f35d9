// Gradient clipping by global norm, as torch.nn.utils.clip_grad_norm_: with
// ||g|| the L2 norm of the whole flat gradient buffer, g *= min(1, max_norm /
// (||g|| + 1e-6)). Two launches (the norm needs every block's sum first), no host
// sync: the sum of squares stays on the device, so a captured step clips too.
#include "common.cuh"

// *sum_sq = sum of g^2, added in a fixed order (last block finishes).
template <typename T>
__global__ void sum_of_squares(const T* __restrict__ g, long long n, typename Compute<T>::type* partials,
                               unsigned* counter, typename Compute<T>::type* sum_sq) {
    typedef typename Compute<T>::type C;
    C acc = C(0);
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x) {
        const C v = ld(g + i);
        acc += v * v;
    }
    sum_over_grid(warp_sum(acc), C(0), partials, counter, sum_sq, C(1), (double*)0, 0);
}

template <typename T>
__global__ void clip_to_norm(T* __restrict__ g, long long n, const typename Compute<T>::type* __restrict__ sum_sq,
                             typename Compute<T>::type max_norm) {
    typedef typename Compute<T>::type C;
    const C coef = max_norm / (c_sqrt(*sum_sq) + C(1e-6));
    if (!(coef < C(1))) return;  // within the norm (NaN norms are left to the overflow check)
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x)
        st(g + i, ld(g + i) * coef);
}
