// Dense backward: delta = g * g'(a) in place, fused with db = sum of delta over
// the batch (a column reduction), in one launch.
//
// g and a are read once and delta is written once (not at all for the identity,
// where delta = g). Block (32, 8) owns 32 columns and a slice of the rows: lane x
// takes a column, the 8 rows of threads stride down the slice, and the block
// adds its 8 row sums in order. With one slice (gridDim.y == 1) that is db;
// with several, each block stores its column sums in partials[slice][col] and
// the last block of a column tile to finish adds the slices in order. No float
// atomics anywhere: db is the same bits on every run. db is in the compute type
// (float for 16-bit storage: the gradients of mixed precision are float32).
//
// With dropout (steps not null) g is the gradient of the dropped activations:
// it first passes the forward pass's mask (regenerated, see dropout_keep) and
// scale, then g'(a) of the undropped a.
#include "common.cuh"

template <typename T, int ACT>
__global__ void act_backward_bias_grad(T* g, const T* __restrict__ a, const T* __restrict__ z,
                                       typename Compute<T>::type* __restrict__ db, typename Compute<T>::type* partials,
                                       unsigned* counters, int rows, int cols, int rows_per_slice,
                                       unsigned threshold, typename Compute<T>::type keep_scale, unsigned seed,
                                       const unsigned* __restrict__ steps, unsigned layer,
                                       unsigned long long offset) {
    typedef typename Compute<T>::type C;
    __shared__ C column_sums[8][33];  // 33: no bank conflicts when read down a column
    const int c = blockIdx.x * 32 + threadIdx.x;
    const int first = blockIdx.y * rows_per_slice;
    const int last = min(first + rows_per_slice, rows);
    C acc = C(0);
    if (c < cols) {
        for (int r = first + (int)threadIdx.y; r < last; r += 8) {
            const size_t i = (size_t)r * cols + c;
            C delta = ld(g + i);
            if (steps) delta = dropout_keep(seed, *steps, layer, offset + i, threshold) ? delta * keep_scale : C(0);
            if (ACT != ACT_IDENTITY || steps) {
                delta *= act_grad<ACT>(ld(a + i), act_needs_z<ACT>() ? ld(z + i) : C(0));
                st(g + i, delta);
            }
            acc += delta;
        }
    }
    column_sums[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    C sum = C(0);
    if (threadIdx.y == 0) {
        for (int k = 0; k < 8; ++k) sum += column_sums[k][threadIdx.x];
        if (gridDim.y == 1) {
            if (c < cols) st(db + c, sum);
        } else if (c < cols) {
            partials[(size_t)blockIdx.y * cols + c] = sum;
        }
    }
    if (gridDim.y == 1 || !arrived_last(counters + blockIdx.x, gridDim.y)) return;
    if (threadIdx.y == 0 && c < cols) {
        const volatile C* done = partials;
        C total = C(0);
        for (unsigned s = 0; s < gridDim.y; ++s) total += done[(size_t)s * cols + c];
        st(db + c, total);
    }
}
