"""The fused CPU loops: kernels/*.cu written again for the CPU and compiled by numba.

NumPy runs a step's elementwise work as chains of ufuncs: the bias add, the
activation, its derivative, the mask, the loss and the optimizer update each
pass over memory on their own, each a Python call. These loops do what the CUDA
kernels do instead, each in one pass over its operands:

    bias_act_forward        a = g(z + b)                             (bias_activation.cu)
    act_backward_bias_grad  delta = dL/da * g'(a), db = sum_rows delta  (activation_backward.cu)
    shift_logits, normalize_exponentials                                 (loss.cu)
                            softmax cross entropy: the loss, delta_L = (q - y) / B
                            and the hits, around NumPy's exp
    mean_squared_error      the loss and delta_L = 2 (z - y) / (B C)     (loss.cu)
    sgd_update, adam_update one pass over the flat parameter buffer,     (optimizers.cu)
                            checking the parameters it writes      (nonfinite.cu)
    nonfinite               whether any element is Inf or NaN            (nonfinite.cu)

Each keeps the NumPy backend's order of operations in the array's own type (C =
z.dtype.type: float32 work stays float32), and numba's default IEEE semantics
(no fastmath, so no contraction into FMAs): the optimizer updates and the layer
loops' elementwise results equal the NumPy backend's (ReLU of -0.0 keeps its sign);
whatever a sum feeds (db, the softmax denominators, the loss) agrees with it to
rounding, the sums being added in another order (db and the loss in float64).
Sums run in a fixed order: a result is the same bits on every run.

The loops run on the calling thread alone. Threaded, they lost 5x to 15x on every
shape measured (2 cores): numba's pool and OpenBLAS's, each spinning between
calls, took turns at the cores. The cores go to the GEMMs; a loop's gain is the
passes and the Python calls it saves.

The NumPy backend (cpu.py) stays the readable reference; tests/backend/test_cpu_fused.py
holds every loop here to it. Compiled loops are cached on disk (numba's
``cache=True``), so only a machine's first run pays the compile.
"""

import math
from typing import Callable, NamedTuple, Optional

import numpy as np
from numba import njit

from ..nn.activations import ACTIVATIONS

# This module's own numbering: a compiled loop is cached under this file's text and
# the values its closure holds, so nothing it compiles in may come from elsewhere
# (a constant read from another module would outlive a change there in the cache).
IDENTITY, RELU, LEAKY_RELU, TANH, SIGMOID = 0, 1, 2, 3, 4


def compiled(f, **flags):
    """f compiled by numba, releasing the GIL while it runs, cached on disk: where
    numba finds no writable cache folder (a read-only install and home), compiled
    again by each process instead. NumPy's error model: a division by zero gives Inf
    or NaN as NumPy's (and the guard's checks see it) rather than raising, and with
    no check in the loop LLVM vectorizes it (adam_update over 1.6M float32: 4.7 ms
    with Python's error model, 0.93 ms with NumPy's, the same bits)."""
    flags = {"nogil": True, "error_model": "numpy", **flags}
    try:
        return njit(cache=True, **flags)(f)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return njit(**flags)(f)


# ---- activations (common.cuh: act_forward, act_grad) ----------------------------------
# g for the ReLU family and the identity; g' for those and for tanh and sigmoid,
# whose g' is a polynomial in a. g itself for tanh and sigmoid (and GELU, SiLU)
# stays NumPy's: its SIMD tanh is 4x faster than the scalar libm call of a loop.
@njit(inline="always")
def act_forward(kind, slope, z, C):
    if kind == RELU:
        return C(0) if z < C(0) else z  # NaN stays NaN
    if kind == LEAKY_RELU:
        return z * C(slope) if z < C(0) else z
    return z


@njit(inline="always")
def act_grad(kind, slope, a, C):
    if kind == RELU:
        return C(1) if a > C(0) else C(0)
    if kind == LEAKY_RELU:
        return C(1) if a > C(0) else C(slope)
    if kind == TANH:
        return C(1) - a * a
    if kind == SIGMOID:
        return (C(1) - a) * a
    return C(1)


# ---- dense layers ---------------------------------------------------------------------
class DenseLoops(NamedTuple):
    forward: Optional[Callable]  # bias_act_forward(z, b, a); None: NumPy's is faster
    backward: Callable  # act_backward_bias_grad(g, a, db)


def dense_loops(kind, slope=0.0, forward=True):
    """The loops of a dense layer for activation ``kind`` (and leaky ReLU's
    ``slope``), compiled for it alone: with the kind a constant, the compiler drops
    the other branches and vectorizes the rows (a kind passed at run time keeps a
    branch per element). Without ``forward``, the backward loop alone."""

    def bias_act_forward(z, b, a):
        """a = g(z + b) row by row (a may be z: these g' need only a)."""
        C = z.dtype.type
        rows, cols = z.shape
        for r in range(rows):
            for c in range(cols):
                a[r, c] = act_forward(kind, slope, z[r, c] + b[c], C)

    def act_backward_bias_grad(g, a, db):
        """g = delta = g * g'(a) in place and db = its column sums, added down the rows
        in order in float64 (as exact as NumPy's blocked float32 sums, or more)."""
        C = g.dtype.type
        rows, cols = g.shape
        acc = np.zeros(cols, np.float64)
        for r in range(rows):
            for c in range(cols):
                d = g[r, c]
                if kind != IDENTITY:
                    d = d * act_grad(kind, slope, a[r, c], C)
                    g[r, c] = d
                acc[c] += d
        for c in range(cols):
            db[c] = acc[c]

    return DenseLoops(compiled(bias_act_forward) if forward else None, compiled(act_backward_bias_grad))


DENSE = {  # by activation name
    "identity": dense_loops(IDENTITY),
    "relu": dense_loops(RELU),
    "leaky_relu": dense_loops(LEAKY_RELU, dict(ACTIVATIONS["leaky_relu"].constants)["LEAKY_SLOPE"]),
    "tanh": dense_loops(TANH, forward=False),
    "sigmoid": dense_loops(SIGMOID, forward=False),
}


def member_loops(loops):
    """``loops`` over a pack's member axis (gpubackprop.nn.packed): z, a, g (K, B, n), b and
    db (K, n); member k's rows by the lone loop, so each member's results are its own."""
    forward, backward = loops.forward, loops.backward

    def members_forward(z, b, a):
        for k in range(z.shape[0]):
            forward(z[k], b[k], a[k])

    def members_backward(g, a, db):
        for k in range(g.shape[0]):
            backward(g[k], a[k], db[k])

    return DenseLoops(None if forward is None else compiled(members_forward), compiled(members_backward))


DENSE_MEMBERS = {name: member_loops(loops) for name, loops in DENSE.items()}


# ---- losses ---------------------------------------------------------------------------
@njit(inline="always")
def first_nan(x, r, otherwise):
    """The first c where x[r, c] is NaN, else ``otherwise``."""
    for c in range(x.shape[1]):
        if x[r, c] != x[r, c]:
            return c
    return otherwise


def shift_logits(z, y, shifted, row, weight):
    """The first half of softmax cross entropy (gpubackprop.nn.losses), before the
    exponentials: shifted = z - m row-wise (m_i = max_c z_ic), row[i] = y_i . (z_i - m_i);
    returns the rows whose argmax z is argmax y, each counting its ``weight`` (None: 1;
    numba compiles the two cases apart)."""
    C = z.dtype.type
    rows, cols = z.shape
    hits = 0.0
    for r in range(rows):
        m, top = z[r, 0], 0
        for c in range(1, cols):
            if z[r, c] > m:
                m, top = z[r, c], c
        ym, label = y[r, 0], 0
        for c in range(1, cols):
            if y[r, c] > ym:
                ym, label = y[r, c], c
        y_dot_shifted = C(0)
        for c in range(cols):
            d = z[r, c] - m
            shifted[r, c] = d
            y_dot_shifted += y[r, c] * d
        row[r] = y_dot_shifted
        if y_dot_shifted != y_dot_shifted:  # a NaN in the row: np.argmax picks the first NaN
            top, label = first_nan(z, r, top), first_nan(y, r, label)
        if top == label:
            hits += 1.0 if weight is None else weight[r]
    return hits


def normalize_exponentials(e, y, row, scale, weight):
    """The second half, after e = exp(z - m) (NumPy's SIMD exp: a loop would call the
    scalar libm expf per element): e = delta_L = (e / s - y) * s_r with s_i = sum_c e_ic,
    s_r = scale (1 / B) or scale * weight[r] (scale = 1 / sum w), row[i] = log s_i - row[i];
    returns the batch's (weighted) mean loss (summed in float64)."""
    C = e.dtype.type
    rows, cols = e.shape
    total = 0.0  # float64: a float32 running sum drifts over a large batch
    for r in range(rows):
        s = C(0)
        for c in range(cols):
            s += e[r, c]
        row_scale = scale if weight is None else scale * weight[r]
        for c in range(cols):
            e[r, c] = (e[r, c] / s - y[r, c]) * row_scale
        row[r] = math.log(s) - row[r]
        total += row[r] if weight is None else row[r] * weight[r]
    return C(total) * scale


def mean_squared_error(z, y, delta, row, inv_n, weight):
    """delta = 2 (z - y) * inv_n (times weight[r] where weights are given: inv_n is then
    1 / (C sum w)), row[i] = the squared error of row i; returns the (weighted) mean."""
    C = z.dtype.type
    rows, cols = z.shape
    for r in range(rows):
        acc = C(0)
        row_scale = C(2) * inv_n if weight is None else C(2) * inv_n * weight[r]
        for c in range(cols):
            d = z[r, c] - y[r, c]
            acc += d * d
            delta[r, c] = d * row_scale
        row[r] = acc
    total = 0.0
    for r in range(rows):
        total += row[r] if weight is None else row[r] * weight[r]
    return C(total) * inv_n


# ---- the flat buffers (optimizers.cu, nonfinite.cu) ------------------------------------------
def sgd_update(p, g, buf, n, lr, momentum, one_minus_dampening, weight_decay, lr_momentum, nesterov, dampened, steps):
    """torch.optim.SGD (gpubackprop.optim.sgd), in sgd.py's order of operations; returns
    whether the new parameters hold Inf or NaN."""
    C = p.dtype.type
    first = steps[0] == 0
    bad = False
    for i in range(n):
        pi = p[i]
        d = g[i]
        if weight_decay != C(0):
            d = pi * weight_decay + d
        if momentum != C(0):
            b = d
            if not first:
                b = buf[i] * momentum + (d * one_minus_dampening if dampened else d)
            buf[i] = b
            if nesterov:
                pi = pi - d * lr
                pi = pi - b * lr_momentum
            else:
                pi = pi - b * lr
        else:
            pi = pi - d * lr
        p[i] = pi
        bad |= pi - pi != C(0)  # Inf - Inf and NaN - NaN are NaN
    steps[0] += 1
    return bad


def adam_update(p, g, m, v, n, lr, beta1_d, beta2_d, one_minus_beta1, one_minus_beta2, eps, weight_decay,
                decay_factor, decoupled, steps):
    """torch.optim.Adam / AdamW (gpubackprop.optim.adam), in adam.py's order of operations;
    returns whether the new parameters hold Inf or NaN."""
    C = p.dtype.type
    bad = False
    t = float(steps[0] + 1)
    beta1, beta2 = C(beta1_d), C(beta2_d)
    step_size = C(lr / (1.0 - beta1_d ** t))
    sqrt_bc2 = C(math.sqrt(1.0 - beta2_d ** t))
    for i in range(n):
        pi = p[i]
        d = g[i]
        if weight_decay != C(0):
            if decoupled:
                pi = pi * decay_factor
            else:
                d = pi * weight_decay + d
        mi = m[i] * beta1 + d * one_minus_beta1
        vi = v[i] * beta2 + (d * d) * one_minus_beta2
        m[i] = mi
        v[i] = vi
        pi = pi - (mi / (math.sqrt(vi) / sqrt_bc2 + eps)) * step_size
        p[i] = pi
        bad |= pi - pi != C(0)
    steps[0] += 1
    return bad


def nonfinite(x):
    """Whether any element of the 1-D x is Inf or NaN (x - x is NaN exactly there)."""
    C = x.dtype.type
    acc = C(0)
    for i in range(x.size):
        acc += x[i] - x[i]
    return not acc == C(0)


shift_logits, normalize_exponentials, mean_squared_error, sgd_update, adam_update = (
    compiled(f) for f in (shift_logits, normalize_exponentials, mean_squared_error, sgd_update, adam_update))
# Reassociation lets the sum vectorize; it stays NaN exactly where an element is non-finite.
nonfinite = compiled(nonfinite, fastmath={"reassoc"})


# ---- a pack's member axis (gpubackprop.nn.packed): the loops above, member by member ----------------
# A pack's flat buffer holds blocks (starts[j], sizes[j]) of K rows each: member k's part of
# block j is sizes[j] values from starts[j] + k sizes[j]. h[k, j] holds the scalar arguments
# the lone loop takes after n (its rule's kernel_scalars), in float64; each cast as kernel_scalars casts it.
def nonfinite_members(g, starts, sizes, flags):
    """flags[k] = whether member k's part of g holds Inf or NaN."""
    for k in range(flags.shape[0]):
        bad = False
        for j in range(starts.shape[0]):
            s = starts[j] + k * sizes[j]
            bad |= nonfinite(g[s:s + sizes[j]])
        flags[k] = bad


def sgd_members(p, g, buf, starts, sizes, h, steps, skip, params_flag):
    """sgd_update of each member not skipped, over its blocks, counting from its own steps."""
    C = p.dtype.type
    count = np.empty(1, steps.dtype)
    for k in range(steps.shape[0]):
        if skip[k]:
            continue
        bad = False
        for j in range(starts.shape[0]):
            s, e, a = starts[j] + k * sizes[j], starts[j] + (k + 1) * sizes[j], h[k, j]
            count[0] = steps[k]
            bad |= sgd_update(p[s:e], g[s:e], buf[s:e], np.int64(sizes[j]), C(a[0]), C(a[1]), C(a[2]), C(a[3]),
                              C(a[4]), np.int32(a[5]), np.int32(a[6]), count)
        steps[k] = count[0]
        if bad:
            params_flag[k] = 1


def adam_members(p, g, m, v, starts, sizes, h, steps, skip, params_flag):
    """adam_update of each member not skipped, over its blocks, counting from its own steps."""
    C = p.dtype.type
    count = np.empty(1, steps.dtype)
    for k in range(steps.shape[0]):
        if skip[k]:
            continue
        bad = False
        for j in range(starts.shape[0]):
            s, e, a = starts[j] + k * sizes[j], starts[j] + (k + 1) * sizes[j], h[k, j]
            count[0] = steps[k]
            bad |= adam_update(p[s:e], g[s:e], m[s:e], v[s:e], np.int64(sizes[j]), a[0], a[1], a[2], C(a[3]),
                               C(a[4]), C(a[5]), C(a[6]), C(a[7]), np.int32(a[8]), count)
        steps[k] = count[0]
        if bad:
            params_flag[k] = 1


nonfinite_members, sgd_members, adam_members = (compiled(f) for f in (nonfinite_members, sgd_members, adam_members))
OPTIMIZERS = {"sgd_update": sgd_update, "adam_update": adam_update}  # by the name of their CUDA kernel
OPTIMIZER_MEMBERS = {"sgd_update": sgd_members, "adam_update": adam_members}
