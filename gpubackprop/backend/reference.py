"""The network's maths in plain float64 NumPy, written to be read, used only by tests.

Nothing here is fused, in place or fast: z is kept for every layer and g'(z) is
computed from z, so it checks the backends' tricks (g' from the activation,
buffers reused in place) rather than repeating them.
"""

import numpy as np

from ..nn.activations import get_activation
from ..nn.losses import get_loss


def activation(name, z):
    """g(z), from the activation table's float64 reference."""
    return get_activation(name).reference(z)


def activation_grad(name, z):
    """g'(z)."""
    return get_activation(name).reference_grad(z)


def loss_and_delta(name, z, y, weight=None, huber_delta=1.0):
    """(L, dL/dz) for logits z (B, C), dense targets y (B, C) and, where given, the rows'
    sample weights: the loss table's float64 reference, averaged as losses.py says."""
    loss = get_loss(name, huber_delta)
    f, g = loss.reference(z, y, loss.delta)
    if loss.elementwise:  # the row's loss is the mean over its elements
        f, g = f.mean(axis=1), g / z.shape[1]
    s = np.full(z.shape[0], 1.0 / z.shape[0]) if weight is None else np.asarray(weight, float) / np.sum(weight)
    return s @ f, g * s[:, None]


def backprop(weights, biases, X, y, activation_name, loss_name):
    """(loss, [dL/dW_l], [dL/db_l]) for one batch, from the textbook equations."""
    a = [np.asarray(X, float)]
    zs = []
    L = len(weights)
    for l, (W, b) in enumerate(zip(weights, biases), start=1):
        z = a[-1] @ W.T + b
        zs.append(z)
        a.append(activation(activation_name, z) if l < L else z)
    loss, delta = loss_and_delta(loss_name, a[-1], np.asarray(y, float))
    dWs, dbs = [None] * L, [None] * L
    for l in range(L, 0, -1):
        dWs[l - 1] = delta.T @ a[l - 1]
        dbs[l - 1] = delta.sum(axis=0)
        if l > 1:
            delta = (delta @ weights[l - 1]) * activation_grad(activation_name, zs[l - 2])
    return loss, dWs, dbs
