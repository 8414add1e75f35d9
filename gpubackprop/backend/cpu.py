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

    def loss(self, name, buf, running=None, loss_scale=None):
        if loss_scale is not None:
            raise NotImplementedError("the NumPy backend computes in float32 / float64 only, without loss scaling")
        xp, z = self.xp, buf.z
        buf.out[...] = losses.get_loss(name)(xp, z, buf.target, buf.delta, buf.row)
        if running is not None:
            running[0] += float(buf.out) * z.shape[0]
            if name == "cross_entropy":
                xp.argmax(z, axis=1, out=buf.pred)
                xp.argmax(buf.target, axis=1, out=buf.label)
                xp.equal(buf.pred, buf.label, out=buf.hit)
                running[1] += xp.count_nonzero(buf.hit)

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

    # ---- optimizers (maths in gpubackprop.optim) --------------------------------
    def sgd_update(self, update, h):
        p, g, steps = update.p, update.g, update.steps
        if update.found_inf is not None and update.found_inf[0]:
            return  # the divergence guard found Inf / NaN in g: skip, step count included
        xp = self.xp
        lr, momentum, dampening, weight_decay = h.lr, h.momentum, h.dampening, h.weight_decay
        buf = update.state[0] if momentum else None
        first = steps[0] == 0
        steps[0] += 1
        s = update.scratch[0]
        d = g  # read in place, never written: the model's gradients stay inspectable
        if weight_decay:
            xp.multiply(p, weight_decay, out=s)
            xp.add(s, g, out=s)
            d = s
        if momentum:
            if first:
                xp.copyto(buf, d)
            else:
                xp.multiply(buf, momentum, out=buf)
                if dampening:  # torch forbids nesterov with dampening, so d is not needed again
                    xp.multiply(d, 1.0 - dampening, out=s)
                    d = s
                xp.add(buf, d, out=buf)
            if h.nesterov:  # p -= lr (d + momentum buf), as two passes with no temporary
                xp.multiply(d, lr, out=s)
                xp.subtract(p, s, out=p)
                xp.multiply(buf, lr * momentum, out=s)
            else:
                xp.multiply(buf, lr, out=s)
        else:
            xp.multiply(d, lr, out=s)
        xp.subtract(p, s, out=p)

    def adam_update(self, update, h):
        p, g, (m, v), steps = update.p, update.g, update.state, update.steps
        if update.found_inf is not None and update.found_inf[0]:
            return
        xp = self.xp
        lr, beta1, beta2, weight_decay, decoupled = h.lr, h.beta1, h.beta2, h.weight_decay, h.decoupled
        steps[0] += 1
        step = int(steps[0])
        d, t = update.scratch
        if weight_decay and decoupled:
            xp.multiply(p, 1.0 - lr * weight_decay, out=p)
        if weight_decay and not decoupled:
            xp.multiply(p, weight_decay, out=d)
            xp.add(d, g, out=d)
        else:
            d = g
        xp.multiply(m, beta1, out=m)
        xp.multiply(d, 1.0 - beta1, out=t)
        xp.add(m, t, out=m)
        xp.multiply(v, beta2, out=v)
        xp.multiply(d, d, out=t)
        xp.multiply(t, 1.0 - beta2, out=t)
        xp.add(v, t, out=v)
        # torch's order of operations: denom = sqrt(v) / sqrt(1 - beta2^t) + eps,
        # p -= lr / (1 - beta1^t) * m / denom
        xp.sqrt(v, out=t)
        xp.divide(t, math.sqrt(1.0 - beta2**step), out=t)
        xp.add(t, h.eps, out=t)
        d = update.scratch[0]
        xp.divide(m, t, out=d)
        xp.multiply(d, lr / (1.0 - beta1**step), out=d)
        xp.subtract(p, d, out=p)

