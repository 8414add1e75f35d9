import numpy as np
import pytest

import gpubackprop as gb

from ..helpers import assert_same_params, params_of, random_batch

OPTIMIZERS = [
    lambda: gb.optim.SGD(0.05),
    lambda: gb.optim.SGD(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    lambda: gb.optim.Adam(1e-2, weight_decay=1e-3),
    lambda: gb.optim.AdamW(1e-2),
]


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_resuming_from_state_dict_is_exact(make, rng):
    X, y = random_batch(rng, [5, 6, 3], "cross_entropy", 12)
    straight = gb.MLP([5, 6, 3], seed=0)
    opt = make()
    for _ in range(5):
        straight.train_step(X, y, opt)

    first = gb.MLP([5, 6, 3], seed=0)
    opt1 = make()
    for _ in range(3):
        first.train_step(X, y, opt1)
    resumed = gb.MLP([5, 6, 3], seed=9)
    resumed.load_state_dict(first.state_dict())
    opt2 = gb.optim.from_state_dict(opt1.state_dict())
    assert opt2.steps == 3 and repr(opt2) == repr(opt1)
    for _ in range(2):
        resumed.train_step(X, y, opt2)
    assert_same_params(params_of(resumed), params_of(straight))


def test_optimizer_state_follows_the_model_dtype(rng):
    X, y = random_batch(rng, [3, 4, 2], "cross_entropy", 5)
    opt = gb.optim.Adam()
    gb.MLP([3, 4, 2], dtype="float64", seed=0).train_step(X, y, opt)
    assert opt.state["exp_avg"].dtype == np.float64


def test_one_optimizer_cannot_drive_two_model_sizes(rng):
    opt = gb.optim.SGD(0.1, momentum=0.9)
    gb.MLP([3, 4, 2], seed=0).train_step(*random_batch(rng, [3, 4, 2], "cross_entropy", 5), opt)
    other = gb.MLP([3, 5, 2], seed=0)
    before = params_of(other)
    with pytest.raises(ValueError, match="state is for 26 parameters but the model has 32"):
        other.train_step(*random_batch(rng, [3, 5, 2], "cross_entropy", 5), opt)
    assert_same_params(params_of(other), before)


def test_load_state_dict_rejects_mismatches():
    opt = gb.optim.Adam()
    sd = gb.optim.SGD(0.1).state_dict()
    with pytest.raises(ValueError, match="state_dict is for SGD, not Adam"):
        opt.load_state_dict(sd)
    bad = gb.optim.Adam().state_dict() | {"state": {"exp_avg": np.zeros((2, 2))}}
    with pytest.raises(ValueError, match="finite 1-D float array"):
        opt.load_state_dict(bad)
    with pytest.raises(ValueError, match="unknown optimizer type"):
        gb.optim.from_state_dict({"type": "RMSprop"})


def test_sgd_takes_the_momentum_buffers_of_the_state_it_loads(rng):
    """An SGD made without momentum becomes the loaded one, momentum buffer included
    (data-parallel ranks adopt rank 0's optimizer this way), and the reverse."""
    X, y = random_batch(rng, [5, 4, 3], "cross_entropy", 8)
    model = gb.MLP([5, 4, 3], seed=0)
    with_momentum = gb.optim.SGD(0.05, momentum=0.9)
    model.train_step(X, y, with_momentum)
    plain = gb.optim.SGD(0.5)
    plain.load_state_dict(with_momentum.state_dict())
    assert plain.hyperparams == with_momentum.hyperparams and set(plain.state) == {"momentum_buffer"}
    twin = gb.MLP([5, 4, 3], seed=0)
    twin.load_state_dict(model.state_dict())
    model.train_step(X, y, with_momentum)
    twin.train_step(X, y, plain)
    assert_same_params(params_of(model), params_of(twin))
    back = gb.optim.SGD(0.05, momentum=0.9)
    back.load_state_dict(gb.optim.SGD(0.5).state_dict())
    assert back.state_names == () and back.hyperparams["momentum"] == 0.0


def test_lr_can_be_changed_between_steps():
    opt = gb.optim.SGD(0.1)
    opt.lr = 0.01
    assert opt.lr == 0.01 and isinstance(opt.lr, float)
    with pytest.raises(ValueError):
        opt.lr = 0


def test_state_of_another_dtype_is_moved_onto_the_model(rng):
    """Adam's float64 state (a float64 model's, or a file's) bound to a float32 model:
    converted, not refused, and training goes on."""
    X, y = rng.standard_normal((12, 4)), rng.integers(0, 3, 12)
    opt = gb.optim.Adam(1e-2)
    gb.MLP([4, 5, 3], seed=0, dtype="float64").train_step(X, y, opt)
    model = gb.MLP([4, 5, 3], seed=0)
    model.train_step(X, y, opt)
    assert all(v.dtype == np.float32 for v in opt.state.values()) and opt.steps == 2


def test_a_state_for_another_size_is_refused_before_anything_changes(rng):
    opt = gb.optim.Adam(params=gb.MLP([4, 5, 3], seed=0))
    before = opt.state_dict()
    other = gb.optim.Adam(params=gb.MLP([4, 6, 3], seed=0)).state_dict()
    with pytest.raises(ValueError, match="this state is for 51 parameters but the optimizer is bound to 43"):
        opt.load_state_dict(other)
    assert opt.state_dict()["steps"] == before["steps"] and opt.state["exp_avg"].shape == (43,)


def test_step_given_a_model_binds_it_and_updates(rng):
    model = gb.MLP([3, 2], seed=0, dtype="float64")
    model.loss_and_grad(rng.standard_normal((5, 3)), rng.integers(0, 2, 5))
    before, grads = model.state_dict(), model.grad_dict()
    gb.optim.SGD(0.5).step(model)
    want = before["layers.0.bias"] - 0.5 * grads["layers.0.bias"]
    np.testing.assert_allclose(model.state_dict()["layers.0.bias"], want)


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_decay_biases_false_leaves_the_models_gradients_as_backprop_made_them(name, rng):
    X, y = random_batch(rng, [5, 4, 3], "cross_entropy", 8)
    grads = []
    for decay_biases in (True, False):
        model = gb.MLP([5, 4, 3], dtype="float64", seed=0)
        model.train_step(X, y, getattr(gb.optim, name)(lr=0.1, weight_decay=0.5, decay_biases=decay_biases))
        grads.append(model.grad_dict())
    for k in grads[0]:
        np.testing.assert_array_equal(grads[0][k], grads[1][k], err_msg=k)
