// Dense forward epilogue: a = g(z + b) on the GEMM output z = a_prev W^T.
//
// One pass over the (rows, cols) output: z is read once, a written once (and z + b
// written back only where g' needs z). a may be z itself.
// Block (bx, by): threadIdx.x walks columns, so a warp reads consecutive
// addresses and each thread loads its bias once per column it owns.
//
// With dropout (training, steps not null) the same pass also writes the next
// layer's input, dropped = a * keep / (1 - p), keep drawn by dropout_keep; a stays
// undropped for g'(a) in the backward pass.
#include "common.cuh"

template <typename T, int ACT>
__global__ void bias_act_forward(T* z, const T* __restrict__ b, T* a, int rows, int cols, T* __restrict__ dropped,
                                 unsigned threshold, typename Compute<T>::type keep_scale, unsigned seed,
                                 const unsigned* __restrict__ steps, unsigned layer, unsigned long long offset) {
    typedef typename Compute<T>::type C;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) {
        const C bias = ld(b + c);
        for (int r = blockIdx.y * blockDim.y + threadIdx.y; r < rows; r += gridDim.y * blockDim.y) {
            const size_t i = (size_t)r * cols + c;
            const C zi = ld(z + i) + bias;
            if (act_needs_z<ACT>()) st(z + i, zi);
            const C ai = act_forward<ACT>(zi);
            st(a + i, ai);
            if (steps) st(dropped + i, dropout_keep(seed, *steps, layer, offset + i, threshold) ? ai * keep_scale : C(0));
        }
    }
}
