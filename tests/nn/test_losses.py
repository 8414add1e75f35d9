"""The loss table is the one source: the kernels' enum agrees with it, each row's
NumPy loss and gradient agree with its float64 reference (with and without sample
weights), and float32 work stays float32. The kernels are held to NumPy in
tests/backend/test_kernels.py, PyTorch to the table in tests/test_torch_reference.py."""

import re

import numpy as np
import pytest

from gpubackprop.backend import LossBuffers
from gpubackprop.backend import reference as ref
from gpubackprop.backend.cpu import NumpyBackend
from gpubackprop.backend.kernels import source
from gpubackprop.nn.losses import LOSSES, get_loss
from gpubackprop.tools.selftest import loss_targets

CPU = NumpyBackend()


def test_the_kernels_enum_is_the_tables():
    text = source("loss.cu")
    enum = re.search(r"enum\s*\{([^}]*LOSS_MSE[^}]*)\}", text).group(1)
    codes = {name.strip(): int(value) for name, value in re.findall(r"(LOSS_\w+)\s*=\s*(\d+)", enum)}
    assert codes == {f"LOSS_{loss.name.upper()}": loss.code for loss in LOSSES.values()}


def numpy_loss(name, z, y, weight=None, delta=1.0):
    """(L, dL/dz, running) from the NumPy backend, its weights summed there."""
    w = w_sum = None
    if weight is not None:
        w, w_sum = np.asarray(weight, z.dtype), np.empty((), z.dtype)
        CPU.sum(w, w_sum)
    out, grad, running = np.empty((), z.dtype), np.full(z.shape, np.nan, z.dtype), np.zeros(2)
    CPU.loss(get_loss(name, delta), LossBuffers(z, y, grad, out, np.empty(z.shape[0], z.dtype), w, w_sum), running)
    return out, grad, running


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_numpy_loss_and_gradient_match_the_reference(name, weighted, rng):
    z = rng.standard_normal((23, 5)) * 2
    y = loss_targets(name, rng, z.shape, z)
    w = rng.random(23) * (rng.random(23) > 0.3) if weighted else None
    value, grad, running = numpy_loss(name, z, y, w, delta=0.8)
    want, want_grad = ref.loss_and_delta(name, z, y, w, huber_delta=0.8)
    np.testing.assert_allclose(value, want, rtol=1e-13)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-11, atol=1e-15)
    np.testing.assert_allclose(running[0], want * (23 if w is None else w.sum()), rtol=1e-13)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_zero_weight_row_is_a_row_left_out(name, rng):
    z = rng.standard_normal((11, 3))
    y = loss_targets(name, rng, z.shape, z)
    w = np.ones(11)
    w[[1, 4, 7]] = 0.0
    kept = w > 0
    value, grad, _ = numpy_loss(name, z, y, w)
    alone, alone_grad, _ = numpy_loss(name, z[kept], y[kept])
    np.testing.assert_allclose(value, alone, rtol=1e-14)
    np.testing.assert_allclose(grad[kept], alone_grad, rtol=1e-13, atol=1e-16)
    assert not grad[~kept].any()


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_float32_stays_float32(name, weighted, rng):
    z = (rng.standard_normal((9, 4)) * 2).astype(np.float32)
    y = loss_targets(name, rng, z.shape, z).astype(np.float32)
    value, grad, _ = numpy_loss(name, z, y, rng.random(9) if weighted else None)
    assert value.dtype == np.float32 and grad.dtype == np.float32


def test_binary_cross_entropy_is_stable_for_huge_logits():
    z = np.array([[1e4, -1e4, 0.0], [-3e4, 3e4, 50.0]])
    y = np.array([[1.0, 0.0, 0.5], [1.0, 0.0, 1.0]])
    with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
        value, grad, _ = numpy_loss("binary_cross_entropy", z, y)
    # log(1 + e^-|z|) vanishes; the misses cost |z| each; 0.5 at z = 0 costs log 2.
    assert float(value) == pytest.approx((np.log(2) + 3e4 + 3e4) / 6, rel=1e-12)
    np.testing.assert_allclose(grad, (np.array([[1, 0, 0.5], [0, 1, 1]]) - y) / 6, atol=1e-15)


def test_huber_and_mae_gradients_at_their_joins():
    z, y = np.array([[0.0, 1.0, 3.0, -3.0]]), np.array([[0.0, 0.0, 0.0, 0.0]])
    _, grad, _ = numpy_loss("huber", z, y, delta=1.0)
    np.testing.assert_array_equal(grad, [[0.0, 0.25, 0.25, -0.25]])  # clamp(d, -1, 1) / C
    _, grad, _ = numpy_loss("mae", z, y)
    np.testing.assert_array_equal(grad, [[0.0, 0.25, 0.25, -0.25]])  # subgradient 0 at 0


def test_unknown_losses_and_bad_deltas_are_refused():
    with pytest.raises(ValueError, match="unknown loss 'hinge'; choose one of"):
        get_loss("hinge")
    with pytest.raises(ValueError, match=r"huber_delta must be in \(0.0, inf\], got 0.0"):
        get_loss("huber", 0.0)
    assert get_loss("huber", np.float32(0.5)).delta == 0.5
