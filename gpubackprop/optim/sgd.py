"""SGD with momentum, dampening, Nesterov and weight decay (torch.optim.SGD).

With parameters p, gradient g and step t = 1, 2, ...:

    d = g + wd p
    b = d at t = 1, else b = mu b + (1 - tau) d        (only when mu > 0)
    d = d + mu b if nesterov else b                    (only when mu > 0)
    p = p - lr d

The optimizer's three forms live here side by side, as llm.c keeps an op's: the
float64 textbook ``reference``, the NumPy backend's ``numpy_update`` (out= chains
over preallocated scratch), and the arguments of its kernel, ``sgd_update`` in
kernels/optimizers.cu (``kernel_args``).
"""

from typing import NamedTuple

import numpy as np

from .base import Optimizer, check, check_flag


class SGDSettings(NamedTuple):
    lr: float
    momentum: float
    dampening: float
    nesterov: bool
    weight_decay: float
    decay_biases: bool = True  # Optimizer.step spares the biases itself (add_scaled) where False


class SGD(Optimizer):
    state_names = ("momentum_buffer",)
    kernel = "sgd_update"
    examples = (dict(lr=0.1), dict(lr=0.1, momentum=0.9), dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
                dict(lr=0.1, momentum=0.5, dampening=0.3, weight_decay=1e-3))

    def __init__(self, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, *, params=None,
                 decay_biases=True):
        momentum = check("momentum", momentum)
        dampening = check("dampening", dampening, high=1.0)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum needs momentum > 0 and dampening = 0 (as in torch.optim.SGD)")
        if not momentum:
            self.state_names = ()
        super().__init__(
            params,
            lr=check("lr", lr, low_open=True),
            momentum=momentum,
            dampening=dampening,
            nesterov=bool(nesterov),
            weight_decay=check("weight_decay", weight_decay),
            decay_biases=check_flag("decay_biases", decay_biases),
        )

    def settings(self):
        return SGDSettings(**self.hyperparams)

    @staticmethod
    def reference(p, g, state, step, h):
        """One torch.optim.SGD step in float64, written to be read; returns (p, state)."""
        d = g + h.weight_decay * p
        if not h.momentum:
            return p - h.lr * d, state
        buf = d.copy() if step == 1 else h.momentum * state[0] + (1 - h.dampening) * d
        d = d + h.momentum * buf if h.nesterov else buf
        return p - h.lr * d, (buf,)

    @staticmethod
    def numpy_update(xp, u, h):
        p, g, steps, s = u.p, u.g, u.steps, u.scratch[0]
        lr, momentum, dampening, weight_decay = h.lr, h.momentum, h.dampening, h.weight_decay
        first = steps[0] == 0
        steps[0] += 1
        d = g  # read in place, never written: the model's gradients stay inspectable
        if weight_decay:
            xp.multiply(p, weight_decay, out=s)
            xp.add(s, g, out=s)
            d = s
        if momentum:
            buf = u.state[0]
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

    @staticmethod
    def kernel_args(u, h, c):
        """sgd_update's arguments up to the step count (``c``: the compute type)."""
        buf = u.state[0] if u.state else u.p  # unread without momentum
        return (u.p, u.g, buf, np.int64(u.p.size)) + SGD.kernel_scalars(h, c)

    @staticmethod
    def kernel_scalars(h, c):
        """sgd_update's hyperparameter arguments, after its arrays and n."""
        return (c(h.lr), c(h.momentum), c(1.0 - h.dampening), c(h.weight_decay), c(h.lr * h.momentum),
                np.int32(h.nesterov), np.int32(h.dampening != 0))
