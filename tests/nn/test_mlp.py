"""The MLP against the float64 reference, finite differences, and its contract."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gpubackprop as gb
from gpubackprop.nn.activations import ACTIVATIONS
from gpubackprop.backend import reference as ref
from gpubackprop.backend import FusedCpuBackend
from gpubackprop.backend.cpu import NumpyBackend

from ..helpers import assert_same_params, dense_targets, params_of, random_batch

ACTS = sorted(ACTIVATIONS)
LOSSES = sorted(gb.nn.losses.LOSSES)
ARCHS = [[3, 2], [1, 1, 1], [4, 1, 3], [5, 7, 6, 3], [2, 9, 1, 8, 4, 2], [6, 5, 4, 3, 2, 4, 3]]  # depth 1..6


def reference_grads(model, X, y):
    sd = model.state_dict()
    L = len(model.sizes) - 1
    Ws = [sd[f"layers.{i}.weight"].astype(float) for i in range(L)]
    bs = [sd[f"layers.{i}.bias"].astype(float) for i in range(L)]
    T = dense_targets(y, model.loss, model.sizes[-1])
    return ref.backprop(Ws, bs, X, T, model.activation, model.loss)


@pytest.mark.filterwarnings("ignore:gradcheck.*ReLU kink")  # expected now and then; see test_gradcheck
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("sizes", ARCHS, ids=str)
def test_gradcheck_every_activation_and_loss(sizes, act, loss, rng):
    model = gb.MLP(sizes, activation=act, loss=loss, dtype="float64", seed=int(rng.integers(1 << 30)))
    for batch in (1, 5):
        X, y = random_batch(rng, sizes, loss, batch)
        assert gb.gradcheck(model, X, y) <= 1e-7


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 2e-5)])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", ACTS)
def test_loss_and_grad_match_reference(act, loss, dtype, tol, rng):
    sizes = [13, 17, 9, 5]
    model = gb.MLP(sizes, activation=act, loss=loss, dtype=dtype, seed=3)
    X, y = random_batch(rng, sizes, loss, 23)
    value, grads = model.loss_and_grad(X, y)
    ref_loss, dWs, dbs = reference_grads(model, X.astype(dtype), y)
    assert value == pytest.approx(ref_loss, rel=tol, abs=tol)
    for i in range(3):
        assert grads[f"layers.{i}.weight"].dtype == dtype
        np.testing.assert_allclose(grads[f"layers.{i}.weight"], dWs[i], rtol=tol, atol=tol)
        np.testing.assert_allclose(grads[f"layers.{i}.bias"], dbs[i], rtol=tol, atol=tol)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 12), min_size=2, max_size=6),
    batch=st.integers(1, 40),
    act=st.sampled_from(ACTS),
    loss=st.sampled_from(LOSSES),
    seed=st.integers(0, 2**31),
)
def test_property_backprop_equals_reference_for_any_shape(sizes, batch, act, loss, seed):
    rng = np.random.default_rng(seed)
    model = gb.MLP(sizes, activation=act, loss=loss, dtype="float64", seed=seed)
    X, y = random_batch(rng, sizes, loss, batch)
    value, grads = model.loss_and_grad(X, y)
    ref_loss, dWs, dbs = reference_grads(model, X, y)
    assert value == pytest.approx(ref_loss, rel=1e-12, abs=1e-12)
    for i, (dW, db) in enumerate(zip(dWs, dbs)):
        np.testing.assert_allclose(grads[f"layers.{i}.weight"], dW, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(grads[f"layers.{i}.bias"], db, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("act", ACTS)
def test_float32_work_stays_float32(act, strict_float32, rng):
    """Every NumPy call in a float32 fit, evaluation and update sees float32 only."""
    model = gb.MLP([11, 9, 7, 4], activation=act, seed=0, device=NumpyBackend())
    model.backend.xp = strict_float32
    X, y = random_batch(rng, model.sizes, "cross_entropy", 50)
    for opt in (gb.optim.SGD(0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
                gb.optim.SGD(0.1, momentum=0.5, dampening=0.1), gb.optim.Adam(weight_decay=1e-3), gb.optim.AdamW()):
        model.fit(X, y, epochs=2, batch_size=16, optimizer=opt, progress=False, validation_data=(X, y))
        assert all(v.dtype == np.float32 for v in opt.state.values())
    model.predict_proba(X)
    assert isinstance(model.train_step(X, y, gb.optim.SGD(0.1)), float)
    assert strict_float32.calls > 100
    assert all(v.dtype == np.float32 for v in model.state_dict().values())


@pytest.mark.parametrize("loss", LOSSES)
def test_weighted_float32_work_stays_float32(loss, strict_float32, rng):
    """The weighted losses, every one, on the NumPy backend: float32 only, the weights too."""
    model = gb.MLP([5, 6, 3], activation="tanh", loss=loss, seed=0, device=NumpyBackend())
    model.backend.xp = strict_float32
    X, y = random_batch(rng, model.sizes, loss, 30)
    w = rng.random(30)
    model.fit(X, y, epochs=2, batch_size=8, progress=False, sample_weight=w,
              optimizer=gb.optim.Adam(weight_decay=1e-3, decay_biases=False), validation_data=(X, y, w))
    assert strict_float32.calls > 50 and np.isfinite(model.evaluate(X, y, sample_weight=w)["loss"])


def test_mse_float32_stays_float32(strict_float32, rng):
    model = gb.MLP([3, 5, 2], activation="gelu", loss="mse", seed=0, device=NumpyBackend())
    model.backend.xp = strict_float32
    X, y = random_batch(rng, model.sizes, "mse", 30)
    model.fit(X, y, epochs=1, batch_size=7, progress=False)
    assert model.evaluate(X, y)["mse"] > 0


def test_digits_reach_97_percent_held_out():
    datasets = pytest.importorskip("sklearn.datasets")
    X, y = datasets.load_digits(return_X_y=True)
    X = X / 16.0
    order = np.random.default_rng(0).permutation(len(X))
    train, test = order[:1437], order[1437:]
    model = gb.MLP([64, 128, 64, 10], seed=0)
    history = model.fit(X[train], y[train], epochs=30, batch_size=32, progress=False,
                        validation_data=(X[test], y[test]))
    assert set(history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert len(history["loss"]) == 30 and history["loss"][-1] < history["loss"][0]
    assert model.evaluate(X[test], y[test])["accuracy"] >= 0.97
    assert (model.predict(X[test]) == y[test]).mean() == history["val_accuracy"][-1]


def test_every_sample_once_per_epoch_with_a_last_partial_batch(rng, monkeypatch):
    model = gb.MLP([3, 4, 2], seed=0, device=NumpyBackend())
    seen = []
    real = model.backend.gather_rows
    monkeypatch.setattr(model.backend, "gather_rows",
                        lambda src, index, out: (seen.append((src.shape, index.copy())), real(src, index, out)))
    X, y = random_batch(rng, model.sizes, "cross_entropy", 10)
    opt = gb.optim.SGD(0.1)
    model.fit(X, y, epochs=2, batch_size=4, optimizer=opt, progress=False)
    assert opt.steps == 6  # 4 + 4 + 2 per epoch
    batches = [index for shape, index in seen if shape == (10, 3)]
    assert [len(b) for b in batches] == [4, 4, 2] * 2
    epochs = [np.concatenate(batches[:3]), np.concatenate(batches[3:])]
    for e in epochs:
        assert sorted(e) == list(range(10))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled


def test_fit_without_shuffle_keeps_order_and_batch_larger_than_data(rng):
    model = gb.MLP([3, 4, 2], seed=0)
    X, y = random_batch(rng, model.sizes, "cross_entropy", 5)
    opt = gb.optim.SGD(0.1)
    model.fit(X, y, epochs=3, batch_size=64, shuffle=False, optimizer=opt, progress=False)
    assert opt.steps == 3
    # Full-batch SGD without shuffling is three train_steps on the whole set.
    other = gb.MLP([3, 4, 2], seed=0)
    opt2 = gb.optim.SGD(0.1)
    for _ in range(3):
        other.train_step(X, y, opt2)
    assert_same_params(params_of(model), params_of(other))


def test_same_seed_same_training_different_seed_different(rng):
    X, y = random_batch(rng, [6, 8, 3], "cross_entropy", 40)
    runs = []
    for seed in (7, 7, 8):
        m = gb.MLP([6, 8, 3], seed=seed)
        m.fit(X, y, epochs=3, batch_size=8, optimizer=gb.optim.Adam(1e-2), progress=False)
        runs.append(params_of(m))
    assert_same_params(runs[0], runs[1])
    assert not np.array_equal(runs[0]["layers.0.weight"], runs[2]["layers.0.weight"])


def test_initialisation_scales():
    relu = gb.MLP([400, 300, 10], seed=0, dtype="float64").state_dict()["layers.0.weight"]
    assert relu.std() == pytest.approx(np.sqrt(2 / 400), rel=0.02)
    tanh = gb.MLP([400, 300, 10], activation="tanh", seed=0, dtype="float64").state_dict()["layers.0.weight"]
    assert np.abs(tanh).max() <= np.sqrt(6 / 700) and tanh.std() == pytest.approx(np.sqrt(2 / 700), rel=0.02)
    f32 = gb.MLP([400, 300, 10], seed=0).state_dict()["layers.0.weight"]
    np.testing.assert_array_equal(f32, relu.astype(np.float32))


def test_outputs_and_shapes(rng):
    clf = gb.MLP([4, 6, 3], seed=0)
    X = rng.standard_normal((9, 4))
    assert clf.predict(X).shape == (9,) and clf.predict(X).dtype == np.int64
    proba = clf.predict_proba(X)
    assert proba.shape == (9, 3) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(clf.predict(X), clf.forward(X).argmax(axis=1))
    reg = gb.MLP([4, 6, 2], loss="mse", seed=0)
    assert reg.predict(X).shape == (9, 2)
    with pytest.raises(ValueError, match="predict_proba needs a classification loss"):
        reg.predict_proba(X)
    # More rows than one evaluation chunk.
    big = rng.standard_normal((5000, 4))
    np.testing.assert_array_equal(clf.predict(big)[-9:], clf.predict(big[-9:]))


def test_mse_takes_1d_targets_for_one_output(rng):
    model = gb.MLP([3, 5, 1], loss="mse", dtype="float64", seed=0)
    X = rng.standard_normal((8, 3))
    y = rng.standard_normal(8)
    assert model.loss_and_grad(X, y)[0] == pytest.approx(model.loss_and_grad(X, y[:, None])[0])
    assert model.evaluate(X, y)["mse"] == pytest.approx(np.mean((model.predict(X)[:, 0] - y) ** 2))


def test_soft_labels_equal_one_hot_labels(rng):
    model = gb.MLP([3, 5, 4], dtype="float64", seed=0)
    X, y = random_batch(rng, model.sizes, "cross_entropy", 6)
    a = model.loss_and_grad(X, y)
    b = model.loss_and_grad(X, np.eye(4)[y])
    assert a[0] == b[0]
    for k in a[1]:
        np.testing.assert_array_equal(a[1][k], b[1][k])


def test_stop_training_from_a_callback(rng):
    class StopAfterTwo:
        def __init__(self):
            self.begun = []

        def on_epoch_begin(self, model, epoch):
            self.begun.append(epoch)

        def on_epoch_end(self, model, epoch, logs):
            assert set(logs) == {"loss", "accuracy"}
            model.stop_training = epoch == 1

    cb = StopAfterTwo()
    model = gb.MLP([3, 4, 2], seed=0)
    X, y = random_batch(rng, model.sizes, "cross_entropy", 10)
    history = model.fit(X, y, epochs=10, batch_size=4, callbacks=[cb], progress=False)
    assert cb.begun == [0, 1] and len(history["loss"]) == 2


def test_state_dict_names_shapes_and_round_trip(rng):
    model = gb.MLP([5, 4, 3], seed=1)
    sd = model.state_dict()
    assert {k: v.shape for k, v in sd.items()} == {
        "layers.0.weight": (4, 5), "layers.0.bias": (4,), "layers.1.weight": (3, 4), "layers.1.bias": (3,)}
    sd["layers.0.weight"][:] = 0  # a copy: the model is untouched
    assert model.state_dict()["layers.0.weight"].any()
    other = gb.MLP([5, 4, 3], seed=2)
    other.load_state_dict(model.state_dict())
    assert_same_params(params_of(other), params_of(model))


def test_to_cpu_keeps_parameters():
    model = gb.MLP([5, 4, 3], seed=1)
    before = params_of(model)
    assert model.to("cpu") is model
    assert_same_params(params_of(model), before)
    assert model.device == "cpu" and "cpu" in repr(model)


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("kernels", [False, True], ids=["numpy", "kernels"])
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_workspace_nbytes_counts_what_it_allocates(act, dropout, kernels):
    """The kernels fuse the activations' temporaries away: their workspace has none."""
    from gpubackprop.backend.kernels import KernelBackend
    from gpubackprop.nn.workspace import Workspace

    sizes = [7, 13, 5, 3]
    backend = KernelBackend(np, module=None, n_sm=1) if kernels else NumpyBackend()
    ws = Workspace(backend, sizes, ACTIVATIONS[act], 11, "float32", dropout)
    found = []  # attributes are arrays, lists of arrays (or None), and lists of tuples of arrays
    for v in vars(ws).values():
        for x in v if isinstance(v, list) else [v]:
            found.extend(x if isinstance(x, tuple) else [x])
    assert Workspace.nbytes(sizes, ACTIVATIONS[act], 11, 4, dropout, scratch=not kernels) == sum(
        a.nbytes for a in {id(a): a for a in found}.values() if isinstance(a, np.ndarray))  # views counted once
    assert (ws.scratch[1] == ()) == kernels


@pytest.mark.parametrize("opt", [gb.optim.SGD(0.1), gb.optim.Adam()], ids=repr)
def test_optimizers_allocate_temporaries_only_where_the_backend_uses_them(opt):
    from gpubackprop.backend.kernels import KernelBackend

    kernels = KernelBackend(np, module=None, n_sm=1)
    cases = [(NumpyBackend(), "float32", opt.n_scratch), (kernels, "float32", 0)]
    if FusedCpuBackend is not None:  # fused where a loop takes the dtype, NumPy's chain (and its scratch) elsewhere
        cases += [(FusedCpuBackend(), "float32", 0), (FusedCpuBackend(), "longdouble", opt.n_scratch)]
    for backend, dtype, n in cases:
        model = gb.MLP([3, 4, 2], device=backend, dtype=dtype)
        opt.bind(model)
        assert len(opt.scratch) == n == opt.scratch_buffers(backend, model.params.dtype)
        assert all(s.shape == model.params.shape for s in opt.scratch)
        if backend is not kernels:  # (no module to launch) the update runs on what was allocated
            model.train_step(np.ones((2, 3)), [0, 1], opt)


class _OutOfMemoryBackend(NumpyBackend):
    """The CPU backend, with a device memory of ``limit`` bytes per allocation."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit

    def empty(self, shape, dtype):
        if np.prod(shape) * np.dtype(dtype).itemsize > self.limit:
            raise MemoryError("out of memory")
        return super().empty(shape, dtype)

    def free_bytes(self):
        return self.limit


def test_out_of_memory_names_the_batch_and_bytes_and_changes_nothing(rng):
    # The parameters (77 kB) and a batch of 10 fit; a batch of 100 (102 kB for a_1) does not.
    model = gb.MLP([64, 256, 10], seed=0, device=_OutOfMemoryBackend(limit=90_000))
    before = params_of(model)
    X, y = random_batch(rng, [64, 256, 10], "cross_entropy", 100)
    opt = gb.optim.Adam()
    with pytest.raises(gb.OutOfMemoryError, match=r"batch of 100 rows: 0\.\d MiB needed, 0\.1 MiB free; use a smaller batch_size"):
        model.fit(X, y, batch_size=100, optimizer=opt, progress=False)
    assert_same_params(before, params_of(model))
    assert opt.steps == 0
    model.fit(X, y, epochs=1, batch_size=10, optimizer=opt, progress=False)  # a batch that fits trains
    assert opt.steps == 10


def test_out_of_memory_for_optimizer_state_is_raised_before_any_step(rng):
    backend = _OutOfMemoryBackend(limit=10**6)
    model = gb.MLP([64, 256, 10], seed=0, device=backend)
    backend.limit = 70_000  # the parameters are in; Adam's state (77 kB a buffer) will not fit
    before = params_of(model)
    with pytest.raises(gb.OutOfMemoryError, match=r"the state of Adam\(.*\): 0\.3 MiB needed"):
        model.fit(*random_batch(rng, [64, 256, 10], "cross_entropy", 20), optimizer=gb.optim.Adam(), progress=False)
    assert_same_params(before, params_of(model))


def test_precision_is_checked_saved_and_loaded(tmp_path):
    with pytest.raises(ValueError, match="precision must be one of"):
        gb.MLP([2, 2], precision="bfloat17")
    with pytest.raises(ValueError, match="precision='tf32' needs dtype='float32'"):
        gb.MLP([2, 2], dtype="float64", precision="tf32")
    with pytest.raises(ValueError, match="precision='bf16' needs the CUDA backend's 16-bit kernels; cpu computes"):
        gb.MLP([2, 2], precision="bf16")
    path = str(tmp_path / "m.safetensors")
    gb.MLP([3, 2], precision="tf32").save(path)
    assert gb.load(path).precision == "tf32" and "precision='tf32'" in repr(gb.load(path))


def test_a_memory_mapped_data_set_trains_like_one_in_memory_without_being_read_whole(tmp_path, rng):
    import tracemalloc

    n, d = 20000, 500  # 40 MB of float32 on disk
    X = np.lib.format.open_memmap(tmp_path / "X.npy", mode="w+", dtype=np.float32, shape=(n, d))
    for start in range(0, n, 5000):
        X[start:start + 5000] = rng.standard_normal((5000, d), dtype=np.float32)
    X.flush()
    y = rng.integers(0, 10, n)
    X = np.load(tmp_path / "X.npy", mmap_mode="r")
    settings = dict(epochs=1, batch_size=500, optimizer=None, progress=False)
    streamed = gb.MLP([d, 16, 10], seed=0)
    tracemalloc.start()
    h_streamed = streamed.fit(X, y, **settings)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 2**20  # far under X's 40 MB: batches and a 16 MiB chunk's finiteness mask at a time
    in_memory = gb.MLP([d, 16, 10], seed=0)
    assert in_memory.fit(np.array(X), y, **settings) == h_streamed
    assert_same_params(in_memory.state_dict(), streamed.state_dict())


def test_a_batch_beyond_the_free_memory_is_refused_before_allocating(rng):
    backend = _OutOfMemoryBackend(limit=10**9)
    backend.free_bytes = lambda: 50_000
    allocations = []
    empty = backend.empty
    backend.empty = lambda shape, dtype: allocations.append(shape) or empty(shape, dtype)
    model = gb.MLP([64, 256, 10], seed=0, device=backend)
    allocations.clear()
    with pytest.raises(gb.OutOfMemoryError, match=r"batch of 100 rows: 0\.\d MiB needed, 0\.0 MiB free"):
        model.train_step(*random_batch(rng, [64, 256, 10], "cross_entropy", 100), gb.optim.SGD(0.1))
    assert allocations == []


def test_summary_lists_layers_shapes_parameters_device_dtype_and_precision():
    lines = []
    gb.MLP([784, 128, 10], dtype="float64", dropout=0.1).summary(print_fn=lines.append)
    text = lines[0]
    assert "dense_1  (batch, 128)  relu" in text and text.count("dense_") == 2
    assert "(batch, 10)   linear (softmax in the loss)" in text
    assert "100,480" in text and "1,290" in text
    assert "parameters: 101,770 (814,160 bytes); device cpu, dtype float64, precision float32, dropout 0.1" in text


# ---- losses beyond cross entropy and mse; sample weights ---------------------------------------
@pytest.mark.parametrize("loss", LOSSES)
def test_gradcheck_with_sample_weights(loss, rng):
    model = gb.MLP([4, 6, 3], activation="tanh", loss=loss, dtype="float64", seed=1)
    X, y = random_batch(rng, model.sizes, loss, 9)
    w = rng.random(9) * 2
    w[3] = 0.0
    assert gb.gradcheck(model, X, y, sample_weight=w) <= 1e-7


@pytest.mark.parametrize("opt", [gb.optim.SGD(0.1, momentum=0.9), gb.optim.Adam(1e-2)], ids=repr)
@pytest.mark.parametrize("loss", LOSSES)
def test_full_batch_training_with_zero_weights_equals_training_without_those_rows(loss, opt, rng):
    """scikit-learn's definition of a weight: 0 removes the row. Full batches, float64, the CPU."""
    X, y = random_batch(rng, [5, 8, 3], loss, 40)
    w = np.ones(40)
    w[rng.choice(40, 12, replace=False)] = 0.0
    keep = w > 0
    runs = []
    for X_, y_, w_ in ((X, y, w), (X[keep], y[keep], None)):
        model = gb.MLP([5, 8, 3], loss=loss, dtype="float64", seed=2)
        history = model.fit(X_, y_, epochs=6, batch_size=len(X_), optimizer=gb.optim.from_state_dict(opt.state_dict()),
                            progress=False, sample_weight=w_)
        runs.append((model.state_dict(), history))
    (weighted, h_weighted), (dropped, h_dropped) = runs
    for k in dropped:
        np.testing.assert_allclose(weighted[k], dropped[k], rtol=0, atol=1e-12, err_msg=k)
    np.testing.assert_allclose(h_weighted["loss"], h_dropped["loss"], rtol=1e-12)


def test_sample_weights_in_mini_batches_weigh_each_batch_by_its_rows(rng):
    """Integer weights act as repeated rows within a batch: a batch's loss is sum w l / sum w."""
    X, y = random_batch(rng, [4, 6, 3], "cross_entropy", 6)
    w = np.array([1.0, 2.0, 0.0, 3.0, 1.0, 1.0])
    model = gb.MLP([4, 6, 3], dtype="float64", seed=0)
    repeated = np.repeat(np.arange(6), w.astype(int))
    weighted, grads = model.loss_and_grad(X, y, sample_weight=w)
    plain, plain_grads = model.loss_and_grad(X[repeated], y[repeated])
    assert weighted == pytest.approx(plain, rel=1e-14)
    for k in grads:
        np.testing.assert_allclose(grads[k], plain_grads[k], rtol=1e-12, atol=1e-15)
    evaluated = model.evaluate(X, y, sample_weight=w)
    assert evaluated == pytest.approx(model.evaluate(X[repeated], y[repeated]), rel=1e-12)


def test_class_weight_is_sample_weight_by_class(rng):
    X, y = random_batch(rng, [4, 6, 3], "cross_entropy", 30)
    runs = []
    for kw in ({"class_weight": {0: 3.0, 2: 0.5}}, {"sample_weight": np.array([3.0, 1.0, 0.5])[y]}):
        model = gb.MLP([4, 6, 3], dtype="float64", seed=0)
        runs.append((model.fit(X, y, epochs=2, batch_size=8, progress=False, **kw), params_of(model)))
    assert runs[0][0] == runs[1][0]
    assert_same_params(runs[0][1], runs[1][1])
    with pytest.raises(ValueError, match="class_weight weighs classes, for cross_entropy"):
        gb.MLP([4, 6, 3], loss="mse").fit(X, np.eye(3)[y], class_weight="balanced", progress=False)


def test_binary_cross_entropy_predicts_labels_and_probabilities_per_output(rng):
    """Multilabel: one sigmoid per output; predict is [z > 0] per output, predict_proba sigmoid(z)."""
    X = rng.standard_normal((300, 5))
    Y = np.stack([X[:, 0] > 0, X[:, 1] + X[:, 2] > 0, X[:, 3] < 0.5], axis=1).astype(int)
    model = gb.MLP([5, 16, 3], loss="binary_cross_entropy", seed=0)
    history = model.fit(X, Y, epochs=40, batch_size=32, optimizer=gb.optim.Adam(1e-2), progress=False)
    z = model.forward(X)
    np.testing.assert_array_equal(model.predict(X), (z > 0).astype(np.int64))
    np.testing.assert_allclose(model.predict_proba(X), 1 / (1 + np.exp(-z)), rtol=1e-5)
    assert history["binary_accuracy"][-1] > 0.9 and model.evaluate(X, Y)["binary_accuracy"] == pytest.approx(
        (model.predict(X) == Y).mean())


def test_poisson_predicts_the_mean_count(rng):
    X = rng.standard_normal((400, 3))
    y = rng.poisson(np.exp(0.5 * X[:, 0] - 0.3 * X[:, 1]))
    model = gb.MLP([3, 8, 1], loss="poisson", dtype="float64", seed=0)
    model.fit(X, y, epochs=60, batch_size=50, optimizer=gb.optim.Adam(1e-2), progress=False)
    np.testing.assert_allclose(model.predict(X), np.exp(model.forward(X)), rtol=1e-12)
    rate = np.exp(0.5 * X[:, 0] - 0.3 * X[:, 1])
    assert np.corrcoef(model.predict(X)[:, 0], rate)[0, 1] > 0.9


@pytest.mark.parametrize("loss,y,message", [
    ("binary_cross_entropy", [[0.0], [1.5]], r"binary_cross_entropy needs targets y of values in \[0, 1\]"),
    ("poisson", [[1.0], [-2.0]], "poisson needs targets y of counts >= 0"),
])
def test_targets_out_of_a_losses_range_are_refused(loss, y, message):
    with pytest.raises(ValueError, match=message):
        gb.MLP([2, 1], loss=loss).fit(np.ones((2, 2)), np.array(y), progress=False)


def test_huber_delta_is_kept_in_the_file(tmp_path):
    model = gb.MLP([2, 3, 1], loss="huber", huber_delta=0.25, seed=0)
    model.save(tmp_path / "m.safetensors")
    assert gb.load(tmp_path / "m.safetensors").criterion.delta == 0.25
