"""The CPU backend: NumPy ufuncs with ``out=`` buffers and BLAS for every product.

This is the CPU product, not a fallback of convenience, so it follows three rules:
no allocation inside a step (every result goes into a buffer made for its batch
size), every matrix product (and the bias-gradient reduction, as a GEMV with a
ones vector, 2x faster than ``sum(axis=0)``) goes to BLAS, and no float64 leaks
into float32 work (scalars are Python floats, which NumPy 2 keeps "weak").

The primitives are written against ``self.xp`` (NumPy here; the tests also run
them on CuPy arrays to compare with the kernels).
"""

import contextlib
import math

import numpy as np

from ..nn import losses
from ..nn.dropout import keep_mask
from .base import Backend


class NumpyBackend(Backend):
    name = "cpu"
    xp = np
    supports_members = True  # Backend's member-by-member primitives

    def __init__(self, note=""):
        self.note = note

    # ---- arrays -------------------------------------------------------------
    def asarray(self, x, dtype=None):
        if hasattr(x, "__cuda_array_interface__"):
            raise TypeError(
                "got a GPU array for a model on the cpu; move the model with "
                "model.to('cuda') or copy the array to the host first (e.g. x.get())"
            )
        return np.ascontiguousarray(x, dtype=dtype)

    def to_host(self, x):
        return np.asarray(x)

    def gather_rows(self, src, index, out):
        # mode="clip" skips the bounds check and the buffered copy "raise" implies;
        # the indices come from a permutation of range(len(src)).
        np.take(src, index, axis=0, out=out, mode="clip")

    def context(self):
        return contextlib.nullcontext()

    # ---- layers ---------------------------------------------------------------
    def dense_forward(self, layer, buf, dropout=None):
        xp = self.xp
        zbuf = buf.out if buf.z is None else buf.z
        xp.matmul(buf.input, layer.W.T, out=zbuf)
        xp.add(zbuf, layer.b, out=zbuf)
        layer.act.forward(xp, zbuf, buf.out, buf.scratch)
        if dropout is not None:
            xp.multiply(buf.out, self._dropout_factor(dropout, buf.out), out=dropout.dropped)

    def dense_backward(self, layer, buf, dropout=None):
        xp, grad = self.xp, buf.grad
        if dropout is not None:
            xp.multiply(grad, self._dropout_factor(dropout, grad), out=grad)
        if layer.act.backward is not None:
            layer.act.backward(xp, grad, buf.out, buf.z, buf.scratch)
        xp.matmul(buf.ones, grad, out=layer.db)
        xp.matmul(grad.T, buf.input, out=layer.dW)
        if buf.grad_prev is not None:
            xp.matmul(grad, layer.W, out=buf.grad_prev)

    @staticmethod
    def _dropout_factor(spec, like):
        """mask / (1 - p) in like's dtype (a temporary: dropout on the CPU allocates)."""
        mask = keep_mask(spec, like.shape, int(spec.steps[0]))
        return mask.astype(like.dtype) * like.dtype.type(spec.scale)

    def loss(self, loss, buf, running=None, loss_scale=None):
        if loss_scale is not None:
            raise NotImplementedError("the NumPy backend computes in float32 / float64 only, without loss scaling")
        xp, z, weight = self.xp, buf.z, buf.weight
        loss.numpy(xp, z, buf.target, buf.delta, buf.row, loss.delta)
        buf.out[...] = losses.finish(xp, loss, buf.delta, buf.row,
                                     losses.row_scales(xp, z.shape[0], weight, buf.weight_sum))
        if running is not None:
            running[0] += float(buf.out) * (z.shape[0] if weight is None else float(buf.weight_sum))
            hits = losses.hits(xp, loss, z, buf.target)
            if hits is not None:
                running[1] += int(hits.sum()) if weight is None else float(xp.vdot(weight, hits.astype(weight.dtype)))

    def add_scaled(self, out, y, x, a):
        self.xp.add(y, x * a, out=out)  # a: a Python float, weak: float32 stays float32

    def clip_by_global_norm(self, g, max_norm):
        coef = max_norm / (math.sqrt(float(self.xp.vdot(g, g))) + 1e-6)
        if coef < 1.0:
            self.xp.multiply(g, coef, out=g)

    def flag_nonfinite(self, g, flag):
        # g . g is finite only if every element is, and BLAS forms it with no temporary;
        # where it is not, the exact test decides (a large finite g can overflow g . g).
        if not math.isfinite(float(self.xp.vdot(g, g))) and not self.xp.isfinite(g).all():
            flag[0] = 1

    def count_nonfinite(self, flag, count, first_bad, steps):
        if flag[0]:
            if count[0] == 0:
                first_bad[0] = steps[0]
            count[0] += 1
        flag[0] = 0

    # ---- optimizers ---------------------------------------------------------------
    def optimizer_update(self, rule, update, h):
        if update.found_inf is None or not update.found_inf[0]:  # else skipped, step count included
            rule.numpy_update(self.xp, update, h)
        if update.params_flag is not None:
            self.flag_nonfinite(update.p, update.params_flag)
