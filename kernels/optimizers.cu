// Optimizer updates over the model's one flat parameter buffer: the whole update
// is one launch, each element read and written once. The maths and the order of
// operations are those of gpubackprop/optim.py and the NumPy backend; the host
// precomputes every scalar that does not depend on the element.
#include "common.cuh"

// SGD with momentum mu, dampening tau, Nesterov and L2 weight decay wd:
// d = g + wd p; b = d (first step) or mu b + (1 - tau) d; p -= lr (nesterov ? d + mu b : b).
// lr_mu = lr * mu. buf may be null when mu = 0.
template <typename T>
__global__ void sgd_update(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ buf, long long n,
                           typename Compute<T>::type lr, typename Compute<T>::type momentum,
                           typename Compute<T>::type one_minus_dampening, typename Compute<T>::type weight_decay,
                           typename Compute<T>::type lr_momentum, int nesterov, int first, int dampened) {
    typedef typename Compute<T>::type C;
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
}

// Adam (L2 decay: d = g + wd p) and AdamW (decoupled: p *= 1 - lr wd first):
// m = b1 m + (1 - b1) d, v = b2 v + (1 - b2) d^2,
// p -= step_size * m / (sqrt(v) / sqrt_bc2 + eps),
// step_size = lr / (1 - b1^t), sqrt_bc2 = sqrt(1 - b2^t).
template <typename T>
__global__ void adam_update(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
                            long long n, typename Compute<T>::type beta1, typename Compute<T>::type one_minus_beta1,
                            typename Compute<T>::type beta2, typename Compute<T>::type one_minus_beta2,
                            typename Compute<T>::type eps, typename Compute<T>::type step_size,
                            typename Compute<T>::type sqrt_bc2, typename Compute<T>::type weight_decay,
                            typename Compute<T>::type decay_factor, int decoupled) {
    typedef typename Compute<T>::type C;
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
}
