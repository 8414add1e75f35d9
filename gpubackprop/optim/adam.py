"""Adam and AdamW (torch.optim.Adam / AdamW).

With parameters p, gradient g and step t = 1, 2, ...:

Adam(lr, betas=(b1, b2), eps, weight_decay=wd)   (L2: wd p is added to g)
AdamW(...)                                         (decoupled: p = p (1 - lr wd) first)
    m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
    p = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
"""

from typing import NamedTuple

from .base import Optimizer, check


class AdamSettings(NamedTuple):
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool


class Adam(Optimizer):
    state_names = ("exp_avg", "exp_avg_sq")
    n_scratch = 2
    primitive = "adam_update"
    decoupled = False

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *, params=None):
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
        )

    def settings(self):
        h = self.hyperparams
        return AdamSettings(h["lr"], h["betas"][0], h["betas"][1], h["eps"], h["weight_decay"], self.decoupled)


class AdamW(Adam):
    decoupled = True

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, params=None):
        super().__init__(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, params=params)
