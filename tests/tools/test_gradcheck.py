import numpy as np
import pytest

import gpubackprop as gb

from ..helpers import random_batch


@pytest.mark.parametrize("where", ["db", "dW", "grad_prev"])
def test_gradcheck_catches_a_wrong_gradient(where, rng, monkeypatch):
    """A 1% error in any one backward output must show up, far above 1e-7."""
    model = gb.MLP([4, 6, 5, 3], activation="tanh", dtype="float64", seed=0)
    backend = type(model.backend)
    real = backend.dense_backward

    def off_by_one_percent(self, layer, buf, dropout=None):
        real(self, layer, buf, dropout)
        target = {"db": layer.db, "dW": layer.dW, "grad_prev": buf.grad_prev}[where]
        if target is not None:
            target *= 1.01

    X, y = random_batch(rng, model.sizes, "cross_entropy", 7)
    assert gb.gradcheck(model, X, y) < 1e-8
    monkeypatch.setattr(backend, "dense_backward", off_by_one_percent)
    assert gb.gradcheck(model, X, y) > 1e-3


def test_gradcheck_of_a_float32_model_runs_in_float64(rng):
    model = gb.MLP([3, 4, 2], activation="gelu", loss="mse", seed=0)
    X, y = random_batch(rng, model.sizes, "mse", 5)
    assert gb.gradcheck(model, X, y) <= 1e-7
    assert model.dtype == "float32"


def test_gradcheck_leaves_out_parameters_at_a_relu_kink():
    # One hidden unit with pre-activation exactly 0: the loss has no derivative there.
    model = gb.MLP([1, 1, 2], dtype="float64", seed=0)
    sd = model.state_dict()
    sd["layers.0.weight"][:] = 0.0
    model.load_state_dict(sd)
    with pytest.warns(RuntimeWarning, match="at a ReLU kink"):
        assert gb.gradcheck(model, np.ones((1, 1)), np.array([1])) <= 1e-7
