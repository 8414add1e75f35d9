"""The CPU backend with fused loops: the NumPy backend's primitives, with the passes
NumPy splits into chains of ufuncs run as single compiled loops.

A step on the NumPy backend spends much of its time outside the GEMMs: the bias
add, the activation, its derivative, the mask, the bias-gradient sum, the loss
(about fifteen ufunc calls on a small batch) and the optimizer update (two passes
over the whole flat buffer, three for momentum), each a pass over memory and a
Python call. Here each of those is one loop of cpu_kernels (numba), as each is one
kernel on the GPU. The GEMMs go to NumPy's BLAS, or to MKL where it is installed
and measured faster for the model's shapes (cpu_blas), on every core.

Which primitives run fused was decided by measurement (``python -m bench.fit_bench``
compares ``ours`` with ``ours_numpy``; ``python -m bench.profile_step --device cpu``
shows where a step's time goes): the ReLU family and the identity run fused both
ways, tanh and sigmoid backward only (g' is a polynomial in a); g of the tanh
family (tanh, sigmoid, GELU, SiLU) stays NumPy's ufuncs, whose SIMD tanh took
105 us on a 4096 x 64 float32 array against 456 us for a compiled loop's scalar
libm calls (2-core Xeon, 2026-11-30). Everything else (GELU's and SiLU's g',
dropout, other dtypes, optimizers without a loop) is the NumPy backend's own code.

numba is the ``fast`` extra; without it ``get_backend("cpu")`` is the NumPy
backend, and its ``note`` says so.
"""

import numpy as np

from . import cpu_blas, cpu_kernels
from .base import MemberSettings
from .cpu import NumpyBackend

FUSED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def fused(x):
    """Whether cpu_kernels' loops take a model whose arrays are like x (float32 /
    float64; numba compiles a loop for any strides, so the order does not matter)."""
    return x.dtype in FUSED_DTYPES


def fused_layer(act, dtype, dropout, z, forward=True):
    """cpu_kernels' loops for a dense layer of ``act`` in ``dtype``, or None where the
    layer's pass runs NumpyBackend's code: dropout, g' from z (``z``: the layer keeps
    one), another dtype, or (``forward``) no loop of the forward pass (the tanh
    family's backward is fused, its forward is not). One test for the layers and for
    matmul_for, so that a model never mixes the two BLAS libraries."""
    loops = cpu_kernels.DENSE.get(act.name)
    if dropout or z or loops is None or (forward and loops.forward is None) or np.dtype(dtype) not in FUSED_DTYPES:
        return None
    return loops


class FusedCpuBackend(NumpyBackend):
    """The CPU backend: NumpyBackend's primitives, fused where cpu_kernels has a loop."""

    def __init__(self, note=""):
        super().__init__(note)
        self.blas_choices = cpu_blas.Choices()

    def matmul_for(self, sizes, act, batch, dtype, dropout):
        if fused_layer(act, dtype, dropout, act.needs_z) is None:
            return None  # its layers run NumpyBackend's code, whose products are NumPy's
        return cpu_blas.choose(sizes, batch, dtype, self.blas_choices)

    # ---- layers ---------------------------------------------------------------
    def dense_forward(self, layer, buf, dropout=None):
        loops = fused_layer(layer.act, buf.out.dtype, dropout is not None, buf.z is not None)
        if loops is None:
            return super().dense_forward(layer, buf, dropout)
        (buf.matmul or cpu_blas.numpy_matmul)(buf.input, layer.W.T, buf.out)
        loops.forward(buf.out, layer.b, buf.out)

    def dense_backward(self, layer, buf, dropout=None):
        grad, loops = buf.grad, fused_layer(layer.act, buf.grad.dtype, dropout is not None, buf.z is not None,
                                            forward=False)
        if loops is None:
            return super().dense_backward(layer, buf, dropout)
        matmul = buf.matmul or cpu_blas.numpy_matmul
        loops.backward(grad, buf.out, layer.db)
        matmul(grad.T, buf.input, layer.dW)
        if buf.grad_prev is not None:
            matmul(grad, layer.W, buf.grad_prev)

    def loss(self, loss, buf, running=None, loss_scale=None):
        z, weight = buf.z, buf.weight
        if loss_scale is not None or loss.name not in ("cross_entropy", "mse") or not fused(z):
            return super().loss(loss, buf, running, loss_scale)
        rows, c = z.shape[0], z.dtype.type
        count = rows if weight is None else float(buf.weight_sum)  # the rows, or their weight
        cols = 1 if loss.name == "cross_entropy" else z.shape[1]
        scale = c(1.0 / (count * cols)) if count > 0 else c(0.0)  # a batch of weights all 0: loss and delta 0
        if loss.name == "cross_entropy":
            hits = cpu_kernels.shift_logits(z, buf.target, buf.delta, buf.row, weight)
            np.exp(buf.delta, out=buf.delta)
            value = cpu_kernels.normalize_exponentials(buf.delta, buf.target, buf.row, scale, weight)
        else:
            value, hits = cpu_kernels.mean_squared_error(z, buf.target, buf.delta, buf.row, scale, weight), 0
        buf.out[...] = value
        if running is not None:
            running[0] += float(buf.out) * count
            running[1] += hits

    def flag_nonfinite(self, g, flag):
        if not fused(g):
            return super().flag_nonfinite(g, flag)
        if cpu_kernels.nonfinite(g):
            flag[0] = 1

    # ---- optimizers ---------------------------------------------------------------
    def update_scratch(self, rule, dtype):
        if rule.kernel in cpu_kernels.OPTIMIZERS and np.dtype(dtype) in FUSED_DTYPES:
            return 0  # the loop keeps its temporaries in registers
        return super().update_scratch(rule, dtype)

    def optimizer_update(self, rule, update, h):
        loop = cpu_kernels.OPTIMIZERS.get(rule.kernel)
        if loop is None or not fused(update.p):
            return super().optimizer_update(rule, update, h)
        if update.found_inf is not None and update.found_inf[0]:  # skipped, step count included
            if update.params_flag is not None:
                self.flag_nonfinite(update.p, update.params_flag)
        elif loop(*rule.kernel_args(update, h, update.p.dtype.type), update.steps) and update.params_flag is not None:
            update.params_flag[0] = 1  # the loop checks the parameters it writes: no second pass

    # ---- a pack's member axis ---------------------------------------------------------------
    def dense_forward_members(self, layer, buf):
        loops = fused_layer(layer.act, buf.out.dtype, False, buf.z is not None)
        if loops is None:
            return super().dense_forward_members(layer, buf)
        (buf.matmul or cpu_blas.numpy_matmul)(buf.input, layer.W.transpose(0, 2, 1), buf.out)
        cpu_kernels.DENSE_MEMBERS[layer.act.name].forward(buf.out, layer.b, buf.out)

    def dense_backward_members(self, layer, buf):
        loops = fused_layer(layer.act, buf.grad.dtype, False, buf.z is not None, forward=False)
        if loops is None:
            return super().dense_backward_members(layer, buf)
        matmul, grad = buf.matmul or cpu_blas.numpy_matmul, buf.grad
        cpu_kernels.DENSE_MEMBERS[layer.act.name].backward(grad, buf.out, layer.db)
        matmul(grad.transpose(0, 2, 1), buf.input, layer.dW)
        if buf.grad_prev is not None:
            matmul(grad, layer.W, buf.grad_prev)

    def flag_nonfinite_members(self, g, blocks, flags):
        if not fused(g):
            return super().flag_nonfinite_members(g, blocks, flags)
        cpu_kernels.nonfinite_members(g, *block_arrays(blocks), flags)

    def prepare_members(self, rule, blocks, settings, dtype):
        if rule.kernel not in cpu_kernels.OPTIMIZER_MEMBERS or np.dtype(dtype) not in FUSED_DTYPES:
            return super().prepare_members(rule, blocks, settings, dtype)
        return MemberSettings(settings, (*block_arrays(blocks), member_scalars(rule, settings, np.dtype(dtype).type)))

    def optimizer_update_members(self, rule, update, prepared):
        if prepared.arguments is None:
            return super().optimizer_update_members(rule, update, prepared)
        p, state = update.p, update.state
        arrays = (p, update.g, *(state or (p,)))  # sgd without momentum: its buffer is unread
        cpu_kernels.OPTIMIZER_MEMBERS[rule.kernel](*arrays, *prepared.arguments, update.steps, update.skip,
                                                   update.params_flag)


def block_arrays(blocks):
    """The blocks' starts and sizes as the member loops take them."""
    return np.array([b.start for b in blocks], np.int64), np.array([b.size for b in blocks], np.int64)


def member_scalars(rule, settings, c):
    """(K, blocks, args) float64: the scalars ``rule.kernel_scalars`` gives the lone loop,
    for each member's settings of each block."""
    return np.array([[[float(x) for x in rule.kernel_scalars(h, c)] for h in member] for member in settings])
