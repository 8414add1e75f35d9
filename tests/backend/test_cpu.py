"""Each CPU-backend primitive against the float64 reference, on fresh random
inputs with odd sizes, outputs poisoned with NaN so an unwritten element fails:
one body for the NumPy backend and for its fused loops (cpu_fused, where numba is
installed), as CuPy's tests run one body on NumPy and CuPy."""

import numpy as np
import pytest

from gpubackprop.backend import Dense, DenseBuffers, FusedCpuBackend, LossBuffers
from gpubackprop.backend import reference as ref
from gpubackprop.backend.cpu import NumpyBackend
from gpubackprop.nn import losses
from gpubackprop.nn.activations import ACTIVATIONS
from gpubackprop.optim import OPTIMIZERS, SGD, Update

TOL = {np.float32: 2e-5, np.float64: 1e-12}
SHAPES = [(1, 1, 1), (3, 5, 7), (33, 17, 65), (64, 128, 10)]  # (batch, n_in, n_out)


CPU_BACKENDS = [NumpyBackend(), pytest.param(FusedCpuBackend and FusedCpuBackend(), id="FusedCpuBackend",
                                              marks=pytest.mark.skipif(FusedCpuBackend is None, reason="needs numba"))]


@pytest.fixture(params=CPU_BACKENDS, ids=lambda b: type(b).__name__)
def cpu(request):
    return request.param


def poisoned(shape, dtype):
    return np.full(shape, np.nan, dtype)


def close(actual, expected, dtype):
    np.testing.assert_allclose(actual, expected, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_dense_forward_and_backward_match_reference(name, shape, dtype, rng, cpu):
    B, n_in, n_out = shape
    act = ACTIVATIONS[name]
    be = cpu
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
def test_losses_match_reference(loss, targets, B, C, dtype, rng, cpu):
    z = (rng.standard_normal((B, C)) * 3).astype(dtype)
    if targets == "onehot":
        y = np.eye(C)[rng.integers(0, C, B)]
    else:
        y = rng.random((B, C))
        y /= y.sum(axis=1, keepdims=True)
    y = y.astype(dtype)
    delta, value, running = poisoned((B, C), dtype), poisoned((), dtype), np.array([1.5, 2.0])
    cpu.loss(losses.get_loss(loss), loss_buffers(z, y, delta, value), running)
    expected, delta_ref = ref.loss_and_delta(loss, z.astype(float), y.astype(float))
    close(value, expected, dtype)
    close(delta, delta_ref, dtype)
    close(running[0], 1.5 + B * expected, dtype)
    hits = (z.argmax(1) == y.argmax(1)).sum() if loss == "cross_entropy" else 0
    assert running[1] == 2.0 + hits


def loss_buffers(z, y, delta, value):
    return LossBuffers(z, y, delta, value, poisoned(z.shape[0], z.dtype))


def test_cross_entropy_is_stable_for_huge_logits(cpu):
    z = np.array([[1e4, 0.0, -1e4], [-3e4, -3e4 + 1.0, -3e4]], np.float32)
    y = np.eye(3, dtype=np.float32)[[0, 1]]
    delta, value = np.empty_like(z), np.empty((), np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        cpu.loss(losses.get_loss("cross_entropy"), loss_buffers(z, y, delta, value))
    expected, delta_ref = ref.loss_and_delta("cross_entropy", z.astype(float), y.astype(float))
    assert np.isfinite(value) and np.isfinite(delta).all()
    close(value, expected, np.float32)
    close(delta, delta_ref, np.float32)


def test_softmax_rows_sum_to_one(rng):
    z = rng.standard_normal((11, 7)) * 50
    out, row = poisoned(z.shape, float), poisoned(11, float)
    losses.softmax(np, z, out, row)
    close(out, np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True), np.float64)


RULES = [(name, h) for name, rule in OPTIMIZERS.items() for h in rule.examples]


@pytest.mark.parametrize("name,hyper", RULES, ids=[f"{n}-{h}" for n, h in RULES])
def test_optimizer_update_matches_reference_over_steps(name, hyper, rng, cpu):
    """Every row of the optimizer table: its NumPy update against its float64 reference."""
    n = 1001
    opt = OPTIMIZERS[name](**hyper)
    h = opt.settings()
    p = rng.standard_normal(n)
    state = tuple(np.zeros(n) for _ in opt.state_names)
    scratch = tuple(poisoned(n, float) for _ in range(opt.n_scratch))
    p_ref, state_ref = p.copy(), tuple(s.copy() for s in state)
    steps = np.zeros(1, np.uint32)
    for step in range(1, 6):
        g = rng.standard_normal(n)
        cpu.optimizer_update(type(opt), Update(p, g, state, scratch, steps), h)
        assert steps[0] == step
        p_ref, state_ref = opt.reference(p_ref, g, state_ref, step, h)
        close(p, p_ref, np.float64)
        for got, want in zip(state, state_ref):
            close(got, want, np.float64)


def test_a_flagged_update_is_skipped_count_included(rng, cpu):
    p, g = rng.standard_normal(7), rng.standard_normal(7)
    before, steps = p.copy(), np.zeros(1, np.uint32)
    opt = SGD(0.1)
    cpu.optimizer_update(SGD, Update(p, g, (), (np.empty(7),), steps, np.ones(1, np.uint32)), opt.settings())
    np.testing.assert_array_equal(p, before)
    assert steps[0] == 0


def test_gather_rows(rng, cpu):
    src = rng.standard_normal((20, 3))
    index = rng.permutation(20)[:7]
    out = poisoned((7, 3), float)
    cpu.gather_rows(src, index, out)
    np.testing.assert_array_equal(out, src[index])


@pytest.mark.parametrize("name,hyper", RULES, ids=[f"{n}-{h}" for n, h in RULES])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_an_update_flags_parameters_it_made_non_finite(name, hyper, dtype, rng, cpu):
    """The divergence guard's check after the update: finite gradients times a huge
    step overflow the parameters; the update says so, and only then."""
    n = 1001
    rule = OPTIMIZERS[name]
    opt = rule(**hyper)
    p = rng.standard_normal(n).astype(dtype)
    state = tuple(np.zeros(n, dtype) for _ in opt.state_names)
    scratch = tuple(poisoned(n, dtype) for _ in range(opt.n_scratch))
    steps, flag = np.zeros(1, np.uint32), np.zeros(1, np.uint32)
    g = rng.standard_normal(n).astype(dtype)
    cpu.optimizer_update(rule, Update(p, g, state, scratch, steps, None, flag), opt.settings())
    assert flag[0] == 0 and np.isfinite(p).all()
    huge = rule(**{**hyper, "lr": float(np.finfo(dtype).max) / 2}).settings()  # Adam's steps are bounded by lr
    with np.errstate(over="ignore", invalid="ignore"):  # the overflow is the point
        cpu.optimizer_update(rule, Update(p, g, state, scratch, steps, None, flag), huge)
        assert flag[0] == 1 and not np.isfinite(p).all()
        flag[0] = 0
        cpu.optimizer_update(rule, Update(p, g, state, scratch, steps, np.ones(1, np.uint32), flag), huge)
    assert flag[0] == 1  # skipped, and the parameters still hold Inf: said again
