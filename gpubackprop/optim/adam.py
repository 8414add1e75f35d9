"""Adam and AdamW (torch.optim.Adam / AdamW).

With parameters p, gradient g and step t = 1, 2, ...:

Adam(lr, betas=(b1, b2), eps, weight_decay=wd)   (L2: wd p is added to g)
AdamW(...)                                         (decoupled: p = p (1 - lr wd) first)
    m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
    p = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

As in sgd.py: the float64 ``reference``, the NumPy backend's ``numpy_update`` and
the arguments of ``adam_update`` in kernels/optimizers.cu, side by side.
"""

import math
from typing import NamedTuple

import numpy as np

from .base import Optimizer, check, check_flag


class AdamSettings(NamedTuple):
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool
    decay_biases: bool = True  # Optimizer.step spares the biases itself (add_scaled) where False


class Adam(Optimizer):
    state_names = ("exp_avg", "exp_avg_sq")
    n_scratch = 2
    kernel = "adam_update"
    decoupled = False
    examples = (dict(lr=1e-2), dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2))

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *, params=None, decay_biases=True):
        if self.decoupled and not decay_biases:
            raise ValueError("decay_biases=False spares the biases an L2 penalty (SGD, Adam); AdamW's decoupled "
                             "decay applies to every parameter")
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
        super().__init__(
            params,
            lr=check("lr", lr, low_open=True),
            betas=(check("beta1", beta1, high=1.0, high_open=True), check("beta2", beta2, high=1.0, high_open=True)),
            eps=check("eps", eps),
            weight_decay=check("weight_decay", weight_decay),
            **({} if self.decoupled else {"decay_biases": check_flag("decay_biases", decay_biases)}),
        )

    def settings(self):
        h = self.hyperparams
        return AdamSettings(h["lr"], h["betas"][0], h["betas"][1], h["eps"], h["weight_decay"], self.decoupled,
                            h.get("decay_biases", True))


    @staticmethod
    def reference(p, g, state, step, h):
        """One torch.optim.Adam (AdamW where decoupled) step in float64; returns (p, state)."""
        m, v = state
        if h.decoupled:
            p = p * (1 - h.lr * h.weight_decay)
        else:
            g = g + h.weight_decay * p
        m = h.beta1 * m + (1 - h.beta1) * g
        v = h.beta2 * v + (1 - h.beta2) * g * g
        m_hat, v_hat = m / (1 - h.beta1**step), v / (1 - h.beta2**step)
        return p - h.lr * m_hat / (np.sqrt(v_hat) + h.eps), (m, v)

    @staticmethod
    def numpy_update(xp, u, h):
        p, g, (m, v), steps = u.p, u.g, u.state, u.steps
        lr, beta1, beta2, weight_decay = h.lr, h.beta1, h.beta2, h.weight_decay
        steps[0] += 1
        step = int(steps[0])
        d, t = u.scratch
        if weight_decay and h.decoupled:
            xp.multiply(p, 1.0 - lr * weight_decay, out=p)
        if weight_decay and not h.decoupled:
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
        d = u.scratch[0]
        xp.divide(m, t, out=d)
        xp.multiply(d, lr / (1.0 - beta1**step), out=d)
        xp.subtract(p, d, out=p)

    @staticmethod
    def kernel_args(u, h, c):
        """adam_update's arguments up to the step count (``c``: the compute type)."""
        m, v = u.state
        return (u.p, u.g, m, v, np.int64(u.p.size)) + Adam.kernel_scalars(h, c)

    @staticmethod
    def kernel_scalars(h, c):
        """adam_update's hyperparameter arguments, after its arrays and n."""
        return (np.float64(h.lr), np.float64(h.beta1), np.float64(h.beta2), c(1.0 - h.beta1), c(1.0 - h.beta2),
                c(h.eps), c(h.weight_decay), c(1.0 - h.lr * h.weight_decay), np.int32(h.decoupled))


class AdamW(Adam):
    decoupled = True
    examples = (dict(lr=1e-2), dict(lr=1e-2, weight_decay=0.1))

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, params=None):
        super().__init__(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, params=params)
