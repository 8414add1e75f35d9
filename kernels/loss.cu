// Losses with their gradient delta_L = dL/dz, one pass over the logits, and the
// loss summed on the device (maths in gpubackprop/nn/losses.py).
#include "common.cuh"

// Every launch also adds to running = [sum of the rows' losses, rows predicted
// right] (when not null): the epoch's metrics, accumulated on the device. With
// loss_scale (float16 training), delta_L is multiplied by *loss_scale; the loss
// is not.

// The row's maximum and the first column holding it (NumPy's argmax), over a warp.
template <typename T, typename C>
__device__ __forceinline__ void row_max(const T* row, int cols, int lane, C& best, int& at) {
    at = lane < cols ? lane : 0;
    best = ld(row + at);
    for (int c = lane + 32; c < cols; c += 32) {
        const C v = ld(row + c);
        if (v > best) {
            best = v;
            at = c;
        }
    }
    for (int offset = 16; offset > 0; offset >>= 1) {  // (value, -index) has one maximum
        const C other = __shfl_xor_sync(0xffffffffu, best, offset);
        const int other_at = __shfl_xor_sync(0xffffffffu, at, offset);
        if (other > best || (other == best && other_at < at)) {
            best = other;
            at = other_at;
        }
    }
}

// Softmax cross entropy. A warp per row (rows striding over the grid): the row's
// max m, then s = sum e^(z - m) and y.(z - m) in one read, then
// delta = (e^(z - m) / s - y) / B. The row's loss log s - y.(z - m) is summed
// over the batch in a fixed order; *loss = that sum / B. A row is predicted
// right when argmax z = argmax y.
template <typename T>
__global__ void softmax_cross_entropy(const T* __restrict__ z, const T* __restrict__ y, T* __restrict__ delta,
                                      int rows, int cols, typename Compute<T>::type inv_batch,
                                      typename Compute<T>::type* partials, unsigned* counter, T* loss,
                                      double* running, const float* loss_scale) {
    typedef typename Compute<T>::type C;
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const C delta_scale = loss_scale ? inv_batch * C(*loss_scale) : inv_batch;
    C total = C(0), hits = C(0);
    for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < rows; r += gridDim.x * warps) {
        const T* zr = z + (size_t)r * cols;
        const T* yr = y + (size_t)r * cols;
        T* dr = delta + (size_t)r * cols;
        C m, y_max;
        int predicted, label;
        row_max(zr, cols, lane, m, predicted);
        row_max(yr, cols, lane, y_max, label);
        hits += predicted == label ? C(1) : C(0);
        C s = C(0), y_dot = C(0);
        for (int c = lane; c < cols; c += 32) {
            const C shifted = ld(zr + c) - m;
            s += c_exp(shifted);
            y_dot += ld(yr + c) * shifted;
        }
        s = warp_sum(s);
        y_dot = warp_sum(y_dot);
        for (int c = lane; c < cols; c += 32) st(dr + c, (c_exp(ld(zr + c) - m) / s - ld(yr + c)) * delta_scale);
        total += c_log(s) - y_dot;
    }
    sum_over_grid(total, hits, partials, counter, loss, inv_batch, running, rows);
}

// Mean squared error over all n = B C elements: delta = 2 (z - y) / n,
// *loss = sum (z - y)^2 / n.
template <typename T>
__global__ void mean_squared_error(const T* __restrict__ z, const T* __restrict__ y, T* __restrict__ delta,
                                   long long n, typename Compute<T>::type two_over_n,
                                   typename Compute<T>::type inv_n, typename Compute<T>::type* partials,
                                   unsigned* counter, T* loss, double* running, int rows, const float* loss_scale) {
    typedef typename Compute<T>::type C;
    const C delta_scale = loss_scale ? two_over_n * C(*loss_scale) : two_over_n;
    C acc = C(0);
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x) {
        const C d = ld(z + i) - ld(y + i);
        acc += d * d;
        st(delta + i, d * delta_scale);
    }
    sum_over_grid(warp_sum(acc), C(0), partials, counter, loss, inv_n, running, rows);
}
