"""The CUDA backend's code path (KernelBackend launching kernels/*.cu) gives the
NumPy backend's answers.

Each test runs once per kernel runner (fixture ``kernel_backend``): the kernel
sources compiled for the CPU by the host harness, always (this is what CI runs),
and the real CUDA backend where a GPU is present (``pytest -m gpu``). Inputs are
fresh random numbers; sizes are odd, off the block sizes, and large enough to
take the kernels' grid-stride loops and multi-block reductions; every output is
poisoned with NaN first, so an element a kernel fails to write fails the test.
"""

import types

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop import optim
from gpubackprop.nn.activations import ACTIVATIONS
from gpubackprop.backend import Dense, DenseBuffers
from gpubackprop.backend import kernels as kb
from gpubackprop.backend.cpu import NumpyBackend
from gpubackprop.nn.parameters import names
from gpubackprop.nn.workspace import Workspace
from gpubackprop.nn.losses import LOSSES
from gpubackprop.tools.selftest import (OPTIMIZERS, dense_layer, layer_inputs, loss_targets, optimizer_steps, poisoned,
                                        run_loss)

from ..helpers import random_batch

CPU = NumpyBackend()
TOL = {np.float32: 1e-5, np.float64: 1e-12}  # max error over the largest magnitude
LOW_TOL = {"float16": 2e-3, "bfloat16": 1e-2}  # normwise, as the device METHOD gives for 16-bit
# (batch, n_in, n_out): one element; odd; several row slices in the bias-gradient
# reduction; columns past one 32-wide tile and not a multiple of it; many rows of a
# narrow layer (the forward epilogue's grid-stride loop over rows).
SHAPES = [(1, 1, 1), (3, 5, 7), (333, 17, 45), (70, 129, 33), (5000, 2, 3)]


def close(actual, expected, tol, what=""):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, what
    assert np.isfinite(actual).all(), f"{what}: unwritten (still NaN) or non-finite elements"
    err = np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_dense_layer_matches_numpy(kernel_backend, name, shape, dtype, rng):
    inputs = layer_inputs(rng, *shape)
    got = dense_layer(kernel_backend, ACTIVATIONS[name], dtype, **inputs)
    want = dense_layer(CPU, ACTIVATIONS[name], dtype, **inputs)
    for k in want:
        close(got[k], want[k], TOL[dtype], k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B,C", [(1, 1), (5, 3), (37, 10), (300, 70), (257, 19)])
@pytest.mark.parametrize("scale", [3.0, 300.0])  # 300: logits far past exp's range
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_loss_matches_numpy(kernel_backend, loss, scale, B, C, dtype, rng):
    z = rng.standard_normal((B, C)) * scale
    y = rng.random((B, C))
    y /= y.sum(axis=1, keepdims=True)  # soft targets: rows of probabilities
    z[0] = z[-1]  # a tie for the argmax when B > 1: the first column holding the max wins
    y[1 % B, 0] = y[1 % B].max()
    y[-1] = 0.0
    y[-1, z[-1].argmax()] = 1.0  # at least one hit, so counting none fails (inputs once gave none by chance)
    (lk, dk, rk), (lc, dc, rc) = (run_loss(be, loss, z, y, dtype, running=(2.5, 7.0)) for be in (kernel_backend, CPU))
    close(lk, lc, TOL[dtype], "loss")
    close(dk, dc, TOL[dtype], "delta")
    close(rk[0], rc[0], TOL[dtype], "running loss")
    assert rk[1] == rc[1] and (loss == "mse") == (rk[1] == 7.0)  # hits counted for cross entropy only


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B,C", [(1, 1), (37, 10), (300, 70), (257, 19)])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_matches_numpy_with_and_without_weights(kernel_backend, loss, weighted, B, C, dtype, rng):
    """Every loss of the table, with sample weights (a third of them 0) and without;
    huber with a delta that puts elements on both of its sides; the running hits
    (weighted) exactly where the loss counts them."""
    z = rng.standard_normal((B, C)) * 3
    y = loss_targets(loss, rng, (B, C), z)
    w = rng.integers(0, 3, B) * 0.75 if weighted else None
    if weighted:
        w[0] = 1.5  # never all 0: a batch of weight 0 has its own test
    runs = [run_loss(be, loss, z, y, dtype, (2.5, 7.0), w, huber_delta=0.7) for be in (kernel_backend, CPU)]
    (lk, dk, rk), (lc, dc, rc) = runs
    close(lk, lc, TOL[dtype], "loss")
    close(dk, dc, TOL[dtype], "delta")
    close(rk[0], rc[0], TOL[dtype], "running loss")
    close(rk[1], rc[1], TOL[dtype], "running hits")
    assert (rk[1] == 7.0) == (not LOSSES[loss].classifies)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 1001, 5003])
def test_add_scaled_matches_numpy(kernel_backend, n, dtype, rng):
    x, y = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
    out = []
    for be in (kernel_backend, CPU):
        with be.context():
            result = poisoned(be, (n,), dtype)
            be.add_scaled(result, be.asarray(y), be.asarray(x), 0.37)
            out.append(be.to_host(result))
    close(out[0], out[1], TOL[dtype], "y + a x")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 37, 5003])
def test_sum_matches_numpy(kernel_backend, n, dtype, rng):
    x = rng.random(n).astype(dtype)
    with kernel_backend.context():
        out = poisoned(kernel_backend, (), dtype)
        kernel_backend.sum(kernel_backend.asarray(x), out)
        close(kernel_backend.to_host(out), x.astype(np.float64).sum(), TOL[dtype], "sum")


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_a_batch_whose_weights_are_all_zero_has_zero_loss_and_gradient(kernel_backend, loss, rng):
    z = rng.standard_normal((9, 4))
    y = loss_targets(loss, rng, (9, 4), z)
    for be in (kernel_backend, CPU):
        value, delta, running = run_loss(be, loss, z, y, np.float64, (2.5, 7.0), np.zeros(9))
        assert value == 0.0 and not delta.any() and list(running) == [2.5, 7.0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 1001, 5003])  # 5003 > the host's grid: the grid-stride loop
@pytest.mark.parametrize("opt", OPTIMIZERS, ids=repr)
def test_optimizer_matches_numpy(kernel_backend, opt, n, dtype, rng):
    """Three steps through the real optimizer classes, state and all."""
    p0, grads = rng.standard_normal(n), [rng.standard_normal(n) for _ in range(3)]
    results = [optimizer_steps(be, opt, p0, grads, dtype) for be in (kernel_backend, CPU)]
    for got, want in zip(*results):
        close(got, want, TOL[dtype])


def test_reductions_are_deterministic(kernel_backend, rng):
    """db over several row slices and the loss over several blocks: same bits twice."""
    inputs = layer_inputs(rng, 4099, 37, 300)
    z, y = rng.standard_normal((4099, 300)), rng.random((4099, 300))
    runs = [(dense_layer(kernel_backend, ACTIVATIONS["tanh"], np.float32, **inputs)["db"],
             run_loss(kernel_backend, "cross_entropy", z, y, np.float32)[::2]) for _ in range(2)]
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert runs[0][1][0] == runs[1][1][0]
    np.testing.assert_array_equal(runs[0][1][1], runs[1][1][1])


# ---- float16 / bfloat16: the kernels' storage types for mixed precision -----------
def low_precision_dtype(kernel_backend, name):
    if name == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        try:
            kernel_backend.asarray(np.zeros(1), ml_dtypes.bfloat16)
        except (TypeError, ValueError) as e:
            pytest.skip(f"{kernel_backend.name} holds no bfloat16 arrays: {e}")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def normwise(actual, expected, tol, what):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert np.isfinite(actual).all(), f"{what}: unwritten (still NaN) or non-finite elements"
    err = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
    assert err <= tol, f"{what}: normwise relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("low", kb.LOW_PRECISION)
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_low_precision_kernels(kernel_backend, name, low, rng):
    """16-bit storage, float32 arithmetic, against float32 NumPy on the same rounded
    inputs. W = I makes the GEMM exact in any precision, so what is compared is our
    kernels' work (a, delta, db, the losses), not how a 16-bit GEMM accumulates."""
    dtype = low_precision_dtype(kernel_backend, low)
    inputs = {k: v.astype(dtype).astype(np.float32) for k, v in layer_inputs(rng, 131, 45, 45).items()}
    inputs["W"] = np.eye(45, dtype=np.float32)
    got = dense_layer(kernel_backend, ACTIVATIONS[name], dtype, **inputs)
    want = dense_layer(CPU, ACTIVATIONS[name], np.float32, **inputs)
    for k in ("a", "delta", "db"):
        normwise(got[k], want[k], LOW_TOL[low], k)
    z, y = inputs["grad"] * 3, np.eye(45)[rng.integers(0, 45, 131)]
    for loss in ("cross_entropy", "mse"):
        (lk, dk, _), (lc, dc, _) = run_loss(kernel_backend, loss, z, y, dtype), run_loss(CPU, loss, z, y, np.float32)
        normwise(lk, lc, LOW_TOL[low], f"{loss} loss")
        normwise(dk, dc, LOW_TOL[low], f"{loss} delta")


# ---- whole models ------------------------------------------------------------------
@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_model_gradients_match_cpu(kernel_backend, act, loss, rng):
    sizes = [33, 17, 65, 5]  # odd sizes, none a multiple of a block
    X, y = random_batch(rng, sizes, loss, 37)
    w = rng.random(37) * (rng.random(37) > 0.3) if act == "tanh" else None  # weighted, with zeros, once per loss
    (lk, gk), (lc, gc) = (gb.MLP(sizes, activation=act, loss=loss, dtype="float64", seed=0, device=be)
                          .loss_and_grad(X, y, w) for be in (kernel_backend, CPU))
    close(lk, lc, 1e-12, "loss")
    for k in gc:
        close(gk[k], gc[k], 1e-10, k)


@pytest.mark.parametrize("loss", ["cross_entropy", "binary_cross_entropy", "poisson"])
def test_weighted_fit_graphed_equals_eager_and_tracks_the_cpu(kernel_backend, loss, rng):
    """Sample weights gathered with each batch inside the captured step: replays weigh
    every new batch by its own rows, as eager steps and the NumPy backend do."""
    X, y = random_batch(rng, [9, 33, 3], loss, 203)
    w = rng.random(203) * 2 * (rng.random(203) > 0.2)
    runs = []
    for be, graphs in ((kernel_backend, True), (kernel_backend, False), (CPU, False)):
        m = gb.MLP([9, 33, 3], loss=loss, seed=3, device=be)
        runs.append((m.fit(X, y, epochs=3, batch_size=20, optimizer=optim.Adam(3e-3), progress=False, graphs=graphs,
                           sample_weight=w, validation_data=(X[:40], y[:40], w[:40])), m.state_dict()))
    (hg, pg), (he, pe), (hc, pc) = runs
    assert hg == he
    for k in pe:
        np.testing.assert_array_equal(pg[k], pe[k], err_msg=k)
        np.testing.assert_allclose(pe[k], pc[k], rtol=1e-4, atol=1e-5, err_msg=k)
    for k in hc:
        np.testing.assert_allclose(he[k], hc[k], rtol=1e-4, err_msg=k)


def test_hundred_steps_match_cpu_losses(kernel_backend, rng):
    """100 float32 Adam steps, loss by loss, track the CPU to 1e-4."""
    sizes = [20, 48, 32, 4]
    X, y = random_batch(rng, sizes, "cross_entropy", 400)
    batches = [rng.choice(400, 32, replace=False) for _ in range(100)]
    runs = []
    for be in (kernel_backend, CPU):
        m, opt = gb.MLP(sizes, activation="gelu", seed=1, device=be), optim.Adam(3e-3)
        runs.append([m.train_step(X[i], y[i], opt) for i in batches])
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-4)
    assert runs[0][-1] < 0.9 * runs[0][0]  # and it learned


def test_fit_matches_cpu_and_moves_between_devices(kernel_backend, rng):
    """fit's device path (data copied once, batches gathered on the device, losses
    summed there), with reshuffled epochs, a partial last batch and validation."""
    X, y = random_batch(rng, [20, 32, 4], "cross_entropy", 300)
    runs = []
    for be in (kernel_backend, CPU):
        m = gb.MLP([20, 32, 4], seed=1, device=be)
        runs.append((m, m.fit(X, y, epochs=3, batch_size=32, optimizer=optim.SGD(0.1, momentum=0.9),
                              validation_data=(X[:50], y[:50]), progress=False)))
    (moved, hk), (cpu, hc) = runs
    for k in hc:
        np.testing.assert_allclose(hk[k], hc[k], rtol=1e-4, err_msg=k)
    moved.to("cpu")
    assert moved.device == "cpu"
    for k, v in cpu.state_dict().items():
        np.testing.assert_allclose(moved.state_dict()[k], v, rtol=1e-4, atol=1e-5, err_msg=k)


def test_fit_copies_the_data_once_and_gathers_batches_on_the_device(kernel_backend, rng, monkeypatch):
    X, y = random_batch(rng, [20, 32, 4], "cross_entropy", 300)
    model = gb.MLP([20, 32, 4], seed=1, device=kernel_backend)
    copies, gathers = [], []
    asarray, gather = kernel_backend.asarray, kernel_backend.gather_rows
    monkeypatch.setattr(kernel_backend, "asarray", lambda x, dtype=None: copies.append(np.shape(x)) or asarray(x, dtype))
    monkeypatch.setattr(kernel_backend, "gather_rows", lambda src, index, out: gathers.append(src) or gather(src, index, out))
    model.fit(X, y, epochs=3, batch_size=32, optimizer=optim.SGD(0.1), progress=False, graphs=False)
    # X and its targets once, the optimizer's step count, then one shuffled index vector per epoch.
    assert copies == [(300, 20), (300,), (1,)] + [(300,)] * 3
    assert len(gathers) == 3 * 10 * 2 and all(kernel_backend.is_native(src) for src in gathers)  # inputs, targets


@pytest.mark.parametrize("opt", [optim.SGD(0.05, momentum=0.9, nesterov=True), optim.Adam(3e-3)], ids=repr)
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_graph_steps_equal_eager_steps(kernel_backend, loss, opt, rng):
    """A captured step replays the same work with the same buffers and scalars: the
    step count (SGD's first step, Adam's bias corrections) and the running metrics
    must live on the device for replays to come out equal to eager steps."""
    X, y = random_batch(rng, [9, 33, 3], loss, 203)  # a partial last batch: two graphs
    runs = []
    for graphs in (True, False):
        m, o = gb.MLP([9, 33, 3], loss=loss, activation="gelu", seed=3, device=kernel_backend), optim.from_state_dict(opt.state_dict())
        runs.append((m.fit(X, y, epochs=3, batch_size=20, optimizer=o, progress=False, graphs=graphs), m.state_dict(), o))
    (hg, pg, og), (he, pe, oe) = runs
    assert hg == he and og.steps == oe.steps == 33
    for k in pe:
        np.testing.assert_array_equal(pg[k], pe[k], err_msg=k)
    for k in oe.state:
        np.testing.assert_array_equal(kernel_backend.to_host(og.state[k]), kernel_backend.to_host(oe.state[k]))


def test_a_changed_learning_rate_is_captured_anew(kernel_backend, rng):
    X, y = random_batch(rng, [5, 7, 2], "cross_entropy", 64)
    runs = []
    for graphs in (True, False):
        m, o = gb.MLP([5, 7, 2], seed=0, device=kernel_backend), optim.SGD(0.1)
        halve = types.SimpleNamespace(on_epoch_end=lambda model, epoch, logs: setattr(o, "lr", o.lr / 2))
        m.fit(X, y, epochs=3, batch_size=16, optimizer=o, progress=False, graphs=graphs, callbacks=[halve])
        runs.append(m.state_dict())
    for k in runs[0]:
        np.testing.assert_array_equal(runs[0][k], runs[1][k], err_msg=k)


def test_graph_steps_survive_a_callback_that_evicts_the_workspace(kernel_backend, rng):
    """A callback predicting on four other batch sizes pushes the training batch's
    workspace out of the model's cache; the next epoch makes a new one of the same
    size. A captured step must never replay against the old one (on a GPU: freed
    memory), so graphs stay equal to eager steps."""
    X, y = random_batch(rng, [9, 33, 3], "cross_entropy", 200)

    class PredictElsewhere:
        def on_epoch_end(self, model, epoch, logs):
            for rows in (3, 5, 7, 11):
                model.predict(X[:rows])
            live = model.workspaces.live()
            for graphs in model.workspaces.users:  # the evicted workspaces took their captured steps with them
                for buffers in graphs.held():
                    [ws] = [b for b in buffers if isinstance(b, Workspace)]
                    assert any(ws is w for w in live)

    runs = []
    for graphs in (True, False):
        m = gb.MLP([9, 33, 3], seed=3, device=kernel_backend)
        history = m.fit(X, y, epochs=3, batch_size=20, optimizer=optim.Adam(3e-3), progress=False, graphs=graphs,
                        callbacks=[PredictElsewhere()])
        runs.append((history, m.state_dict()))
    assert runs[0][0] == runs[1][0]
    for k in runs[1][1]:
        np.testing.assert_array_equal(runs[0][1][k], runs[1][1][k], err_msg=k)


def test_a_step_awaiting_capture_holds_its_buffers(kernel_backend, rng):
    """Between the eager first step and the capture, the entry keyed by the buffers'
    ids holds them: a buffer freed meanwhile could hand its id to another."""
    X, y = random_batch(rng, [5, 7, 2], "cross_entropy", 40)
    seen = []

    class Look:
        def on_batch_end(self, model, batch, logs):
            if not seen:
                [graphs] = model.workspaces.users
                assert graphs.captured() == []
                [entry] = graphs.held()
                seen.append(entry)

    gb.MLP([5, 7, 2], seed=0, device=kernel_backend).fit(X, y, epochs=1, batch_size=40, progress=False,
                                                         callbacks=[Look()])
    [entry] = seen
    assert isinstance(entry, tuple) and any(isinstance(b, Workspace) for b in entry)


def test_nothing_but_recorded_work_runs_inside_a_capture():
    """The host's stand-in for a CUDA graph refuses any other array operation."""
    from gpubackprop.backend.kernels import KernelBackend

    be = KernelBackend(np, module=None, n_sm=1)
    with pytest.raises(RuntimeError, match="xp.empty called while capturing a graph"):
        be.capture(lambda: be.empty((3,), np.float32))
    assert be.xp is np  # restored after the failed capture


def test_column_major_gemm_describes_each_product_the_model_makes(rng):
    """The cuBLAS call's arguments, carried out by a column-major GEMM written out
    in NumPy from the raw memory, give a @ b for the three layouts of a step."""
    def stored(x, rows, cols, ld):  # the column-major matrix in x's memory
        memory = x.ravel(order="C" if x.flags.c_contiguous else "F")
        return memory.reshape(cols, ld)[:, :rows].T

    for B, n_in, n_out in [(1, 1, 1), (7, 5, 3), (33, 17, 65)]:
        a_prev, W, grad = rng.standard_normal((B, n_in)), rng.standard_normal((n_out, n_in)), rng.standard_normal((B, n_out))
        for a, b in ((a_prev, W.T), (grad.T, a_prev), (grad, W)):
            out = np.full((a.shape[0], b.shape[1]), np.nan)
            ta, tb, m, n, k, first, ld1, second, ld2, ldc = kb.column_major_gemm(a, b, out)
            A = stored(first, *((k, m) if ta else (m, k)), ld1)
            Bm = stored(second, *((n, k) if tb else (k, n)), ld2)
            C = (A.T if ta else A) @ (Bm.T if tb else Bm)  # m x n, column-major into out's memory
            out.reshape(n, ldc)[:, :m] = C.T
            np.testing.assert_allclose(out, a @ b, rtol=1e-12)


def test_column_major_gemm_takes_a_packs_member_columns_as_operands_and_out(rng):
    """Member columns of a wide array (a pack's first-layer activations and their
    gradients): each operand described by its row stride, carried out on raw memory."""
    K, B, n_in, n_out = 3, 7, 5, 4

    def columns(rows, cols, k, fill):  # member k's columns of a (rows, K cols) array, and that array
        wide = np.full((rows, K * cols), fill, np.float64) if np.isscalar(fill) else fill
        return wide[:, k * cols:(k + 1) * cols], wide

    def stored(x, base, rows, cols, ld):  # the column-major matrix at x's address in base's memory
        start = (x.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // x.itemsize
        memory = np.concatenate([base.ravel(), np.full(cols * ld, np.nan)])[start:start + cols * ld]
        return memory.reshape(cols, ld)[:, :rows].T

    W, grad = rng.standard_normal((n_out, n_in)), rng.standard_normal((B, n_out))
    wide_in = rng.standard_normal((B, K * n_in))
    for k in range(K):
        a_prev, _ = columns(B, n_in, k, wide_in)
        out_prev, wide_out = columns(B, n_in, k, np.nan)
        for a, b, out, bases in ((a_prev, W.T, np.full((B, n_out), np.nan), (wide_in, W)),
                                 (grad.T, a_prev, np.full((n_out, n_in), np.nan), (grad, wide_in)),
                                 (grad, W, out_prev, (grad, W))):
            ta, tb, m, n, kk, first, ld1, second, ld2, ldc = kb.column_major_gemm(a, b, out)
            A = stored(first, bases[1] if first is b else bases[0], *((kk, m) if ta else (m, kk)), ld1)
            Bm = stored(second, bases[0] if second is a else bases[1], *((n, kk) if tb else (kk, n)), ld2)
            expected = (A.T if ta else A) @ (Bm.T if tb else Bm)  # m x n: out^T
            assert ldc == out.strides[0] // out.itemsize
            np.testing.assert_allclose(expected.T, a @ b, rtol=1e-12)
    with pytest.raises(ValueError, match="out must be rows of unit stride"):
        kb.column_major_gemm(grad.T, wide_in[:, :n_in], np.empty((n_in, n_out)).T)
    with pytest.raises(ValueError, match="gemm operands must be rows of unit stride"):
        kb.column_major_gemm(wide_in[:, ::2], np.empty((wide_in.shape[1] // 2 + 1, 2)), np.empty((B, 2)))


def test_tf32_precision_rounds_gemm_operands_and_stays_close(kernel_backend, rng):
    """precision="tf32": within TF32's ~3e-4 of float64, and not bit-equal to float32
    (on the GPU the tensor cores do this; the host harness models it)."""
    sizes = [64, 48, 10]
    X, y = random_batch(rng, sizes, "cross_entropy", 96)
    exact = gb.MLP(sizes, dtype="float64", seed=0).loss_and_grad(X, y)[1]
    runs = {p: gb.MLP(sizes, seed=0, device=kernel_backend, precision=p).loss_and_grad(X, y)[1] for p in ("float32", "tf32")}
    for k in exact:
        normwise(runs["tf32"][k], exact[k], 3e-3, k)
        normwise(runs["float32"][k], exact[k], 1e-5, k)
    assert any(not np.array_equal(runs["tf32"][k], runs["float32"][k]) for k in exact)


def test_round_to_tf32_keeps_ten_mantissa_bits():
    e = 2.0**-10  # TF32's last mantissa bit at 1.0
    x = np.array([1.0, 1 + e, 1 + e / 2, 1 + 3 * e / 2, 1 + e + e / 4, -(1 + e / 2 + e / 8), np.inf], np.float32)
    want = np.array([1.0, 1 + e, 1.0, 1 + 2 * e, 1 + e, -(1 + e), np.inf], np.float32)  # ties to even
    np.testing.assert_array_equal(kb.round_to_tf32(x), want)


# ---- mixed precision (bf16, fp16 with loss scaling) ---------------------------------
# Normwise, gradients of a 3-layer ReLU net against float64, as measured: every
# stored activation, delta and weight copy is rounded (bfloat16 keeps 8
# significant bits, float16 11), and where a rounded pre-activation crosses 0
# the ReLU mask flips and passes a whole gradient element or none; the first
# layer collects the most. test_mixed_precision_rounds_where_the_numpy_model_does
# pins the roundings themselves to 2e-3.
MIXED_TOL = {"bf16": 6e-2, "fp16": 3e-2}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_gradients_are_close_to_float64(kernel_backend, precision, rng):
    if precision == "bf16":
        low_precision_dtype(kernel_backend, "bfloat16")  # skips where the backend has no bfloat16
    sizes = [40, 64, 32, 10]
    X, y = random_batch(rng, sizes, "cross_entropy", 128)
    exact_loss, exact = gb.MLP(sizes, dtype="float64", seed=0).loss_and_grad(X, y)
    model = gb.MLP(sizes, seed=0, device=kernel_backend, precision=precision)
    loss, grads = model.loss_and_grad(X, y)
    assert loss == pytest.approx(exact_loss, rel=MIXED_TOL[precision])
    for k in exact:
        normwise(grads[k], exact[k], MIXED_TOL[precision], k)
        assert grads[k].dtype == np.float32  # master gradients


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_like_float32(kernel_backend, precision, rng):
    if precision == "bf16":
        low_precision_dtype(kernel_backend, "bfloat16")
    X, y = random_batch(rng, [20, 48, 4], "cross_entropy", 256)
    y = (X[:, :4].argmax(1))  # a learnable rule
    hist = {p: gb.MLP([20, 48, 4], seed=0, device=kernel_backend, precision=p).fit(
        X, y, epochs=8, batch_size=32, optimizer=optim.Adam(3e-3), progress=False) for p in ("float32", precision)}
    assert hist[precision]["loss"][-1] < 0.5 * hist[precision]["loss"][0]
    np.testing.assert_allclose(hist[precision]["loss"], hist["float32"]["loss"], rtol=0.1)


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")  # the host GEMM sees the Inf too
def test_fp16_overflow_skips_the_step_and_halves_the_scale(kernel_backend, rng):
    X, y = random_batch(rng, [6, 16, 3], "cross_entropy", 32)
    model, opt = gb.MLP([6, 16, 3], seed=0, device=kernel_backend, precision="fp16"), optim.Adam(1e-2)
    with kernel_backend.context():
        model.scaler.scale[...] = kernel_backend.asarray(np.array([2.0**60], np.float32))  # float16 overflows
    before = model.state_dict()
    model.train_step(X, y, opt)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)  # skipped whole
    assert opt.steps == 0 and model.scaler.value() == 2.0**59
    model.scaler.scale[...] = kernel_backend.asarray(np.array([2.0**10], np.float32))
    model.train_step(X, y, opt)
    assert opt.steps == 1 and any(not np.array_equal(v, before[k]) for k, v in model.state_dict().items())


def test_fp16_rejects_data_beyond_its_range(kernel_backend):
    model = gb.MLP([2, 3, 2], seed=0, device=kernel_backend, precision="fp16")
    with pytest.raises(ValueError, match="beyond float16's range"):
        model.fit(np.array([[1e5, 0.0], [0.0, 1.0]]), [0, 1], progress=False)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_16_bit_weights_start_16_byte_aligned(kernel_backend, precision):
    """cuBLAS takes its tensor-core GEMM kernels only for 16-byte aligned operands:
    with odd widths, every 16-bit weight and bias view must still start at a
    multiple of 8 elements of the 16-bit copy, and hold the master weights rounded."""
    if precision == "bf16":
        low_precision_dtype(kernel_backend, "bfloat16")
    model = gb.MLP([13, 7, 5, 3], seed=0, device=kernel_backend, precision=precision)
    low = model.parameters.low
    base = low.__array_interface__["data"][0] if isinstance(low, np.ndarray) else low.data.ptr
    for view in [v for layer in model.layers for v in (layer.W, layer.b)]:
        start = view.__array_interface__["data"][0] if isinstance(view, np.ndarray) else view.data.ptr
        assert (start - base) % 16 == 0, f"a view starts {(start - base) // 2} elements in"
    master = model.state_dict()
    for (wn, bn), (W, b, *_) in zip(names(model.sizes), model.layers):
        np.testing.assert_array_equal(kernel_backend.to_host(W).astype(np.float32),
                                      master[wn].astype(model.compute_dtype).astype(np.float32))
        np.testing.assert_array_equal(kernel_backend.to_host(b).astype(np.float32),
                                      master[bn].astype(model.compute_dtype).astype(np.float32))


def test_mixed_precision_graph_steps_equal_eager_steps(kernel_backend, rng):
    X, y = random_batch(rng, [9, 33, 3], "cross_entropy", 203)
    runs = []
    for graphs in (True, False):
        m, o = gb.MLP([9, 33, 3], seed=3, device=kernel_backend, precision="fp16"), optim.Adam(3e-3)
        runs.append((m.fit(X, y, epochs=2, batch_size=20, optimizer=o, progress=False, graphs=graphs),
                     m.state_dict(), m.scaler.value()))
    assert runs[0][0] == runs[1][0] and runs[0][2] == runs[1][2]
    for k in runs[1][1]:
        np.testing.assert_array_equal(runs[0][1][k], runs[1][1][k], err_msg=k)


def mixed_reference(params, X, Y, low, scale=1.0):
    """ReLU net, cross entropy, in float32 NumPy rounding to ``low`` exactly where the
    mixed-precision path stores 16-bit values: inputs, weight copies, GEMM outputs,
    activations, deltas. dW and db stay float32 (the master gradients)."""
    r = lambda x: x.astype(low).astype(np.float32)  # noqa: E731
    L = len(params) // 2
    W = [r(params[f"layers.{i}.weight"]) for i in range(L)]
    b = [r(params[f"layers.{i}.bias"]) for i in range(L)]
    a = [r(X.astype(np.float32))]
    for i in range(L):
        z = r(a[-1] @ W[i].T) + b[i]
        a.append(r(np.maximum(z, 0)) if i < L - 1 else r(z))
    q = np.exp(a[-1] - a[-1].max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    delta = r((q - Y) * np.float32(scale / len(X)))
    grads = {}
    for i in reversed(range(L)):
        grads[f"layers.{i}.weight"] = delta.T @ a[i] / scale
        grads[f"layers.{i}.bias"] = delta.sum(0) / scale
        if i:
            delta = r(r(delta @ W[i]) * (a[i] > 0))
    return grads


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_rounds_where_the_numpy_model_does(kernel_backend, precision, rng):
    """Against a NumPy emulation with the same roundings the agreement is far closer
    than against float64: the kernels round where, and only where, they should."""
    low = low_precision_dtype(kernel_backend, "bfloat16" if precision == "bf16" else "float16")
    sizes = [40, 64, 32, 10]
    X, y = random_batch(rng, sizes, "cross_entropy", 128)
    model = gb.MLP(sizes, seed=0, device=kernel_backend, precision=precision)
    scale = model.scaler.value() if model.scaler is not None else 1.0
    want = mixed_reference(model.state_dict(), X, np.eye(10)[y], low, scale)
    _, grads = model.loss_and_grad(X, y)
    for k in want:
        normwise(grads[k], want[k], 2e-3, k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 1001, 5003])
@pytest.mark.parametrize("ratio", [0.25, 4.0])  # max_norm / ||g||: clipped, then left alone
def test_clip_by_global_norm_matches_numpy(kernel_backend, ratio, n, dtype, rng):
    g0 = rng.standard_normal(n)
    max_norm = ratio * np.linalg.norm(g0)
    results = []
    for be in (kernel_backend, CPU):
        with be.context():
            g = be.asarray(np.array(g0, dtype))
            be.clip_by_global_norm(g, max_norm)
            results.append(be.to_host(g))
    close(results[0], results[1], TOL[dtype])
    want = g0 * min(1.0, max_norm / (np.linalg.norm(g0) + 1e-6))
    close(results[0], want, TOL[dtype] * 10)


def test_clipped_graph_steps_equal_eager_steps(kernel_backend, rng):
    X, y = random_batch(rng, [9, 33, 3], "cross_entropy", 100)
    runs = []
    for graphs in (True, False):
        m = gb.MLP([9, 33, 3], seed=3, device=kernel_backend)
        m.fit(X, y, epochs=2, batch_size=20, optimizer=optim.SGD(0.5), progress=False, graphs=graphs, clip_norm=0.1)
        runs.append(m.state_dict())
    for k in runs[1]:
        np.testing.assert_array_equal(runs[0][k], runs[1][k], err_msg=k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["relu", "tanh", "gelu", "identity"])
def test_dropout_layers_match_numpy(kernel_backend, name, dtype, rng):
    """The kernels draw the NumPy backend's masks (one hash, two implementations)."""
    from gpubackprop.nn.dropout import Dropout

    B, n_in, n_out = 333, 17, 45
    inputs = layer_inputs(rng, B, n_in, n_out)
    act = ACTIVATIONS[name]
    results = []
    for be in (kernel_backend, CPU):
        put = lambda x: be.asarray(np.array(x, dtype))  # noqa: E731
        with be.context():
            a_prev, W, b, grad = map(put, (inputs["a_prev"], inputs["W"], inputs["b"], inputs["grad"]))
            out, dropped = poisoned(be, (B, n_out), dtype), poisoned(be, (B, n_out), dtype)
            z = poisoned(be, (B, n_out), dtype) if act.needs_z else None
            scratch = tuple(poisoned(be, (B, n_out), dtype) for _ in range(act.n_scratch))
            # An offset past 2^32 elements: a rank's shard deep in a global batch, and the hash's high word.
            spec = Dropout(0.3, 12345, be.asarray(np.array([7], np.uint32)), 2, dropped, offset=(2**32 + 5) * n_out)
            dW, db, gp = poisoned(be, (n_out, n_in), dtype), poisoned(be, (n_out,), dtype), poisoned(be, (B, n_in), dtype)
            layer, buf = Dense(W, b, dW, db, act), DenseBuffers(a_prev, out, z, grad, gp, scratch, put(np.ones(B)))
            be.dense_forward(layer, buf, dropout=spec)
            be.dense_backward(layer, buf, dropout=spec)
            results.append({k: be.to_host(v).copy() for k, v in dict(a=out, d=dropped, delta=grad, dW=dW, db=db).items()})
    got, want = results
    for k in want:
        close(got[k], want[k], TOL[dtype], k)
    assert 0.2 < np.mean(want["d"][want["a"] != 0] == 0) < 0.4  # about the rate, 0.3


def test_dropout_fit_is_the_same_on_the_kernels_graphed_and_eager(kernel_backend, rng):
    X, y = random_batch(rng, [9, 33, 17, 3], "cross_entropy", 100)
    runs = {}
    for key, be, graphs in (("graph", kernel_backend, True), ("eager", kernel_backend, False), ("cpu", CPU, False)):
        m = gb.MLP([9, 33, 17, 3], activation="tanh", seed=3, device=be, dropout=0.25)
        runs[key] = (m.fit(X, y, epochs=2, batch_size=20, optimizer=optim.SGD(0.5), progress=False, graphs=graphs),
                     m.state_dict())
    assert runs["graph"][0] == runs["eager"][0]
    np.testing.assert_allclose(runs["graph"][0]["loss"], runs["cpu"][0]["loss"], rtol=1e-4)
    for k in runs["cpu"][1]:
        np.testing.assert_array_equal(runs["graph"][1][k], runs["eager"][1][k], err_msg=k)
        np.testing.assert_allclose(runs["graph"][1][k], runs["cpu"][1][k], rtol=1e-3, atol=1e-5, err_msg=k)


def test_memory_mapped_data_trains_like_device_data(kernel_backend, rng, tmp_path):
    """The streamed path (rows read per batch, the rest of the step captured) equals
    the device-resident one."""
    X, y = random_batch(rng, [9, 17, 3], "cross_entropy", 120)
    np.save(tmp_path / "X.npy", X.astype(np.float32))
    runs = []
    for data in (np.load(tmp_path / "X.npy", mmap_mode="r"), X.astype(np.float32)):
        m = gb.MLP([9, 17, 3], seed=2, device=kernel_backend)
        runs.append((m.fit(data, y, epochs=2, batch_size=16, progress=False), m.state_dict()))
    assert runs[0][0] == runs[1][0]
    for k in runs[1][1]:
        np.testing.assert_array_equal(runs[0][1][k], runs[1][1][k], err_msg=k)
