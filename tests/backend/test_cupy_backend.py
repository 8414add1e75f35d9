"""The CUDA backend gives the CPU backend's answers (skipped without a usable GPU)."""

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.activations import ACTIVATIONS

from ..helpers import random_batch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda():
    try:
        return gb.get_backend("cuda")
    except gb.DeviceUnavailableError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_gradients_match_cpu(cuda, act, loss, rng):
    sizes = [33, 17, 65, 5]  # odd sizes, none a multiple of a block
    cpu = gb.MLP(sizes, activation=act, loss=loss, dtype="float64", seed=0)
    gpu = gb.MLP(sizes, activation=act, loss=loss, dtype="float64", seed=0, device="cuda")
    X, y = random_batch(rng, sizes, loss, 37)
    (lc, gc), (lg, gg) = cpu.loss_and_grad(X, y), gpu.loss_and_grad(X, y)
    assert lg == pytest.approx(lc, rel=1e-12)
    for k in gc:
        np.testing.assert_allclose(gg[k], gc[k], rtol=1e-10, atol=1e-12)


def test_training_matches_cpu_and_moves_between_devices(cuda, rng):
    X, y = random_batch(rng, [20, 32, 4], "cross_entropy", 300)
    runs = []
    for device in ("cpu", "cuda"):
        m = gb.MLP([20, 32, 4], seed=1, device=device)
        runs.append((m, m.fit(X, y, epochs=3, batch_size=32, optimizer=gb.optim.SGD(0.1, momentum=0.9), progress=False)))
    (cpu, hc), (gpu, hg) = runs
    np.testing.assert_allclose(hg["loss"], hc["loss"], rtol=1e-4)
    gpu.to("cpu")
    for k, v in cpu.state_dict().items():
        np.testing.assert_allclose(gpu.state_dict()[k], v, rtol=1e-4, atol=1e-5)
