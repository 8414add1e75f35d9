// Optimizer updates over the model's one flat parameter buffer: the whole update
// is one launch, each element read and written once. The maths and the order of
// operations are those of gpubackprop/optim/sgd.py, adam.py and the NumPy backend.
//
// The step count t lives on the device (*steps: steps done so far): the update
// reads it, and the last block to finish stores t. So a launch captured once in
// a CUDA graph stays right on every replay, Adam's bias corrections included.
// Those are formed in double from double hyperparameters, as the host forms
// them, then rounded to the compute type.
#include "common.cuh"

// found_inf (null unless float16 loss scaling is on) set: the step is skipped
// whole, the step count included.

// Every block reads *steps before any block can arrive last and store t.
__device__ __forceinline__ void count_step(unsigned* steps, unsigned t, unsigned* arrivals) {
    if (arrived_last(arrivals, gridDim.x) && threadIdx.x == 0) *steps = t;
}

// SGD with momentum mu, dampening tau, Nesterov and L2 weight decay wd:
// d = g + wd p; b = d (first step) or mu b + (1 - tau) d; p -= lr (nesterov ? d + mu b : b).
// lr_mu = lr * mu. buf is unused when mu = 0.
template <typename T>
__global__ void sgd_update(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ buf, long long n,
                           typename Compute<T>::type lr, typename Compute<T>::type momentum,
                           typename Compute<T>::type one_minus_dampening, typename Compute<T>::type weight_decay,
                           typename Compute<T>::type lr_momentum, int nesterov, int dampened,
                           unsigned* steps, unsigned* arrivals, const unsigned* found_inf) {
    typedef typename Compute<T>::type C;
    if (found_inf && *found_inf) return;
    const unsigned t = *steps + 1;
    const bool first = t == 1;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x) {
        C pi = ld(p + i);
        C d = ld(g + i);
        if (weight_decay != C(0)) d = pi * weight_decay + d;
        if (momentum != C(0)) {
            C b = d;
            if (!first) b = ld(buf + i) * momentum + (dampened ? d * one_minus_dampening : d);
            st(buf + i, b);
            if (nesterov) {
                pi = pi - d * lr;
                pi = pi - b * lr_momentum;
            } else {
                pi = pi - b * lr;
            }
        } else {
            pi = pi - d * lr;
        }
        st(p + i, pi);
    }
    count_step(steps, t, arrivals);
}

// Adam (L2 decay: d = g + wd p) and AdamW (decoupled: p *= 1 - lr wd first):
// m = b1 m + (1 - b1) d, v = b2 v + (1 - b2) d^2,
// p -= step_size * m / (sqrt(v) / sqrt_bc2 + eps),
// step_size = lr / (1 - b1^t), sqrt_bc2 = sqrt(1 - b2^t).
template <typename T>
__global__ void adam_update(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
                            long long n, double lr, double beta1_d, double beta2_d,
                            typename Compute<T>::type one_minus_beta1, typename Compute<T>::type one_minus_beta2,
                            typename Compute<T>::type eps, typename Compute<T>::type weight_decay,
                            typename Compute<T>::type decay_factor, int decoupled,
                            unsigned* steps, unsigned* arrivals, const unsigned* found_inf) {
    typedef typename Compute<T>::type C;
    if (found_inf && *found_inf) return;
    const unsigned t = *steps + 1;
    const C beta1 = C(beta1_d), beta2 = C(beta2_d);
    const C step_size = C(lr / (1.0 - pow(beta1_d, (double)t)));
    const C sqrt_bc2 = C(sqrt(1.0 - pow(beta2_d, (double)t)));
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x) {
        C pi = ld(p + i);
        C d = ld(g + i);
        if (weight_decay != C(0)) {
            if (decoupled) pi = pi * decay_factor;
            else d = pi * weight_decay + d;
        }
        const C mi = ld(m + i) * beta1 + d * one_minus_beta1;
        const C vi = ld(v + i) * beta2 + (d * d) * one_minus_beta2;
        st(m + i, mi);
        st(v + i, vi);
        pi = pi - (mi / (c_sqrt(vi) / sqrt_bc2 + eps)) * step_size;
        st(p + i, pi);
    }
    count_step(steps, t, arrivals);
}

// out = y + a x over n elements: a layer's weight gradient with the L2 term a W, or
// (a = 0) its bias gradient as it is, into the buffer the update reads, so that the
// biases are spared and the model's own gradients stay as backprop left them
// (Optimizer.step, decay_biases=False).
template <typename T>
__global__ void add_scaled(T* __restrict__ out, const T* __restrict__ y, const T* __restrict__ x, long long n,
                           typename Compute<T>::type a) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x)
        st(out + i, ld(y + i) + a * ld(x + i));
}
