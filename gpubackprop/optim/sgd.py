"""SGD with momentum, dampening, Nesterov and weight decay (torch.optim.SGD).

With parameters p, gradient g and step t = 1, 2, ...:

    d = g + wd p
    b = d at t = 1, else b = mu b + (1 - tau) d        (only when mu > 0)
    d = d + mu b if nesterov else b                    (only when mu > 0)
    p = p - lr d
"""

from typing import NamedTuple

from .base import Optimizer, check


class SGDSettings(NamedTuple):
    lr: float
    momentum: float
    dampening: float
    nesterov: bool
    weight_decay: float


class SGD(Optimizer):
    state_names = ("momentum_buffer",)
    primitive = "sgd_update"

    def __init__(self, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, *, params=None):
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
        )

    def settings(self):
        return SGDSettings(**self.hyperparams)
