"""Check a model's backpropagated gradients against finite differences."""

import warnings

import numpy as np

from ..nn.network import REFERENCE_DTYPE, Network
from ..nn.parameters import layout

_STEP = 1e-3


def gradcheck(model, X, y, eps=_STEP, sample_weight=None):
    """Max relative error of ``model.loss_and_grad`` against finite differences (of
    the loss weighted by ``sample_weight`` where given).

    Backprop runs in float64 on the CPU, on a copy of the model's parameters. The
    numerical gradient is the fourth-order central difference

        n_i = (-L(t + 2h e_i) + 8 L(t + h e_i) - 8 L(t - h e_i) + L(t - 2h e_i)) / (12 h)

    (error O(h^4) plus rounding near 1.5 eps L / h), evaluated in np.longdouble
    (80-bit, eps ~1e-19, on x86-64; plain float64 where the platform has no wider
    type), so that its rounding stays far below 1e-7 even for the tiny gradients of
    deep sigmoid stacks or of layers behind a width-1 bottleneck.
    For each parameter tensor t (every W_l and every b_l), with backprop gradient a:

        err_t = max_i |a_i - n_i| / max(max_i |a_i|, max_i |n_i|)    (0 when both are 0)

    and the result is the max over t. Measuring against each tensor's largest entry,
    not entry by entry, keeps the difference quotient's own rounding from swamping
    the relative error of entries much smaller than their neighbours.

    ReLU and leaky ReLU have a kink at z = 0 where L has no derivative, and so do
    mae (at z = y) and huber (at |z - y| = delta). A parameter whose perturbation
    flips the sign of any hidden pre-activation, or moves an output onto another
    piece of the loss, is left out (a RuntimeWarning says how many); random inputs
    make this rare.
    """
    analytic = _backprop(_copy(model, "float64"), X, y, sample_weight).astype(np.longdouble)
    numeric, at_kink = _differences(_copy(model, REFERENCE_DTYPE), X, y, eps, sample_weight)
    if at_kink.any():
        warnings.warn(f"gradcheck: {at_kink.sum()} parameter(s) sit at a ReLU kink or a kink of the loss and "
                      "were not compared", RuntimeWarning, stacklevel=2)
    worst = 0.0
    for w, b, _, _ in layout(model.sizes):
        for sl in (w, b):
            keep = ~at_kink[sl]
            a, n = analytic[sl][keep], numeric[sl][keep]
            scale = max(np.abs(a).max(initial=0.0), np.abs(n).max(initial=0.0))
            if scale > 0:
                worst = max(worst, float(np.abs(a - n).max() / scale))
    return worst


def _backprop(net, X, y, sample_weight):
    """The flat gradient of the engine's backward pass."""
    ws = net.load_batch(X, y, sample_weight)
    net.forward_pass(ws)
    net.compute_loss(ws)
    net.backward_pass(ws)
    return net.grads


def _differences(m, X, y, eps, sample_weight):
    """(the flat fourth-order difference quotients, where a perturbation crossed a kink)."""
    ws = m.load_batch(X, y, sample_weight)
    piece = m.criterion.piece

    def loss():
        m.forward_pass(ws)
        return m.compute_loss(ws)[()]  # a scalar copy: the workspace's loss buffer is reused

    def sides():  # which side of every kink the batch is on
        kinks = [] if m.act.smooth else [h > 0 for h in ws.a[1:-1]]
        return kinks + ([] if piece is None else [piece(ws.a[-1], ws.target, m.criterion.delta)])

    loss()
    signs = sides()
    p = m.params
    numeric = np.empty_like(p)
    at_kink = np.zeros(p.shape, bool)
    for i in range(p.size):
        saved = p[i]
        values = []
        for k in (2, 1, -1, -2):
            p[i] = saved + k * eps
            values.append(loss())
            at_kink[i] |= any(not np.array_equal(now, then) for now, then in zip(sides(), signs))
        p[i] = saved
        # Differences first: a parameter with no effect gives exactly 0, not a rounding residue.
        numeric[i] = (8.0 * (values[1] - values[2]) - (values[0] - values[3])) / (12.0 * eps)
    return numeric, at_kink


def _copy(model, dtype):
    """A CPU copy of ``model``'s network computing in ``dtype`` (float64, or longdouble
    for the difference quotients)."""
    m = Network(model.sizes, model.activation, model.loss, device="cpu", dtype=dtype,
                huber_delta=model.criterion.delta)
    m.load_state_dict({k: v.astype(dtype) for k, v in model.state_dict().items()})
    return m
