"""The CPU backend: NumPy ufuncs with ``out=`` buffers and BLAS for every product.

This is the CPU product, not a fallback of convenience, so it follows three rules:
no allocation inside a step (every result goes into a buffer made for its batch
size), every matrix product (and the bias-gradient reduction, as a GEMV with a
ones vector, 2x faster than ``sum(axis=0)``) goes to BLAS, and no float64 leaks
into float32 work (scalars are Python floats, which NumPy 2 keeps "weak").

The primitives are written against ``self.xp``. The CUDA backend (through
``kernel_backend``) replaces the fused ones with kernels of its own and keeps
these for the rest (softmax for predict_proba), run through CuPy.
"""

import contextlib
import math

import numpy as np

from .. import losses
from ..dropout import keep_mask
from . import Backend


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
    def dense_forward(self, a_prev, W, b, act, out, z, scratch, dropout=None):
        xp = self.xp
        zbuf = out if z is None else z
        xp.matmul(a_prev, W.T, out=zbuf)
        xp.add(zbuf, b, out=zbuf)
        act.forward(xp, zbuf, out, scratch)
        if dropout is not None:
            xp.multiply(out, self._dropout_factor(dropout, out), out=dropout.dropped)

    def dense_backward(self, grad, a, z, a_prev, W, act, scratch, dW, db, grad_prev, ones, dropout=None):
        xp = self.xp
        if dropout is not None:
            xp.multiply(grad, self._dropout_factor(dropout, grad), out=grad)
        if act.backward is not None:
            act.backward(xp, grad, a, z, scratch)
        xp.matmul(ones, grad, out=db)
        xp.matmul(grad.T, a_prev, out=dW)
        if grad_prev is not None:
            xp.matmul(grad, W, out=grad_prev)

    @staticmethod
    def _dropout_factor(spec, like):
        """mask / (1 - p) in like's dtype (a temporary: dropout on the CPU allocates)."""
        mask = keep_mask(spec, like.shape, int(spec.steps[0]))
        return mask.astype(like.dtype) * like.dtype.type(spec.scale)

    def loss(self, name, z, y, delta, out, running, scratch, loss_scale=None):
        if loss_scale is not None:
            raise NotImplementedError("the NumPy backend computes in float32 / float64 only, without loss scaling")
        xp = self.xp
        row, pred, label, hit = scratch
        out[...] = losses.get_loss(name)(xp, z, y, delta, row)
        if running is not None:
            running[0] += float(out) * z.shape[0]
            if name == "cross_entropy":
                xp.argmax(z, axis=1, out=pred)
                xp.argmax(y, axis=1, out=label)
                xp.equal(pred, label, out=hit)
                running[1] += xp.count_nonzero(hit)

    def softmax(self, z, out, row):
        losses.softmax(self.xp, z, out, row)

    def clip_by_global_norm(self, g, max_norm):
        coef = max_norm / (math.sqrt(float(self.xp.vdot(g, g))) + 1e-6)
        if coef < 1.0:
            self.xp.multiply(g, coef, out=g)

    def flag_nonfinite(self, g, flag):
        if not self.xp.isfinite(g).all():
            flag[0] = 1

    def count_nonfinite(self, flag, count, first_bad, steps):
        if flag[0]:
            if count[0] == 0:
                first_bad[0] = steps[0]
            count[0] += 1
        flag[0] = 0

    # ---- optimizers (maths in gpubackprop.optim) --------------------------------
    def sgd_update(self, p, g, buf, scratch, steps, *, lr, momentum, dampening, nesterov, weight_decay,
                   found_inf=None):
        if found_inf is not None and found_inf[0]:
            return  # the divergence guard found Inf / NaN in g: skip, step count included
        xp = self.xp
        first = steps[0] == 0
        steps[0] += 1
        s = scratch
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
            if nesterov:  # p -= lr (d + momentum buf), as two passes with no temporary
                xp.multiply(d, lr, out=s)
                xp.subtract(p, s, out=p)
                xp.multiply(buf, lr * momentum, out=s)
            else:
                xp.multiply(buf, lr, out=s)
        else:
            xp.multiply(d, lr, out=s)
        xp.subtract(p, s, out=p)

    def adam_update(self, p, g, m, v, scratch, steps, *, lr, beta1, beta2, eps, weight_decay, decoupled,
                    found_inf=None):
        if found_inf is not None and found_inf[0]:
            return
        xp = self.xp
        steps[0] += 1
        step = int(steps[0])
        d, t = scratch
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
        xp.add(t, eps, out=t)
        d = scratch[0]
        xp.divide(m, t, out=d)
        xp.multiply(d, lr / (1.0 - beta1**step), out=d)
        xp.subtract(p, d, out=p)

