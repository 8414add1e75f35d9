"""Each NumPy-backend primitive against the float64 reference, on fresh random
inputs with odd sizes, outputs poisoned with NaN so an unwritten element fails."""

import numpy as np
import pytest

from gpubackprop.backend import Dense, DenseBuffers, LossBuffers, Update
from gpubackprop.backend import reference as ref
from gpubackprop.backend.cpu import NumpyBackend
from gpubackprop.nn.activations import ACTIVATIONS
from gpubackprop.optim.adam import AdamSettings
from gpubackprop.optim.sgd import SGDSettings

TOL = {np.float32: 2e-5, np.float64: 1e-12}
SHAPES = [(1, 1, 1), (3, 5, 7), (33, 17, 65), (64, 128, 10)]  # (batch, n_in, n_out)


def poisoned(shape, dtype):
    return np.full(shape, np.nan, dtype)


def close(actual, expected, dtype):
    np.testing.assert_allclose(actual, expected, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_dense_forward_and_backward_match_reference(name, shape, dtype, rng):
    B, n_in, n_out = shape
    act = ACTIVATIONS[name]
    be = NumpyBackend()
    a_prev = rng.standard_normal((B, n_in)).astype(dtype)
    W = rng.standard_normal((n_out, n_in)).astype(dtype) / np.sqrt(n_in)
    b = rng.standard_normal(n_out).astype(dtype)
    out = poisoned((B, n_out), dtype)
    z = poisoned((B, n_out), dtype) if act.needs_z else None
    scratch = tuple(poisoned((B, n_out), dtype) for _ in range(act.n_scratch))
    grad = poisoned((B, n_out), dtype)
    dW, db, grad_prev = poisoned((n_out, n_in), dtype), poisoned(n_out, dtype), poisoned((B, n_in), dtype)
    layer = Dense(W, b, dW, db, act)
    buf = DenseBuffers(a_prev, out, z, grad, grad_prev, scratch, np.ones(B, dtype))
    be.dense_forward(layer, buf)
    z_ref = a_prev.astype(float) @ W.T.astype(float) + b
    close(out, ref.activation(name, z_ref), dtype)

    grad[...] = rng.standard_normal((B, n_out))
    delta_ref = grad * ref.activation_grad(name, z_ref)
    be.dense_backward(layer, buf)
    close(grad, delta_ref, dtype)
    close(db, delta_ref.sum(axis=0), dtype)
    close(dW, delta_ref.T @ a_prev, dtype)
    close(grad_prev, delta_ref @ W, dtype)


@pytest.mark.parametrize("name", sorted(n for n, a in ACTIVATIONS.items() if not a.needs_z))
def test_forward_in_place_where_allowed(name, rng):
    """The model passes z as out (no separate z buffer) unless the activation needs z."""
    act = ACTIVATIONS[name]
    z = rng.standard_normal((7, 9))
    expected = ref.activation(name, z)
    act.forward(np, z, z, tuple(np.empty_like(z) for _ in range(act.n_scratch)))
    close(z, expected, np.float64)


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "gelu"])
def test_saturating_activations_stay_finite_and_quiet(name):
    z = np.array([[-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4]], np.float32)
    out = np.empty_like(z)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        ACTIVATIONS[name].forward(np, z, out, (np.empty_like(z),) * 2)
    assert np.isfinite(out).all()
    close(out, ref.activation(name, z.astype(float)).astype(np.float32), np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B,C", [(1, 1), (5, 3), (37, 10)])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("targets", ["onehot", "soft"])
def test_losses_match_reference(loss, targets, B, C, dtype, rng):
    z = (rng.standard_normal((B, C)) * 3).astype(dtype)
    if targets == "onehot":
        y = np.eye(C)[rng.integers(0, C, B)]
    else:
        y = rng.random((B, C))
        y /= y.sum(axis=1, keepdims=True)
    y = y.astype(dtype)
    delta, value, running = poisoned((B, C), dtype), poisoned((), dtype), np.array([1.5, 2.0])
    NumpyBackend().loss(loss, loss_buffers(z, y, delta, value), running)
    expected, delta_ref = ref.loss_and_delta(loss, z.astype(float), y.astype(float))
    close(value, expected, dtype)
    close(delta, delta_ref, dtype)
    close(running[0], 1.5 + B * expected, dtype)
    hits = (z.argmax(1) == y.argmax(1)).sum() if loss == "cross_entropy" else 0
    assert running[1] == 2.0 + hits


def loss_buffers(z, y, delta, value):
    B = z.shape[0]
    return LossBuffers(z, y, delta, value, poisoned(B, z.dtype), np.empty(B, np.int64), np.empty(B, np.int64),
                       np.empty(B, bool))


def test_cross_entropy_is_stable_for_huge_logits():
    z = np.array([[1e4, 0.0, -1e4], [-3e4, -3e4 + 1.0, -3e4]], np.float32)
    y = np.eye(3, dtype=np.float32)[[0, 1]]
    delta, value = np.empty_like(z), np.empty((), np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        NumpyBackend().loss("cross_entropy", loss_buffers(z, y, delta, value))
    expected, delta_ref = ref.loss_and_delta("cross_entropy", z.astype(float), y.astype(float))
    assert np.isfinite(value) and np.isfinite(delta).all()
    close(value, expected, np.float32)
    close(delta, delta_ref, np.float32)


def test_softmax_rows_sum_to_one(rng):
    z = rng.standard_normal((11, 7)) * 50
    out, row = poisoned(z.shape, float), poisoned(11, float)
    NumpyBackend().softmax(z, out, row)
    close(out, np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True), np.float64)


SGD_CASES = [
    dict(momentum=0.0),
    dict(momentum=0.9),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.8, dampening=0.3, weight_decay=1e-2),
    dict(momentum=0.0, weight_decay=0.1),
]


@pytest.mark.parametrize("hyper", SGD_CASES)
def test_sgd_update_matches_reference_over_steps(hyper, rng):
    n = 1001
    p = rng.standard_normal(n)
    buf, scratch = poisoned(n, float), poisoned(n, float)
    p_ref, buf_ref = p.copy(), None
    steps = np.zeros(1, np.uint32)
    for step in range(1, 5):
        g = rng.standard_normal(n)
        full = dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0) | hyper
        state = (buf,) if full["momentum"] else ()
        NumpyBackend().sgd_update(Update(p, g, state, (scratch,), steps), SGDSettings(lr=0.05, **full))
        assert steps[0] == step
        p_ref, buf_ref = ref.sgd(p_ref, g, buf_ref, step, 0.05, **hyper)
        close(p, p_ref, np.float64)


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_adam_update_matches_reference_over_steps(decoupled, weight_decay, rng):
    n = 777
    p = rng.standard_normal(n)
    m, v = np.zeros(n), np.zeros(n)
    scratch = (poisoned(n, float), poisoned(n, float))
    p_ref, m_ref, v_ref = p.copy(), m.copy(), v.copy()
    steps = np.zeros(1, np.uint32)
    for step in range(1, 6):
        g = rng.standard_normal(n)
        NumpyBackend().adam_update(Update(p, g, (m, v), scratch, steps),
                                   AdamSettings(1e-2, 0.9, 0.99, 1e-8, weight_decay, decoupled))
        p_ref, m_ref, v_ref = ref.adam(p_ref, g, m_ref, v_ref, step, 1e-2, (0.9, 0.99), 1e-8, weight_decay, decoupled)
        close(p, p_ref, np.float64)


def test_gather_rows(rng):
    src = rng.standard_normal((20, 3))
    index = rng.permutation(20)[:7]
    out = poisoned((7, 3), float)
    NumpyBackend().gather_rows(src, index, out)
    np.testing.assert_array_equal(out, src[index])
