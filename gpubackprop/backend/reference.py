"""The network's maths in plain float64 NumPy, written to be read, used only by tests.

Nothing here is fused, in place or fast: z is kept for every layer and g'(z) is
computed from z, so it checks the backends' tricks (g' from the activation,
buffers reused in place) rather than repeating them.
"""

import numpy as np

from ..nn.activations import get_activation


def activation(name, z):
    """g(z), from the activation table's float64 reference."""
    return get_activation(name).reference(z)


def activation_grad(name, z):
    """g'(z)."""
    return get_activation(name).reference_grad(z)


def loss_and_delta(name, z, y):
    """(L, dL/dz) for logits z (B, C) and dense targets y (B, C)."""
    B = z.shape[0]
    if name == "cross_entropy":
        lse = np.log(np.sum(np.exp(z - z.max(axis=1, keepdims=True)), axis=1)) + z.max(axis=1)
        log_q = z - lse[:, None]
        return -np.sum(y * log_q) / B, (np.exp(log_q) - y) / B
    if name == "mse":
        return np.mean((z - y) ** 2), 2.0 * (z - y) / z.size
    raise ValueError(name)


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
