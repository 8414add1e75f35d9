"""Hidden-layer activations a = g(z), each with its derivative g'(.) for backprop.

The backward pass of a dense layer forms delta_l = dL/da_l * g'(z_l). For every
activation here except GELU, g'(z) is a function of the output a = g(z) alone, so
the forward pass keeps only activations (for ReLU the mask is a > 0):

    relu        a = max(z, 0)                      g' = [a > 0]
    leaky_relu  a = max(z, s z)                    g' = 1 if a > 0 else s   (s = 0.01)
    tanh        a = tanh z                         g' = 1 - a^2
    sigmoid     a = 1 / (1 + e^-z)                 g' = a (1 - a)
    gelu        a = z/2 (1 + t), t = tanh u,       g' = (1 + t) (1/2 + (1 - t) r),
                u = c (z + k z^3)                  r = c/2 z (1 + 3 k z^2)
    silu        a = z s, s = 1 / (1 + e^-z)        g' = s (1 + z (1 - s))     (swish)
    identity    a = z                              g' = 1

(c = sqrt(2/pi), k = 0.044715.) GELU and SiLU are not invertible, so their layers
also keep z. GELU is the tanh form, PyTorch's ``gelu(approximate="tanh")``.

This module is the one table of activations: each row holds the name, the kernels'
code (the ``ACT_*`` enum of kernels/common.cuh, which a test holds to this table
with the constants), g and g' for the NumPy backend, a float64 textbook g and g'
for the tests, g' as trace prints it, and PyTorch's module for the comparisons. A
new activation is a row here and its two lines in kernels/common.cuh.

The NumPy functions take an array module ``xp`` (NumPy or CuPy) and write into ``out=``
buffers, so they allocate nothing. Constants are Python floats, which NumPy 2
treats as "weak" scalars: float32 arrays stay float32.
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

LEAKY_SLOPE = 0.01
GELU_C = math.sqrt(2.0 / math.pi)
GELU_K = 0.044715


@dataclass(frozen=True)
class Activation:
    """One activation: its kernel code, g and g' (fused NumPy forms and float64 references).

    forward(xp, z, out, scratch): out = g(z). ``out`` may be ``z`` itself unless
        ``needs_z`` (then z is kept for the backward pass).
    backward(xp, grad, a, z, scratch): grad *= g'(.) in place, turning dL/da into
        delta. ``z`` is None unless ``needs_z``. None means g' = 1.
    scratch: a tuple of ``n_scratch`` buffers shaped like ``out``.
    """

    name: str
    code: int  # ACT_<NAME> in kernels/common.cuh
    forward: Callable
    backward: Optional[Callable]
    reference: Callable  # g(z), float64, written for reading
    reference_grad: Callable  # g'(z), likewise
    grad_formula: str  # g' as trace prints it
    torch: tuple  # (torch.nn module name, its keyword arguments): the same function in PyTorch
    constants: tuple = ()  # (name, value) pairs kernels/common.cuh #defines
    needs_z: bool = False
    n_scratch: int = 1
    he_init: bool = False  # He init for the ReLU family, Glorot otherwise
    smooth: bool = True  # False where g' jumps at z = 0 (the ReLU family)


def _relu_fwd(xp, z, out, scratch):
    xp.maximum(z, 0.0, out=out)


def _relu_bwd(xp, grad, a, z, scratch):
    mask = scratch[0]
    xp.greater(a, 0.0, out=mask)
    xp.multiply(grad, mask, out=grad)


def _leaky_fwd(xp, z, out, scratch):
    sz = scratch[0]
    xp.multiply(z, LEAKY_SLOPE, out=sz)
    xp.maximum(z, sz, out=out)


def _leaky_bwd(xp, grad, a, z, scratch):
    d = scratch[0]
    xp.greater(a, 0.0, out=d)  # 1 where a > 0, else 0
    xp.multiply(d, 1.0 - LEAKY_SLOPE, out=d)
    xp.add(d, LEAKY_SLOPE, out=d)
    xp.multiply(grad, d, out=grad)


def _tanh_fwd(xp, z, out, scratch):
    xp.tanh(z, out=out)


def _tanh_bwd(xp, grad, a, z, scratch):
    d = scratch[0]
    xp.multiply(a, a, out=d)
    xp.subtract(1.0, d, out=d)
    xp.multiply(grad, d, out=grad)


def _sigmoid_fwd(xp, z, out, scratch):
    # sigma(z) = (1 + tanh(z/2)) / 2: no exp, so no overflow warning for large |z|.
    xp.multiply(z, 0.5, out=out)
    xp.tanh(out, out=out)
    xp.multiply(out, 0.5, out=out)
    xp.add(out, 0.5, out=out)


def _sigmoid_bwd(xp, grad, a, z, scratch):
    d = scratch[0]
    xp.subtract(1.0, a, out=d)
    xp.multiply(d, a, out=d)
    xp.multiply(grad, d, out=grad)


def _gelu_t(xp, z, out):
    """out = t = tanh(c z (1 + k z^2))."""
    xp.multiply(z, z, out=out)
    xp.multiply(out, GELU_K, out=out)
    xp.add(out, 1.0, out=out)
    xp.multiply(out, z, out=out)
    xp.multiply(out, GELU_C, out=out)
    xp.tanh(out, out=out)


def _gelu_fwd(xp, z, out, scratch):
    _gelu_t(xp, z, out)
    xp.add(out, 1.0, out=out)
    xp.multiply(out, z, out=out)
    xp.multiply(out, 0.5, out=out)


def _gelu_bwd(xp, grad, a, z, scratch):
    s, r = scratch
    _gelu_t(xp, z, s)
    xp.multiply(z, z, out=r)  # r = c/2 z (1 + 3k z^2)
    xp.multiply(r, 3.0 * GELU_K, out=r)
    xp.add(r, 1.0, out=r)
    xp.multiply(r, z, out=r)
    xp.multiply(r, 0.5 * GELU_C, out=r)
    xp.subtract(1.0, s, out=s)  # s = 1 - t
    xp.multiply(r, s, out=r)
    xp.add(r, 0.5, out=r)
    xp.subtract(2.0, s, out=s)  # s = 1 + t
    xp.multiply(r, s, out=r)
    xp.multiply(grad, r, out=grad)


def _silu_fwd(xp, z, out, scratch):
    _sigmoid_fwd(xp, z, out, scratch)
    xp.multiply(out, z, out=out)


def _silu_bwd(xp, grad, a, z, scratch):
    s, r = scratch
    _sigmoid_fwd(xp, z, s, None)
    xp.subtract(1.0, s, out=r)  # r = s (1 + z (1 - s))
    xp.multiply(r, z, out=r)
    xp.add(r, 1.0, out=r)
    xp.multiply(r, s, out=r)
    xp.multiply(grad, r, out=grad)


def _identity_fwd(xp, z, out, scratch):
    if out is not z:
        xp.copyto(out, z)


def _ref_sigmoid(z):
    return np.exp(-np.logaddexp(0.0, -z))  # 1 / (1 + e^-z) without overflow


def _ref_gelu_t(z):
    return np.tanh(GELU_C * (z + GELU_K * z**3))


ACTIVATIONS = {
    a.name: a
    for a in (
        Activation("identity", 0, _identity_fwd, None, lambda z: z, np.ones_like, "1", ("Identity", {}),
                   n_scratch=0),
        Activation("relu", 1, _relu_fwd, _relu_bwd, lambda z: np.maximum(z, 0.0), lambda z: (z > 0).astype(float),
                   "1 if z > 0 else 0", ("ReLU", {}), he_init=True, smooth=False),
        Activation("leaky_relu", 2, _leaky_fwd, _leaky_bwd, lambda z: np.where(z > 0, z, LEAKY_SLOPE * z),
                   lambda z: np.where(z > 0, 1.0, LEAKY_SLOPE), f"1 if z > 0 else {LEAKY_SLOPE}",
                   ("LeakyReLU", {"negative_slope": LEAKY_SLOPE}), (("LEAKY_SLOPE", LEAKY_SLOPE),),
                   he_init=True, smooth=False),
        Activation("tanh", 3, _tanh_fwd, _tanh_bwd, np.tanh, lambda z: 1.0 - np.tanh(z) ** 2, "1 - a^2",
                   ("Tanh", {})),
        Activation("sigmoid", 4, _sigmoid_fwd, _sigmoid_bwd, _ref_sigmoid,
                   lambda z: _ref_sigmoid(z) * (1.0 - _ref_sigmoid(z)), "a (1 - a)", ("Sigmoid", {})),
        Activation("gelu", 5, _gelu_fwd, _gelu_bwd, lambda z: 0.5 * z * (1.0 + _ref_gelu_t(z)),
                   lambda z: 0.5 * (1.0 + _ref_gelu_t(z))
                   + 0.5 * z * (1.0 - _ref_gelu_t(z) ** 2) * GELU_C * (1.0 + 3.0 * GELU_K * z**2),
                   "(1 + t) (1/2 + (1 - t) r)  (t, r: see gpubackprop.nn.activations)",
                   ("GELU", {"approximate": "tanh"}), (("GELU_C", GELU_C), ("GELU_K", GELU_K)),
                   needs_z=True, n_scratch=2),
        Activation("silu", 6, _silu_fwd, _silu_bwd, lambda z: z * _ref_sigmoid(z),
                   lambda z: _ref_sigmoid(z) * (1.0 + z * (1.0 - _ref_sigmoid(z))),
                   "s (1 + z (1 - s)),  s = sigmoid(z)",
                   ("SiLU", {}), needs_z=True, n_scratch=2, he_init=True),
    )
}
IDENTITY = ACTIVATIONS["identity"]


def get_activation(name):
    """The Activation called ``name``; a ValueError listing the choices otherwise."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}"
        ) from None
