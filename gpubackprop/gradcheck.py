"""Check a model's backpropagated gradients against central finite differences."""

import numpy as np

_STEP = 1e-6


def gradcheck(model, X, y, eps=_STEP):
    """Max relative error of ``model.loss_and_grad`` against central differences.

    Both run in float64 on the CPU, on a copy of the model's parameters. For each
    parameter tensor t (every W_l and every b_l) with backprop gradient a and
    numerical gradient n_i = (L(theta + eps e_i) - L(theta - eps e_i)) / (2 eps):

        err_t = max_i |a_i - n_i| / max(max_i |a_i|, max_i |n_i|)    (0 when both are 0)

    and the result is max over t. The error is measured against each tensor's
    largest entry rather than entry by entry: the difference quotient itself has an
    absolute rounding error near eps_machine * L / eps (~1e-10), which would swamp the
    relative error of entries much smaller than their neighbours.

    At a kink of ReLU (z within eps of 0) the loss is not differentiable and the two
    can disagree; random inputs make that unlikely at this step size.
    """
    from .model import MLP

    m = MLP(model.sizes, model.activation, model.loss, device="cpu", dtype="float64")
    m.load_state_dict(model.state_dict())
    ws = m._load_batch(*m._prepare(X, y))

    def loss():
        m._forward(ws)
        return float(m._loss(ws))

    loss()
    m._backward(ws)
    analytic = m._grads.copy()
    numeric = np.empty_like(analytic)
    p = m._params
    for i in range(p.size):
        saved = p[i]
        p[i] = saved + eps
        up = loss()
        p[i] = saved - eps
        down = loss()
        p[i] = saved
        numeric[i] = (up - down) / (2.0 * eps)
    worst = 0.0
    for w, b, _, _ in m._layout():
        for sl in (w, b):
            a, n = analytic[sl], numeric[sl]
            scale = max(np.abs(a).max(), np.abs(n).max())
            if scale > 0:
                worst = max(worst, float(np.abs(a - n).max() / scale))
    return worst
