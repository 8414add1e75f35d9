// Losses with their gradient delta_L = dL/dz, one pass over the logits, and the
// loss summed on the device (maths and codes in gpubackprop/nn/losses.py).
#include "common.cuh"

// Every launch also adds to running = [sum of the rows' losses, rows predicted
// right] (when not null): the epoch's metrics, accumulated on the device. With
// loss_scale (float16 training), delta_L is multiplied by *loss_scale; the loss
// is not.
//
// Sample weights: with weight (B values) and weight_sum (their sum, one value)
// given, row i counts s_i = w_i / sum w (0 for every row where the sum is 0),
// else s_i = 1 / B; "rows" in running become their weights' sum, and each hit
// counts its row's weight. The weights are in the compute type: a 16-bit batch
// would round them and could overflow their sum.

// The loss codes (tests/nn/test_losses.py holds this enum to the table).
enum { LOSS_CROSS_ENTROPY = 0, LOSS_MSE = 1, LOSS_BINARY_CROSS_ENTROPY = 2, LOSS_HUBER = 3, LOSS_MAE = 4,
       LOSS_POISSON = 5 };

// 1 / sum w, or 0 where the weights sum to 0; inv_batch without weights.
template <typename C> __device__ __forceinline__ C batch_scale(const C* weight_sum, C inv_batch) {
    if (!weight_sum) return inv_batch;
    const C total = *weight_sum;
    return total > C(0) ? C(1) / total : C(0);
}

template <typename C> __device__ __forceinline__ C row_weight(const C* weight, int r) {
    return weight ? weight[r] : C(1);
}

// What running's loss total is multiplied by: the rows, or their weights' sum.
template <typename C> __device__ __forceinline__ double batch_count(const C* weight_sum, int rows) {
    return weight_sum ? (double)*weight_sum : (double)rows;
}

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
// delta = (e^(z - m) / s - y) s_r. The row's loss log s - y.(z - m), times w_r,
// is summed over the batch in a fixed order; *loss = that sum / B (or / sum w).
// A row is predicted right when argmax z = argmax y.
template <typename T>
__global__ void softmax_cross_entropy(const T* __restrict__ z, const T* __restrict__ y, T* __restrict__ delta,
                                      int rows, int cols, typename Compute<T>::type inv_batch,
                                      const typename Compute<T>::type* weight,
                                      const typename Compute<T>::type* weight_sum,
                                      typename Compute<T>::type* partials, unsigned* counter, T* loss,
                                      double* running, const float* loss_scale) {
    typedef typename Compute<T>::type C;
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const C scale = batch_scale(weight_sum, inv_batch);
    const C delta_scale = loss_scale ? scale * C(*loss_scale) : scale;
    C total = C(0), hits = C(0);
    for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < rows; r += gridDim.x * warps) {
        const T* zr = z + (size_t)r * cols;
        const T* yr = y + (size_t)r * cols;
        T* dr = delta + (size_t)r * cols;
        const C w = row_weight(weight, r);
        C m, y_max;
        int predicted, label;
        row_max(zr, cols, lane, m, predicted);
        row_max(yr, cols, lane, y_max, label);
        hits += predicted == label ? w : C(0);
        C s = C(0), y_dot = C(0);
        for (int c = lane; c < cols; c += 32) {
            const C shifted = ld(zr + c) - m;
            s += c_exp(shifted);
            y_dot += ld(yr + c) * shifted;
        }
        s = warp_sum(s);
        y_dot = warp_sum(y_dot);
        const C row_scale = delta_scale * w;
        for (int c = lane; c < cols; c += 32) st(dr + c, (c_exp(ld(zr + c) - m) / s - ld(yr + c)) * row_scale);
        total += (c_log(s) - y_dot) * w;
    }
    sum_over_grid(total, hits, partials, counter, loss, scale, running, batch_count(weight_sum, rows));
}

// One element's loss f(z, y) and its derivative g = df/dz (losses.py's table).
template <int LOSS, typename C> __device__ __forceinline__ C element_loss(C z, C y, C huber_delta, C& g) {
    if (LOSS == LOSS_BINARY_CROSS_ENTROPY) {
        g = c_tanh(z * C(0.5)) * C(0.5) + C(0.5) - y;  // sigmoid without exp: no overflow
        return (z > C(0) ? z : C(0)) - z * y + c_log1p(c_exp(-c_abs(z)));
    }
    if (LOSS == LOSS_POISSON) {
        const C rate = c_exp(z);
        g = rate - y;
        return rate - y * z;
    }
    const C d = z - y;
    if (LOSS == LOSS_HUBER) {
        const C u = c_abs(d);
        g = u <= huber_delta ? d : (d > C(0) ? huber_delta : -huber_delta);
        return u <= huber_delta ? C(0.5) * d * d : huber_delta * (u - C(0.5) * huber_delta);
    }
    if (LOSS == LOSS_MAE) {
        g = d > C(0) ? C(1) : (d < C(0) ? C(-1) : C(0));
        return c_abs(d);
    }
    g = d * C(2);  // LOSS_MSE
    return d * d;
}

// The element-wise losses over all B C elements (rows striding over the grid):
// delta = g(z, y) s_r / C, *loss = sum w_r f(z, y) / C / B (or / sum w). For
// binary cross entropy an element is predicted right when [z > 0] = [y > 1/2].
template <typename T, int LOSS>
__global__ void elementwise_loss(const T* __restrict__ z, const T* __restrict__ y, T* __restrict__ delta,
                                 int rows, int cols, typename Compute<T>::type inv_batch,
                                 typename Compute<T>::type inv_cols, typename Compute<T>::type huber_delta,
                                 const typename Compute<T>::type* weight, const typename Compute<T>::type* weight_sum,
                                 typename Compute<T>::type* partials, unsigned* counter, T* loss, double* running,
                                 const float* loss_scale) {
    typedef typename Compute<T>::type C;
    const C scale = batch_scale(weight_sum, inv_batch) * inv_cols;
    const C delta_scale = loss_scale ? scale * C(*loss_scale) : scale;
    const size_t n = (size_t)rows * cols;
    C acc = C(0), hits = C(0);
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const C w = row_weight(weight, (int)(i / cols));
        const C zi = ld(z + i), yi = ld(y + i);
        C g;
        acc += element_loss<LOSS>(zi, yi, huber_delta, g) * w;
        if (LOSS == LOSS_BINARY_CROSS_ENTROPY) hits += (zi > C(0)) == (yi > C(0.5)) ? w : C(0);
        st(delta + i, g * (delta_scale * w));
    }
    sum_over_grid(warp_sum(acc), warp_sum(hits), partials, counter, loss, scale, running,
                  batch_count(weight_sum, rows));
}

// *out = the sum of x's n values (a batch's sample weights, before its loss), in a
// fixed order: the weights' sum inside a captured step, with no allocation.
template <typename T>
__global__ void sum_values(const T* __restrict__ x, long long n, T* partials, unsigned* counter, T* out) {
    T acc = T(0);
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x)
        acc += x[i];
    sum_over_grid(warp_sum(acc), T(0), partials, counter, out, T(1), (double*)0, 0.0);
}
