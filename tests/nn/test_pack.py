"""MLPPack: member k of a pack trains as a lone MLP of its seed on the same data and
settings, bit for bit; predictions, the ensemble, stopped members and files."""

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.nn.pack import MLPPack

from ..helpers import random_batch

SIZES = [5, 8, 3]


def lone_fit(k, pack, X, y, optimizer, lrs, decays, weights, hyper, **settings):
    """Member k's twin: an MLP of its seed, trained alone with its settings."""
    lead = pack.member(0)
    model = gb.MLP(pack.sizes, activation=lead.activation, loss=lead.loss, dtype=lead.dtype, seed=pack.seeds[k])
    rule = gb.optim.SGD if optimizer == "sgd" else gb.optim.Adam
    history = model.fit(X, y, optimizer=rule(lrs[k], weight_decay=decays[k], **hyper), progress=False,
                        sample_weight=None if weights is None else weights[k], **settings)
    return model, history


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("optimizer,hyper", [("sgd", dict(momentum=0.9, nesterov=True)), ("adam", {})])
@pytest.mark.parametrize("loss,activation", [("cross_entropy", "relu"), ("mse", "gelu"),
                                             ("binary_cross_entropy", "tanh")])
@pytest.mark.parametrize("weighted", [False, True], ids=["all rows", "own row weights"])
def test_each_member_trains_as_a_lone_mlp_of_its_seed(loss, activation, optimizer, hyper, dtype, weighted, rng):
    """Per-member learning rates and weight decays, each member's own shuffle, a partial
    last batch (50 rows in 16s) and, weighted, each member's own row weights (some 0: its
    own subset of the rows)."""
    X, y = random_batch(rng, SIZES, loss, 50)
    lrs, decays = [0.01, 0.03, 0.05], [0.0, 1e-3, 1e-2]
    weights = rng.random((3, 50)) * (rng.random((3, 50)) > 0.3) if weighted else None
    pack = MLPPack(SIZES, members=3, activation=activation, loss=loss, dtype=dtype, seed=4)
    histories = pack.fit(X, y, epochs=3, batch_size=16, optimizer=optimizer, lr=lrs, weight_decay=decays,
                         sample_weight=weights, **hyper)
    for k in range(3):
        model, history = lone_fit(k, pack, X, y, optimizer, lrs, decays, weights, hyper, epochs=3, batch_size=16)
        np.testing.assert_array_equal(pack.params[k], model.backend.to_host(model.params), err_msg=f"member {k}")
        assert histories[k] == history
        assert pack.member(k).optimizer.steps == model.optimizer.steps == 12


def test_predict_gives_every_members_and_the_ensembles(rng):
    X, y = random_batch(rng, SIZES, "cross_entropy", 40)
    pack = MLPPack(SIZES, members=4, seed=0)
    pack.fit(X, y, epochs=5, batch_size=8, lr=1e-2)
    labels = pack.predict(X)
    assert labels.shape == (4, 40)
    probabilities = np.stack([pack.member(k).predict_proba(X) for k in range(4)])
    for k in range(4):
        np.testing.assert_array_equal(labels[k], pack.member(k).predict(X))
    np.testing.assert_array_equal(pack.predict(X, ensemble=True), probabilities.mean(axis=0).argmax(axis=1))
    regressor = MLPPack(SIZES, members=2, loss="mse", seed=0)
    np.testing.assert_allclose(regressor.predict(X, ensemble=True), regressor.predict(X).mean(axis=0))


def test_a_member_gone_non_finite_is_stopped_alone(rng):
    X, y = random_batch(rng, SIZES, "mse", 40)
    pack = MLPPack(SIZES, members=3, loss="mse", activation="identity", dtype="float64", seed=0)
    calm = MLPPack(SIZES, members=3, loss="mse", activation="identity", dtype="float64", seed=0)
    with pytest.warns(RuntimeWarning, match="pack member 1 \\(seed 1\\) is stopped at step"):
        pack.fit(X * 1e3, y * 1e3, epochs=3, batch_size=8, optimizer="sgd", lr=[1e-9, 10.0, 1e-9])
    calm.fit(X * 1e3, y * 1e3, epochs=3, batch_size=8, optimizer="sgd", lr=[1e-9, 1e-9, 1e-9])
    assert pack.stopped[0] is None and pack.stopped[2] is None and pack.stopped[1] is not None
    assert np.isfinite(pack.params).all()
    for k in (0, 2):
        np.testing.assert_array_equal(pack.params[k], calm.params[k])


def test_save_and_load_keep_every_member(tmp_path, rng):
    X, y = random_batch(rng, SIZES, "cross_entropy", 30)
    pack = MLPPack(SIZES, seeds=[3, 1, 4], activation="tanh", dtype="float64")
    pack.fit(X, y, epochs=2, batch_size=10)
    pack.save(tmp_path / "pack.safetensors")
    loaded = MLPPack.load(tmp_path / "pack.safetensors")
    assert loaded.seeds == [3, 1, 4] and loaded.member(0).activation == "tanh"
    np.testing.assert_array_equal(loaded.params, pack.params)
    np.testing.assert_array_equal(loaded.predict(X), pack.predict(X))


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=[0.1, 0.2]), "lr must be one value for every member or a list of 3 \\(one per member\\), got 2"),
    (dict(lr=[0.1, 0.0, 0.1]), r"lr must be in \(0.0, inf\], got 0.0"),
    (dict(weight_decay=-1.0), r"weight_decay must be in \[0.0, inf\], got -1.0"),
    (dict(optimizer="rmsprop"), "optimizer must be 'sgd' or 'adam'"),
    (dict(sample_weight=np.ones((2, 10))), r"sample_weight must be \(n,\) or \(members, n\) = \(3, 10\)"),
])
def test_bad_settings_are_refused_before_training(kwargs, message, rng):
    X, y = random_batch(rng, SIZES, "cross_entropy", 10)
    pack = MLPPack(SIZES, members=3)
    before = pack.params
    with pytest.raises(ValueError, match=message):
        pack.fit(X, y, **kwargs)
    np.testing.assert_array_equal(pack.params, before)


def test_on_the_kernels_each_member_is_its_lone_models_captured_steps(kernel_backend, rng):
    """The CUDA backend's path (host harness here, a GPU with -m gpu): each member's steps
    captured and replayed as its lone fit's, weights included."""
    X, y = random_batch(rng, SIZES, "cross_entropy", 50)
    w = rng.random((2, 50))
    pack = MLPPack(SIZES, members=2, seed=1, device=kernel_backend)
    histories = pack.fit(X, y, epochs=2, batch_size=16, lr=[1e-2, 3e-2], sample_weight=w)
    for k in range(2):
        model = gb.MLP(SIZES, seed=1 + k, device=kernel_backend)
        history = model.fit(X, y, epochs=2, batch_size=16, optimizer=gb.optim.Adam([1e-2, 3e-2][k]),
                            sample_weight=w[k], progress=False)
        assert histories[k] == history
        np.testing.assert_array_equal(pack.params[k], model.backend.to_host(model.params))


def test_validation_data_gives_every_member_its_lone_fits_val_metrics(rng):
    X, y = random_batch(rng, SIZES, "cross_entropy", 40)
    X_val, y_val = random_batch(rng, SIZES, "cross_entropy", 15)
    w_val = rng.random(15)
    pack = MLPPack(SIZES, members=2, seed=7)
    histories = pack.fit(X, y, epochs=2, batch_size=8, validation_data=(X_val, y_val, w_val))
    for k in range(2):
        model = gb.MLP(SIZES, seed=7 + k)
        assert histories[k] == model.fit(X, y, epochs=2, batch_size=8, validation_data=(X_val, y_val, w_val),
                                         progress=False, optimizer=gb.optim.Adam())
    assert set(histories[0]) == {"loss", "accuracy", "val_loss", "val_accuracy"}


class StopAfter(gb.callbacks.Callback):
    """Stops its model after ``epochs`` epochs; records the epochs it saw."""

    def __init__(self, epochs):
        self.epochs, self.seen = epochs, []

    def on_epoch_end(self, model, epoch, logs):
        self.seen.append((epoch, logs["loss"]))
        if len(self.seen) >= self.epochs:
            model.stop_training = True


@pytest.mark.parametrize("weighted", [False, True], ids=["all rows", "row weights"])
def test_members_own_rows_optimizers_epochs_and_callbacks_train_as_lone_fits_on_their_rows(weighted, rng):
    """Member k with rows[k] (one a bootstrap, with repeats), its own optimizer object,
    batch size, epochs and a callback that stops it early trains as a lone MLP fitted on
    X[rows[k]] with the same, bit for bit; the others train on past the stopped one."""
    X, y = random_batch(rng, SIZES, "cross_entropy", 60)
    w = rng.random(60) + 0.1 if weighted else None
    rows = [np.arange(0, 40), rng.integers(0, 60, 60), np.sort(rng.permutation(60)[:25])]
    make = [lambda: gb.optim.SGD(0.05, momentum=0.9), lambda: gb.optim.Adam(3e-3), lambda: gb.optim.Adam(1e-2)]
    stops = [StopAfter(2), StopAfter(99), StopAfter(99)]
    models = [gb.MLP(SIZES, seed=s, dtype="float64") for s in (5, 6, 7)]
    pack = MLPPack.of(models)
    histories = pack.fit(X, y, epochs=[4, 4, 3], batch_size=[16, 16, 8], optimizer=[m() for m in make],
                         rows=rows, callbacks=[[c] for c in stops], sample_weight=w)
    assert [len(h["loss"]) for h in histories] == [2, 4, 3]
    for k in range(3):
        lone, stop = gb.MLP(SIZES, seed=5 + k, dtype="float64"), StopAfter(stops[k].epochs)
        history = lone.fit(X[rows[k]], y[rows[k]], epochs=[4, 4, 3][k], batch_size=[16, 16, 8][k],
                           optimizer=make[k](), callbacks=[stop], progress=False,
                           sample_weight=None if w is None else w[rows[k]])
        assert histories[k] == history and stops[k].seen == stop.seen
        np.testing.assert_array_equal(pack.params[k], lone.backend.to_host(lone.params), err_msg=f"member {k}")
        assert pack.member(k) is models[k] and models[k].optimizer.steps == lone.optimizer.steps


@pytest.mark.parametrize("kwargs,message", [
    (dict(rows=[np.arange(5)]), "rows must be a list of 2 index arrays"),
    (dict(rows=[np.arange(5), np.array([0, 10])]), r"rows\[1\] holds indices outside \[0, 10\)"),
    (dict(rows=[np.arange(5), np.array([], int)]), r"rows\[1\] must be a non-empty 1-D array"),
    (dict(callbacks=[[]]), "callbacks must be a list of 2 lists"),
    (dict(epochs=[1, 2, 3]), "epochs must be one value for every member or a list of 2"),
    (dict(optimizer=[gb.optim.Adam()]), "a list of 2 optimizers"),
    (dict(optimizer=[gb.optim.Adam(), gb.optim.Adam()], lr=0.1), "hold their own settings"),
])
def test_bad_per_member_settings_are_refused(kwargs, message, rng):
    X, y = random_batch(rng, SIZES, "cross_entropy", 10)
    with pytest.raises(ValueError, match=message):
        MLPPack(SIZES, members=2).fit(X, y, **kwargs)


def test_one_optimizer_object_for_two_members_is_refused(rng):
    X, y = random_batch(rng, SIZES, "cross_entropy", 10)
    shared = gb.optim.Adam()
    with pytest.raises(ValueError, match="an optimizer object of its own"):
        MLPPack(SIZES, members=2).fit(X, y, optimizer=[shared, shared])


def test_a_pack_of_existing_models_needs_them_alike():
    assert MLPPack.of([gb.MLP(SIZES, seed=3), gb.MLP(SIZES, seed=9)]).seeds == [3, 9]
    with pytest.raises(ValueError, match=r"models\[1\] is not of models\[0\]'s kind \(activation 'relu' vs 'tanh'\)"):
        MLPPack.of([gb.MLP(SIZES, activation="tanh"), gb.MLP(SIZES)])
    with pytest.raises(TypeError, match="not a gpubackprop MLP"):
        MLPPack.of([gb.MLP(SIZES), object()])


def test_on_the_kernels_a_member_on_its_own_rows_is_its_lone_fit_on_them(kernel_backend, rng):
    """The captured steps gather a member's rows from the whole data set: as its lone
    fit's gather from its own rows (host harness here, a GPU with -m gpu)."""
    X, y = random_batch(rng, SIZES, "cross_entropy", 50)
    rows = [np.arange(10, 50), rng.integers(0, 50, 50)]
    pack = MLPPack(SIZES, members=2, seed=3, device=kernel_backend)
    histories = pack.fit(X, y, epochs=2, batch_size=16, optimizer=[gb.optim.Adam(1e-2), gb.optim.SGD(0.1)],
                         rows=rows)
    for k, make in enumerate((lambda: gb.optim.Adam(1e-2), lambda: gb.optim.SGD(0.1))):
        model = gb.MLP(SIZES, seed=3 + k, device=kernel_backend)
        assert histories[k] == model.fit(X[rows[k]], y[rows[k]], epochs=2, batch_size=16, optimizer=make(),
                                         progress=False)
        np.testing.assert_array_equal(pack.params[k], model.backend.to_host(model.params))
