"""Every bad input raises a clear error and leaves the model exactly as it was."""

import numpy as np
import pytest

import gpubackprop as gb

from .helpers import assert_same_params, params_of


def good(rng, n=6):
    return rng.standard_normal((n, 4)), rng.integers(0, 3, n)


def with_nan(rng):
    X, y = good(rng)
    X[2, 1] = np.nan
    return X, y


def with_inf(rng):
    X, y = good(rng)
    X[0, 0] = -np.inf
    return X, y


BAD = {
    "nan in X": (with_nan, "NaN or Inf"),
    "inf in X": (with_inf, "NaN or Inf"),
    "wrong feature count": (lambda r: (r.standard_normal((6, 5)), r.integers(0, 3, 6)), "5 features but the model's input size is 4"),
    "label too large": (lambda r: (good(r)[0], np.array([0, 1, 2, 3, 0, 1])), "label 3 is out of range for 3 classes"),
    "negative label": (lambda r: (good(r)[0], np.array([0, -1, 2, 0, 0, 1])), "label -1 is out of range"),
    "non-integer labels": (lambda r: (good(r)[0], np.array([0, 0.5, 2, 0, 0, 1])), "non-integer class labels"),
    "nan label": (lambda r: (good(r)[0], np.array([0, np.nan, 2, 0, 0, 1])), "NaN or Inf"),
    "string X": (lambda r: (np.array([["a", "b", "c", "d"]] * 6), good(r)[1]), "must be numeric"),
    "ragged X": (lambda r: ([[1, 2, 3, 4], [1, 2]], [0, 1]), "could not be read as an array"),
    "complex X": (lambda r: (good(r)[0] + 1j, good(r)[1]), "must be numeric"),
    "empty batch": (lambda r: (np.empty((0, 4)), np.empty(0, int)), "X is empty"),
    "length mismatch": (lambda r: (good(r)[0], np.array([0, 1, 2])), "X has 6 samples but y has 3"),
    "1-D X": (lambda r: (np.ones(4), np.array([0])), "X must be 2-D"),
    "probability rows not summing to 1": (lambda r: (good(r)[0], np.full((6, 3), 0.5)), "rows must be probabilities"),
    "negative probabilities": (lambda r: (good(r)[0], np.tile([1.5, -0.5, 0.0], (6, 1))), "rows must be probabilities"),
    "targets with wrong width": (lambda r: (good(r)[0], np.zeros((6, 4))), "y has shape (6, 4)"),
}


@pytest.mark.parametrize("call", ["train_step", "fit", "loss_and_grad", "evaluate"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_raises_and_changes_nothing(case, call, rng):
    make, message = BAD[case]
    model = gb.MLP([4, 5, 3], seed=0)
    opt = gb.optim.Adam()
    X, y = good(rng)
    model.train_step(X, y, opt)  # the optimizer holds state now, which must survive too
    before, opt_before = params_of(model), opt.state_dict()
    bad_X, bad_y = make(rng)
    run = {
        "train_step": lambda: model.train_step(bad_X, bad_y, opt),
        "fit": lambda: model.fit(bad_X, bad_y, epochs=1, optimizer=opt, progress=False),
        "loss_and_grad": lambda: model.loss_and_grad(bad_X, bad_y),
        "evaluate": lambda: model.evaluate(bad_X, bad_y),
    }[call]
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")):
        run()
    assert_same_params(params_of(model), before)
    assert opt.steps == opt_before["steps"]
    for k, v in opt.state_dict()["state"].items():
        np.testing.assert_array_equal(v, opt_before["state"][k])


def test_bad_validation_data_fails_before_training(rng):
    model = gb.MLP([4, 5, 3], seed=0)
    before = params_of(model)
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.fit(*good(rng), validation_data=with_nan(rng), progress=False)
    assert_same_params(params_of(model), before)


def test_mse_targets_are_checked(rng):
    model = gb.MLP([4, 5, 2], loss="mse", seed=0)
    X = rng.standard_normal((6, 4))
    with pytest.raises(ValueError, match=r"y has shape \(6,\)"):
        model.train_step(X, np.zeros(6), gb.optim.SGD(0.1))
    y = np.zeros((6, 2))
    y[1, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.train_step(X, y, gb.optim.SGD(0.1))


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(sizes=[]), ValueError, "at least an input and an output"),
        (dict(sizes=[3]), ValueError, "at least an input and an output"),
        (dict(sizes=[3, 0, 2]), ValueError, "every layer size must be >= 1"),
        (dict(sizes=[3, 2.5, 2]), TypeError, "sequence of integers"),
        (dict(sizes="abc"), TypeError, "sequence of integers"),
        (dict(sizes=[3, 2], activation="swish"), ValueError, "unknown activation 'swish'"),
        (dict(sizes=[3, 2], loss="hinge"), ValueError, "unknown loss 'hinge'"),
        (dict(sizes=[3, 2], dtype="int32"), ValueError, "dtype must be one of"),
        (dict(sizes=[3, 2], dtype="float16"), ValueError, "dtype must be one of"),
        (dict(sizes=[3, 2], seed=-1), ValueError, "seed must be >= 0"),
        (dict(sizes=[3, 2], device="tpu"), ValueError, "unknown device"),
    ],
)
def test_bad_model_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        gb.MLP(**kwargs)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
        (dict(batch_size=2.5), TypeError, "batch_size must be an integer"),
        (dict(epochs=-1), ValueError, "epochs must be >= 0"),
        (dict(optimizer="adam"), TypeError, "optimizer must be a gpubackprop.optim optimizer"),
        (dict(sample_weight=np.ones(3)), ValueError, r"sample_weight must hold one weight per row: shape \(6,\)"),
        (dict(sample_weight=-np.ones(6)), ValueError, "sample_weight holds 6 negative weight"),
        (dict(sample_weight=np.zeros(6)), ValueError, "sample_weight is zero for every row"),
        (dict(sample_weight=np.full(6, np.nan)), ValueError, "sample_weight contains 6 NaN or Inf"),
        (dict(class_weight="even"), ValueError, "class_weight must be 'balanced' or a dict"),
        (dict(class_weight={7: 2.0}), ValueError, r"class_weight names label\(s\) \[7\] that y does not hold"),
        (dict(validation_data=(1, 2, 3, 4)), ValueError, "validation_data must be"),
    ],
)
def test_bad_fit_arguments_change_nothing(kwargs, error, message, rng):
    model = gb.MLP([4, 5, 3], seed=0)
    before = params_of(model)
    with pytest.raises(error, match=message):
        model.fit(*good(rng), progress=False, **kwargs)
    assert_same_params(params_of(model), before)


@pytest.mark.parametrize(
    "make,error,message",
    [
        (lambda: gb.optim.SGD(0), ValueError, "lr must be in"),
        (lambda: gb.optim.SGD(-0.1), ValueError, "lr must be in"),
        (lambda: gb.optim.SGD(float("nan")), ValueError, "lr must be in"),
        (lambda: gb.optim.SGD("fast"), TypeError, "lr must be a number"),
        (lambda: gb.optim.SGD(0.1, momentum=-0.5), ValueError, "momentum must be in"),
        (lambda: gb.optim.SGD(0.1, nesterov=True), ValueError, "nesterov momentum needs momentum > 0"),
        (lambda: gb.optim.SGD(0.1, momentum=0.9, dampening=0.1, nesterov=True), ValueError, "dampening = 0"),
        (lambda: gb.optim.Adam(betas=(1.0, 0.999)), ValueError, "beta1 must be in"),
        (lambda: gb.optim.Adam(betas=0.9), TypeError, "betas must be a pair"),
        (lambda: gb.optim.Adam(eps=-1), ValueError, "eps must be in"),
        (lambda: gb.optim.AdamW(weight_decay=-1e-2), ValueError, "weight_decay must be in"),
    ],
)
def test_bad_optimizer_hyperparameters(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_load_state_dict_checks_everything_first(rng):
    model = gb.MLP([4, 5, 3], seed=0)
    before = params_of(model)
    good_sd = gb.MLP([4, 5, 3], seed=1).state_dict()
    cases = {
        "missing": ({k: v for k, v in good_sd.items() if k != "layers.1.bias"}, KeyError, "missing"),
        "unexpected": (good_sd | {"layers.9.weight": np.zeros(1)}, KeyError, "unexpected"),
        "shape": (good_sd | {"layers.1.bias": np.zeros(4)}, ValueError, r"shape \(4,\), expected \(3,\)"),
        "dtype": (good_sd | {"layers.1.bias": np.zeros(3, int)}, TypeError, "expected a float dtype"),
        "nan": (good_sd | {"layers.1.weight": np.full((3, 5), np.nan)}, ValueError, "NaN or Inf"),
        "not a mapping": ([1, 2], TypeError, "must be a mapping"),
    }
    for sd, error, message in cases.values():
        with pytest.raises(error, match=message):
            model.load_state_dict(sd)
        assert_same_params(params_of(model), before)


def test_a_memory_mapped_X_gets_check_Xs_errors(tmp_path):
    from gpubackprop import validation

    X = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=(40, 3))
    X[:] = 1.0
    X[37, 1] = np.nan
    with pytest.raises(ValueError, match="X has 3 features but the model's input size is 4"):
        validation.check_X_on_disk(X, 4)
    with pytest.raises(ValueError, match=r"X contains 1 NaN or Inf value\(s\)"):
        validation.check_X_on_disk(X, 3, chunk_bytes=24)  # the bad row in a later chunk
