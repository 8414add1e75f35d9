"""MLPPack: member k of a pack trains as a lone MLP of its seed on the same data and
settings, bit for bit; predictions, the ensemble, stopped members and files."""

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.backend import NumpyBackend
from gpubackprop.nn.network import seed_streams
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


# ---- shared batches: one step for every member (gpubackprop.nn.packed) -----------------------
def shared_twin(k, pack, X, y, rule, hyper, weights, **settings):
    """Member k's twin under batches="shared": an MLP of its seed whose shuffle is member 0's."""
    lead = pack.member(0)
    model = gb.MLP(pack.sizes, activation=lead.activation, loss=lead.loss, dtype=lead.dtype, seed=pack.seeds[k])
    model.shuffle_rng = seed_streams(pack.seeds[0])[1]
    history = model.fit(X, y, optimizer=rule(**hyper[k]), progress=False,
                        sample_weight=None if weights is None else weights[k], **settings)
    return model, history


def assert_same_training(pack, k, model, history, got_history, dtype):
    """Parameters, optimizer state and histories of member k and its twin: equal to rounding
    (float64 1e-12, float32 1e-5 relative): the pack's wide first-layer GEMM may sum in
    another order than the lone one's (measured: the same bits at these sizes on NumPy's
    OpenBLAS, 2-core Xeon)."""
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == "float64" else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pack.params[k], model.backend.to_host(model.params), **tol, err_msg=f"member {k}")
    mine, lone = pack.member(k).optimizer.state_dict(), model.optimizer.state_dict()
    assert mine["steps"] == lone["steps"] and mine["hyperparams"] == lone["hyperparams"]
    assert set(mine["state"]) == set(lone["state"])
    for name in lone["state"]:
        np.testing.assert_allclose(mine["state"][name], lone["state"][name], **tol)
    assert set(got_history) == set(history)
    for name in history:
        np.testing.assert_allclose(got_history[name], history[name], **tol)


PER_MEMBER = {"sgd": (gb.optim.SGD, dict(lr=[0.01, 0.03, 0.05], weight_decay=[0.0, 1e-3, 1e-2], momentum=[0.9, 0.0, 0.5],
                                          nesterov=[True, False, False])),
              "adam": (gb.optim.Adam, dict(lr=[1e-2, 3e-3, 5e-2], weight_decay=[0.0, 1e-3, 1e-2],
                                            decay_biases=False, betas=(0.8, 0.99)))}


def member_settings(settings, k):
    return {name: value[k] if isinstance(value, list) else value for name, value in settings.items()}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("sizes,loss,activation", [
    ([5, 8, 3], "cross_entropy", "relu"), ([5, 8, 6, 3], "mse", "gelu"), ([5, 8, 7, 6, 2], "binary_cross_entropy", "tanh"),
    ([5, 3], "poisson", "identity"), ([5, 9, 4], "huber", "leaky_relu")])
@pytest.mark.parametrize("weighted", [False, True], ids=["all rows", "own row weights"])
def test_shared_batches_train_each_member_as_a_lone_mlp_on_member_0s_order(sizes, loss, activation, optimizer, dtype,
                                                                           weighted, rng):
    """Per-member hyperparameters (momentum with and without, nesterov, weight decay on the
    weights alone), a partial last batch (50 rows in 16s), 1 to 3 hidden layers (none: the
    wide layer is the output layer) and, weighted, each member's own row weights (some 0)."""
    X, y = random_batch(rng, sizes, loss, 50)
    rule, settings = PER_MEMBER[optimizer]
    weights = rng.random((3, 50)) * (rng.random((3, 50)) > 0.3) if weighted else None
    pack = MLPPack(sizes, members=3, activation=activation, loss=loss, dtype=dtype, seed=4)
    histories = pack.fit(X, y, epochs=3, batch_size=16, optimizer=optimizer, sample_weight=weights, batches="shared",
                         **settings)
    for k in range(3):
        model, history = shared_twin(k, pack, X, y, rule, [member_settings(settings, j) for j in range(3)], weights,
                                     epochs=3, batch_size=16)
        assert_same_training(pack, k, model, history, histories[k], dtype)


def test_shared_batches_on_a_size_the_blas_choice_measures_agree_in_float32(rng):
    """A first layer large enough that the pack's BLAS (NumPy's or MKL's, measured for the wide
    GEMM) may differ from the lone model's: float32 rounding apart, no more."""
    sizes = [300, 64, 10]
    X, y = random_batch(rng, sizes, "cross_entropy", 150)
    pack = MLPPack(sizes, members=4, seed=2)
    histories = pack.fit(X, y, epochs=2, batch_size=64, optimizer="adam", lr=[1e-3, 2e-3, 3e-3, 4e-3],
                         batches="shared")
    for k in range(4):
        model, history = shared_twin(k, pack, X, y, gb.optim.Adam, [dict(lr=1e-3 * (j + 1)) for j in range(4)], None,
                                     epochs=2, batch_size=64)
        assert_same_training(pack, k, model, history, histories[k], "float32")


def test_shared_batches_continue_across_fits_and_from_own_batches(rng):
    """The members' optimizers carry their state and step counts between fits in either mode."""
    X, y = random_batch(rng, SIZES, "cross_entropy", 40)
    once, twice = (MLPPack(SIZES, members=2, seed=1, dtype="float64") for _ in range(2))
    once.fit(X, y, epochs=2, batch_size=8, lr=[1e-2, 2e-2], batches="shared", shuffle=False)
    for _ in range(2):
        twice.fit(X, y, epochs=1, batch_size=8, lr=[1e-2, 2e-2], batches="shared", shuffle=False)
    np.testing.assert_array_equal(twice.params, once.params)
    mixed = MLPPack(SIZES, members=2, seed=1, dtype="float64")
    mixed.fit(X, y, epochs=1, batch_size=8, lr=[1e-2, 2e-2], batches="own", shuffle=False)
    mixed.fit(X, y, epochs=1, batch_size=8, lr=[1e-2, 2e-2], batches="shared", shuffle=False)
    np.testing.assert_allclose(mixed.params, once.params, rtol=1e-12, atol=1e-14)  # no shuffle: the same batches
    assert [mixed.member(k).optimizer.steps for k in range(2)] == [10, 10]


@pytest.mark.parametrize("batches", ["own", "shared"])
def test_a_stopped_members_history_ends_with_the_epoch_it_stopped_in(batches, rng):
    X, y = random_batch(rng, SIZES, "mse", 40)
    pack = MLPPack(SIZES, members=3, loss="mse", activation="identity", dtype="float64", seed=0)
    calm = MLPPack(SIZES, members=3, loss="mse", activation="identity", dtype="float64", seed=0)
    with pytest.warns(RuntimeWarning, match="pack member 1 \\(seed 1\\) is stopped at step"):
        histories = pack.fit(X * 1e3, y * 1e3, epochs=3, batch_size=8, optimizer="sgd", lr=[1e-9, 10.0, 1e-9],
                             batches=batches)
    calm.fit(X * 1e3, y * 1e3, epochs=3, batch_size=8, optimizer="sgd", lr=[1e-9, 1e-9, 1e-9], batches=batches)
    assert pack.stopped[0] is None and pack.stopped[2] is None and 1 <= pack.stopped[1] <= 5  # in its first epoch
    assert np.isfinite(pack.params).all()
    assert [len(h["loss"]) for h in histories] == [3, 1, 3]
    for k in (0, 2):
        np.testing.assert_array_equal(pack.params[k], calm.params[k])


@pytest.mark.parametrize("sizes", [[5, 8, 6, 3], [5, 3]], ids=["hidden layers", "no hidden layer"])
def test_on_the_kernels_shared_batches_give_each_member_its_lone_fit(sizes, kernel_backend, rng):
    """The CUDA backend's path (host harness here, a GPU with -m gpu): the member axis as
    launches on contiguous views and GEMMs on strided ones, against lone fits there."""
    X, y = random_batch(rng, sizes, "cross_entropy", 50)
    w = rng.random((3, 50))
    pack = MLPPack(sizes, members=3, seed=1, device=kernel_backend)
    settings = dict(lr=[1e-2, 3e-2, 2e-2], weight_decay=[0.0, 1e-2, 1e-3], decay_biases=False)
    histories = pack.fit(X, y, epochs=2, batch_size=16, sample_weight=w, batches="shared", **settings)
    for k in range(3):
        model = gb.MLP(sizes, seed=1 + k, device=kernel_backend)
        model.shuffle_rng = seed_streams(1)[1]
        history = model.fit(X, y, epochs=2, batch_size=16, optimizer=gb.optim.Adam(**member_settings(settings, k)),
                            sample_weight=w[k], progress=False)
        assert_same_training(pack, k, model, history, histories[k], "float32")


def test_shared_batches_are_refused_where_the_backend_has_no_member_axis(rng):
    X, y = random_batch(rng, SIZES, "cross_entropy", 10)
    backend = NumpyBackend()
    backend.supports_members = False
    pack = MLPPack(SIZES, members=2, device=backend)
    with pytest.raises(NotImplementedError, match="batches='shared' needs the member-axis primitives.*batches='own'"):
        pack.fit(X, y, batches="shared")
    with pytest.raises(ValueError, match="batches must be one of \\('own', 'shared'\\), got 'mine'"):
        pack.fit(X, y, batches="mine")


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


def test_shared_batches_stop_a_member_its_callback_stops_and_train_the_others_on(rng):
    X, y = random_batch(rng, SIZES, "cross_entropy", 40)
    stops = [StopAfter(99), StopAfter(2), StopAfter(99)]
    pack = MLPPack(SIZES, members=3, seed=2, dtype="float64")
    histories = pack.fit(X, y, epochs=4, batch_size=16, lr=[1e-2, 2e-2, 3e-2], callbacks=[[c] for c in stops],
                         batches="shared")
    assert [len(h["loss"]) for h in histories] == [4, 2, 4]
    for k in range(3):
        model, history = shared_twin(k, pack, X, y, gb.optim.Adam, [dict(lr=1e-2 * (j + 1)) for j in range(3)], None,
                                     epochs=4, batch_size=16, callbacks=[StopAfter(stops[k].epochs)])
        assert_same_training(pack, k, model, history, histories[k], "float64")


@pytest.mark.parametrize("kwargs,what", [(dict(rows=[np.arange(5), np.arange(5)]), "rows"),
                                         (dict(epochs=[1, 2]), "epochs"), (dict(batch_size=[4, 8]), "batch_size")])
def test_shared_batches_refuse_per_member_rows_epochs_and_batch_sizes(kwargs, what, rng):
    X, y = random_batch(rng, SIZES, "cross_entropy", 10)
    pack = MLPPack(SIZES, members=2)
    with pytest.raises(ValueError, match=f"the same batches: per-member {what} need batches='own'"):
        pack.fit(X, y, batches="shared", **kwargs)


def test_members_own_dropout_and_clip_norm_train_as_lone_fits_with_them(tmp_path, rng):
    """Each member's dropout masks its own (drawn from its seed) and its gradients clipped
    at its own norm: its lone MLP(dropout=...).fit(clip_norm=...), bit for bit."""
    X, y = random_batch(rng, [5, 9, 7, 3], "cross_entropy", 50)
    rates, norms = [0.0, 0.3, 0.5], [None, 0.5, 0.05]
    pack = MLPPack([5, 9, 7, 3], members=3, seed=8, dtype="float64", dropout=rates)
    histories = pack.fit(X, y, epochs=2, batch_size=16, optimizer="sgd", lr=0.1, momentum=0.9, clip_norm=norms)
    for k in range(3):
        model = gb.MLP([5, 9, 7, 3], seed=8 + k, dtype="float64", dropout=rates[k])
        history = model.fit(X, y, epochs=2, batch_size=16, optimizer=gb.optim.SGD(0.1, momentum=0.9),
                            clip_norm=norms[k], progress=False)
        assert histories[k] == history
        np.testing.assert_array_equal(pack.params[k], model.backend.to_host(model.params), err_msg=f"member {k}")
    pack.save(tmp_path / "pack.safetensors")
    assert [m.dropout for m in MLPPack.load(tmp_path / "pack.safetensors").models] == rates
    with pytest.raises(ValueError, match="batches='shared' has no dropout or clip_norm yet"):
        pack.fit(X, y, batches="shared")
    with pytest.raises(ValueError, match="batches='shared' has no dropout or clip_norm yet"):
        MLPPack([5, 9, 7, 3], members=2).fit(X, y, batches="shared", clip_norm=1.0)
    with pytest.raises(ValueError, match="clip_norm must be a positive number or None"):
        MLPPack([5, 9, 7, 3], members=2).fit(X, y, clip_norm=[1.0, -1.0])


class HalveRate(gb.callbacks.Callback):
    """Halves its model's learning rate at every epoch's start; records the optimizer's
    step count and state names at every epoch's end."""

    def __init__(self):
        self.seen = []

    def on_epoch_begin(self, model, epoch):
        model.optimizer.lr = model.optimizer.lr / 2

    def on_epoch_end(self, model, epoch, logs):
        self.seen.append((model.optimizer.steps, sorted(model.optimizer.state)))


def test_shared_batches_follow_a_callbacks_learning_rate_and_show_the_optimizers_state_each_epoch(rng):
    X, y = random_batch(rng, SIZES, "cross_entropy", 40)
    watchers = [HalveRate() for _ in range(2)]
    pack = MLPPack(SIZES, members=2, seed=4, dtype="float64")
    histories = pack.fit(X, y, epochs=3, batch_size=16, lr=[0.02, 0.04], callbacks=[[w] for w in watchers],
                         batches="shared")
    for k in range(2):
        lone_watcher = HalveRate()
        model, history = shared_twin(k, pack, X, y, gb.optim.Adam, [dict(lr=0.02), dict(lr=0.04)], None, epochs=3,
                                     batch_size=16, callbacks=[lone_watcher])
        assert_same_training(pack, k, model, history, histories[k], "float64")
        assert watchers[k].seen == lone_watcher.seen == [(3, ["exp_avg", "exp_avg_sq"]), (6, ["exp_avg", "exp_avg_sq"]),
                                                         (9, ["exp_avg", "exp_avg_sq"])]


def test_a_member_stopped_in_an_earlier_fit_stays_stopped_and_warnings_name_the_callers_line(rng):
    X, y = random_batch(rng, SIZES, "mse", 40)
    pack = MLPPack(SIZES, members=2, loss="mse", activation="identity", dtype="float64", seed=0)
    with pytest.warns(RuntimeWarning, match="pack member 1") as caught:
        pack.fit(X * 1e3, y * 1e3, epochs=1, batch_size=8, optimizer="sgd", lr=[1e-9, 10.0], batches="shared")
    assert caught[0].filename == __file__
    before = pack.params[1]
    histories = pack.fit(X, y, epochs=2, batch_size=8, optimizer="sgd", lr=[1e-9, 1e-3], batches="shared")
    np.testing.assert_array_equal(pack.params[1], before)
    assert histories[1] == {} and len(histories[0]["loss"]) == 2


def test_shared_batches_refuse_members_of_two_optimizer_classes_before_any_callback(rng):
    X, y = random_batch(rng, SIZES, "cross_entropy", 10)
    watcher = HalveRate()
    with pytest.raises(TypeError, match="one rule: give every member an optimizer of one class"):
        MLPPack(SIZES, members=2).fit(X, y, optimizer=[gb.optim.SGD(0.1), gb.optim.Adam()], batches="shared",
                                      callbacks=[[watcher], []])
    assert watcher.seen == []
