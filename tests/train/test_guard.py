"""The divergence guard: steps with Inf / NaN gradients are skipped on the device and
reported by policy; the model never holds a non-finite parameter."""

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.backend.cpu import NumpyBackend

from ..helpers import random_batch

# The poisoned data overflows on purpose; NumPy says so as it happens.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")


@pytest.fixture(params=["cpu", "kernels"])
def device(request):
    """The NumPy backend, and the CUDA backend's kernels through the host harness."""
    if request.param == "cpu":
        return NumpyBackend()
    from gpubackprop.backend.kernels import KernelBackend

    return KernelBackend(np, request.getfixturevalue("host_module"), n_sm=2)


def poisoned_data(rng, bad_rows):
    """Finite data whose rows ``bad_rows`` overflow float32 in the first layer's GEMM."""
    X, y = random_batch(rng, [6, 10, 3], "cross_entropy", 64)
    X = X.astype(np.float32)
    X[bad_rows] = 3e38
    return X, y


def finite(model):
    return all(np.isfinite(v).all() for v in model.state_dict().values())


def test_raise_names_the_step_and_tensors_and_keeps_the_last_finite_parameters(device, rng):
    X, y = poisoned_data(rng, [0])
    model = gb.MLP([6, 10, 3], seed=0, device=device)
    before = model.state_dict()
    with pytest.raises(FloatingPointError, match=r"the first at step 1: layers\.\d\.(weight|bias) \(\d+ non-finite"):
        model.fit(X, y, epochs=1, batch_size=64, shuffle=False, optimizer=gb.optim.SGD(0.1), progress=False)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_skip_goes_on_and_counts(device, rng):
    X, y = poisoned_data(rng, [5])  # one of the 8 batches of each epoch
    model, opt = gb.MLP([6, 10, 3], seed=0, device=device), gb.optim.Adam(1e-2)
    with pytest.warns(RuntimeWarning, match="1 step\\(s\\) had non-finite gradients.*skipped"):
        model.fit(X, y, epochs=2, batch_size=8, shuffle=False, optimizer=opt, progress=False, on_nonfinite="skip")
    assert finite(model) and opt.steps == 2 * 8 - 2  # both epochs' poisoned step skipped


def test_restore_loads_the_checkpoint_and_halves_the_lr(rng, tmp_path):
    X, y = poisoned_data(rng, [60])  # in the last batch
    model, opt = gb.MLP([6, 10, 3], seed=0), gb.optim.SGD(0.1)
    with pytest.warns(RuntimeWarning, match="restored the newest checkpoint and halved the learning rate to 0.05"):
        model.fit(X, y, epochs=1, batch_size=8, shuffle=False, optimizer=opt, progress=False,
                  on_nonfinite="restore", checkpoint_dir=str(tmp_path), checkpoint_every=4)
    # The guard is heard before every checkpoint (a checkpoint never holds a step it would refuse), so the
    # skipped 8th step, due for a checkpoint, restores the newest one before it: after step 4.
    assert finite(model) and opt.lr == 0.05 and opt.steps == 4


def test_policy_and_its_needs_are_checked(rng):
    X, y = random_batch(rng, [6, 10, 3], "cross_entropy", 8)
    model = gb.MLP([6, 10, 3], seed=0)
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        model.fit(X, y, on_nonfinite="ignore", progress=False)
    with pytest.raises(ValueError, match="need checkpoint_dir"):
        model.fit(X, y, on_nonfinite="restore", progress=False)


def test_an_update_that_overflows_by_itself_raises(device, rng):
    X, y = random_batch(rng, [6, 10, 3], "cross_entropy", 16)
    X *= 1e4  # finite gradients in the thousands, times the learning rate below: past float32's 3.4e38
    model = gb.MLP([6, 10, 3], seed=0, device=device)
    with pytest.raises(FloatingPointError, match="the update of step 1 made parameters non-finite.*too high"):
        model.fit(X, y, epochs=1, batch_size=16, optimizer=gb.optim.SGD(1e38), progress=False, on_nonfinite="skip")


@pytest.mark.parametrize("device", ["numpy", "cpu"])
def test_a_diverging_fit_raises_our_error_without_numpys_warnings_beside_it(device, rng, recwarn):
    X, y = rng.normal(size=(200, 5)) * 100, rng.integers(0, 3, 200)
    model = gb.MLP([5, 64, 3], device=NumpyBackend() if device == "numpy" else device)
    with pytest.raises(FloatingPointError, match="non-finite"):
        model.fit(X, y, epochs=5, optimizer=gb.optim.SGD(1e6), progress=False)
    with pytest.raises(FloatingPointError, match="non-finite"):
        for _ in range(5):
            model.train_step(X, y, gb.optim.SGD(1e6))
    assert [str(w.message) for w in recwarn] == []
