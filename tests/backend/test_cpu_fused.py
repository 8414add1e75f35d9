"""The fused CPU loops (cpu_fused, cpu_kernels) against the NumPy backend they stand
in for: the same bits where the order of operations is the same (the optimizer
updates), agreement to rounding elsewhere, on odd sizes with poisoned outputs.
(tests/backend/test_cpu.py runs both against the float64 reference.)"""

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop import backend as backends
from gpubackprop.backend import Dense, DenseBuffers, NumpyBackend, cpu_backend, cpu_blas, get_backend
from gpubackprop.nn import losses
from gpubackprop.nn.activations import ACTIVATIONS
from gpubackprop.optim import OPTIMIZERS, Update

from .test_cpu import loss_buffers, poisoned

cpu_kernels = pytest.importorskip("gpubackprop.backend.cpu_kernels", reason="needs numba (the fast extra)")
FUSED = backends.FusedCpuBackend and backends.FusedCpuBackend()
NUMPY = NumpyBackend()
RULES = [(name, h) for name, rule in OPTIMIZERS.items() for h in rule.examples]


def test_the_cpu_backend_is_the_fused_one_where_numba_is_installed():
    assert isinstance(get_backend("cpu"), backends.FusedCpuBackend)
    assert gb.MLP([2, 3, 2], device="cpu").backend.name == "cpu"  # files and messages see the same device


def test_without_numba_the_cpu_backend_is_numpy_and_says_how_to_get_the_loops(monkeypatch):
    monkeypatch.setattr(backends, "FusedCpuBackend", None)
    be = cpu_backend("device='auto' chose cpu: no GPU")
    assert type(be) is NumpyBackend
    assert be.note.startswith("device='auto' chose cpu: no GPU; ")
    assert "pip install 'gpubackprop[fast]'" in be.note


@pytest.mark.parametrize("name,hyper", RULES, ids=[f"{n}-{h}" for n, h in RULES])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_optimizer_updates_give_the_numpy_backends_bits(name, hyper, dtype, rng):
    n = 1003
    rule = OPTIMIZERS[name]
    opt = rule(**hyper)
    p = {be: rng.standard_normal(n).astype(dtype) for be in (NUMPY, FUSED)}
    p[FUSED][:] = p[NUMPY]
    state = {be: tuple(np.zeros(n, dtype) for _ in opt.state_names) for be in (NUMPY, FUSED)}
    steps = {be: np.zeros(1, np.uint32) for be in (NUMPY, FUSED)}
    for _ in range(4):  # the first step differs (momentum's buffer), so several
        g = rng.standard_normal(n).astype(dtype)
        for be in (NUMPY, FUSED):
            scratch = tuple(poisoned(n, dtype) for _ in range(opt.n_scratch))
            be.optimizer_update(rule, Update(p[be], g, state[be], scratch, steps[be]), opt.settings())
        np.testing.assert_array_equal(p[FUSED], p[NUMPY])
        for got, want in zip(state[FUSED], state[NUMPY]):
            np.testing.assert_array_equal(got, want)
        assert steps[FUSED][0] == steps[NUMPY][0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 19, 13), (5, 3, 130)])
@pytest.mark.parametrize("name", ["identity", "relu", "leaky_relu", "tanh", "sigmoid"])
def test_fused_dense_layers_agree_with_numpy(name, shape, dtype, rng):
    B, n_in, n_out = shape
    a_prev = rng.standard_normal((B, n_in)).astype(dtype)
    W = rng.standard_normal((n_out, n_in)).astype(dtype)
    b = rng.standard_normal(n_out).astype(dtype)
    grad = rng.standard_normal((B, n_out)).astype(dtype)
    results = []
    for be in (NUMPY, FUSED):
        layer = Dense(W, b, poisoned((n_out, n_in), dtype), poisoned(n_out, dtype), ACTIVATIONS[name])
        buf = DenseBuffers(a_prev, poisoned((B, n_out), dtype), None, poisoned((B, n_out), dtype),
                           poisoned((B, n_in), dtype), (poisoned((B, n_out), dtype),), np.ones(B, dtype))
        be.dense_forward(layer, buf)
        buf.grad[...] = grad
        be.dense_backward(layer, buf)
        results.append((buf.out, buf.grad, layer.db, layer.dW, buf.grad_prev))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for got, want in zip(*reversed(results)):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    np.testing.assert_array_equal(results[1][0], results[0][0])  # bias and g: one rounding each, as NumPy


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_fused_losses_agree_with_numpy_and_count_the_same_hits(loss, weighted, dtype, rng):
    B, C = 41, 7
    z = (rng.standard_normal((B, C)) * 4).astype(dtype)
    y = np.eye(C, dtype=dtype)[rng.integers(0, C, B)]
    z[3] = z[3, 0]  # a row of ties: argmax takes the first, as NumPy's
    w = (rng.random(B) * (rng.random(B) > 0.3)).astype(dtype) if weighted else None
    out = []
    for be in (NUMPY, FUSED):
        delta, value, running = poisoned((B, C), dtype), poisoned((), dtype), np.array([0.5, 1.0])
        buffers = loss_buffers(z, y, delta, value)
        if weighted:
            buffers = buffers._replace(weight=w, weight_sum=np.array(w.sum(), dtype))
        be.loss(losses.get_loss(loss), buffers, running)
        out.append((value, delta, running))
    tol = 1e-6 if dtype == np.float32 else 1e-14
    (v0, d0, r0), (v1, d1, r1) = out
    assert v1.dtype == dtype and d1.dtype == dtype
    np.testing.assert_allclose(v1, v0, rtol=tol)
    np.testing.assert_allclose(d1, d0, rtol=tol, atol=tol)
    np.testing.assert_allclose(r1[0], r0[0], rtol=tol)
    if weighted:  # the hits' weights summed in another order
        np.testing.assert_allclose(r1[1], r0[1], rtol=tol)
    else:
        assert r1[1] == r0[1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan, None])
def test_nonfinite_flags_exactly_inf_and_nan(bad, dtype, rng):
    g = (rng.uniform(-1, 1, 10_007) * (float(np.finfo(dtype).max) / 2)).astype(dtype)  # finite; g . g overflows
    if bad is not None:
        g[rng.integers(g.size)] = bad
    flag = np.zeros(1, np.uint32)
    FUSED.flag_nonfinite(g, flag)
    assert flag[0] == (bad is not None)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
def test_fit_on_the_fused_loops_follows_numpy(activation, optimizer, rng):
    """A whole fit (fused where the loops exist, NumPy's ufuncs for GELU) lands where
    the NumPy backend's does."""
    X = rng.standard_normal((203, 11)).astype(np.float32)
    y = rng.integers(0, 4, 203)
    params = []
    for be in (NUMPY, FUSED):
        model = gb.MLP([11, 16, 9, 4], activation=activation, seed=3, device=be)
        opt = gb.optim.SGD(0.1, momentum=0.9) if optimizer == "SGD" else gb.optim.Adam(1e-2)
        model.fit(X, y, epochs=3, batch_size=32, optimizer=opt, progress=False)
        params.append(model.params.copy())
    np.testing.assert_allclose(params[1], params[0], rtol=1e-4, atol=1e-5)


def test_nan_logits_count_hits_as_numpy_does(rng):
    """np.argmax takes the first NaN as the largest; so does the fused loss."""
    z = rng.standard_normal((6, 4)).astype(np.float32)
    z[0, 2] = z[1, 0] = z[2, 3] = np.nan
    y = np.eye(4, dtype=np.float32)[[2, 1, 3, 0, 1, 2]]
    hits = []
    for be in (NUMPY, FUSED):
        running = np.zeros(2)
        with np.errstate(invalid="ignore"):
            be.loss(losses.get_loss("cross_entropy"), loss_buffers(z, y, poisoned(z.shape, np.float32), poisoned((), np.float32)),
                    running)
        hits.append(running[1])
    assert hits[1] == hits[0] == (z.argmax(1) == y.argmax(1)).sum()


def test_sums_over_a_large_batch_stay_accurate(rng):
    """The bias gradient and the loss are sums over the batch: formed in float64, they
    stay as close to the float64 truth as NumPy's blocked float32 sums, or closer."""
    B = 200_003
    grad = rng.standard_normal((B, 3)).astype(np.float32) + 1.0
    a = np.abs(rng.standard_normal((B, 3))).astype(np.float32) + 0.1  # ReLU's g' = 1 everywhere
    db = poisoned(3, np.float32)
    cpu_kernels.DENSE["relu"].backward(grad, a, db)
    truth = grad.astype(np.float64).sum(axis=0)
    numpy_error = np.abs(np.ones(B, np.float32) @ grad - truth).max()
    assert np.abs(db - truth).max() <= max(numpy_error, 1e-7 * np.abs(truth).max())


def test_a_loop_numba_cannot_cache_is_compiled_per_process_instead():
    """Where no cache folder can be written (a read-only install and home), numba refuses
    cache=True with a RuntimeError; the loops compile without the disk cache instead
    of failing the import. Code from a string has no cache location: the same refusal."""
    uncacheable = eval("lambda x: x + 1")  # noqa: S307 (a constant expression)
    assert cpu_kernels.compiled(uncacheable)(2) == 3


def test_the_tanh_familys_backward_runs_its_loop_though_its_forward_is_numpys(monkeypatch, rng):
    """A performance fact, held as a fact: before a refactor caught it, the test for
    'fused' asked for a forward loop in the backward pass too."""
    calls = []
    loops = cpu_kernels.DENSE["tanh"]

    def backward(*args):
        calls.append(1)
        return loops.backward(*args)

    monkeypatch.setitem(cpu_kernels.DENSE, "tanh", loops._replace(backward=backward))
    X, y = rng.standard_normal((40, 5)).astype(np.float32), rng.integers(0, 3, 40)
    gb.MLP([5, 8, 3], activation="tanh", device=FUSED).fit(X, y, epochs=1, batch_size=20, progress=False)
    assert len(calls) == 2  # two steps, one hidden tanh layer


# ---- a pack's member axis (gpubackprop.nn.packed) ----------------------------------------------
def member_columns(x):
    """A (K, B, n) stack as member columns of one wide (B, K n) array, as a pack's first layer holds them."""
    K, B, n = x.shape
    wide = np.full((B, K * n), np.nan, x.dtype)
    columns = wide.reshape(B, K, n).transpose(1, 0, 2)
    columns[...] = x
    return columns


MATMULS = {"numpy": None, "mkl": None if cpu_blas.mkl() is None else cpu_blas.mkl().matmul}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 37, 19, 13), (4, 5, 3, 130)])
@pytest.mark.parametrize("name", ["identity", "relu", "leaky_relu", "tanh", "sigmoid", "gelu"])
@pytest.mark.parametrize("library", sorted(MATMULS))
def test_fused_member_layers_agree_with_numpys_member_by_member(name, shape, dtype, library, rng):
    """Inputs and input gradients in member columns of a wide array (the layer above a pack's
    first), every output poisoned; gelu keeps z, and runs NumPy's code member by member."""
    if MATMULS[library] is None and library != "numpy":
        pytest.skip("needs the mkl wheel")
    K, B, n_in, n_out = shape
    act = ACTIVATIONS[name]
    a_prev = member_columns(rng.standard_normal((K, B, n_in)).astype(dtype))
    W, b = rng.standard_normal((K, n_out, n_in)).astype(dtype), rng.standard_normal((K, n_out)).astype(dtype)
    grad = rng.standard_normal((K, B, n_out)).astype(dtype)
    results = []
    for be in (NUMPY, FUSED):
        layer = Dense(W, b, poisoned((K, n_out, n_in), dtype), poisoned((K, n_out), dtype), act)
        z = poisoned((K, B, n_out), dtype) if act.needs_z else None
        buf = DenseBuffers(a_prev, poisoned((K, B, n_out), dtype), z, poisoned((K, B, n_out), dtype),
                           member_columns(poisoned((K, B, n_in), dtype)),
                           tuple(poisoned((K, B, n_out), dtype) for _ in range(act.n_scratch)), np.ones(B, dtype),
                           MATMULS[library] if be is FUSED else None)
        be.dense_forward_members(layer, buf)
        buf.grad[...] = grad
        be.dense_backward_members(layer, buf)
        results.append((buf.out, buf.grad, layer.db, layer.dW, buf.grad_prev))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for got, want in zip(*reversed(results)):
        assert got.dtype == dtype and np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


class Block:
    def __init__(self, start, size):
        self.start, self.size = start, size


def member_blocks(K, sizes):
    """Blocks of K rows of each size, one after another with a gap (a pack aligns its blocks)."""
    blocks, start = [], 0
    for size in sizes:
        blocks.append(Block(start, size))
        start += K * size + 3
    return blocks, start


@pytest.mark.parametrize("name", ["SGD", "Adam"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_member_optimizer_updates_give_each_members_lone_update_bits(name, dtype, rng):
    """Per-member hyperparameters and step counts; a skipped member keeps its parameters and
    its count: on the fused loops and the NumPy backend's member-by-member code alike, each
    member's parameters the bits of its lone update on a contiguous copy."""
    rule, K = OPTIMIZERS[name], 3
    hyper = [dict(lr=0.1, momentum=0.9, nesterov=True), dict(lr=0.05, weight_decay=0.1), dict(lr=0.2, momentum=0.5)] \
        if name == "SGD" else [dict(lr=1e-2), dict(lr=3e-3, weight_decay=0.1), dict(lr=5e-2, betas=(0.8, 0.9))]
    settings = [rule(**h).settings() for h in hyper]
    state_names = rule(**hyper[0]).state_names
    blocks, n = member_blocks(K, [7, 130, 1])
    p0 = rng.standard_normal(n).astype(dtype)
    steps0 = np.array([0, 4, 2], np.uint32)
    skip = np.array([0, 1, 0], np.uint32)
    results = {}
    for be in (NUMPY, FUSED):
        p, steps = p0.copy(), steps0.copy()
        state = tuple(np.zeros(n, dtype) for _ in state_names)
        scratch = tuple(poisoned(n, dtype) for _ in range(be.update_scratch(rule, dtype)))
        for _ in range(3):
            g = np.random.default_rng(7 + _).standard_normal(n).astype(dtype)
            update = backends.MemberUpdate(p, g, state, scratch, tuple(blocks), steps, skip, np.zeros(K, np.uint32),
                                           np.full(1, 7, np.uint32))  # scratch: any value
            prepared = be.prepare_members(rule, blocks, [[h] * len(blocks) for h in settings], dtype)
            assert (prepared.arguments is None) == (be is NUMPY)  # the fused loop's, made once per settings
            be.optimizer_update_members(rule, update, prepared)
        results[be] = p, steps
    np.testing.assert_array_equal(results[FUSED][0], results[NUMPY][0])
    np.testing.assert_array_equal(results[FUSED][1], steps0 + np.array([3, 0, 3]))
    for k in range(K):
        parts = [slice(b.start + k * b.size, b.start + (k + 1) * b.size) for b in blocks]
        lone, steps = np.concatenate([p0[s] for s in parts]), np.array([steps0[k]], np.uint32)
        state = tuple(np.zeros(lone.size, dtype) for _ in state_names)
        for _ in range(3 if not skip[k] else 0):
            g = np.random.default_rng(7 + _).standard_normal(n).astype(dtype)
            FUSED.optimizer_update(rule, Update(lone, np.concatenate([g[s] for s in parts]), state, (), steps),
                                   settings[k])
        np.testing.assert_array_equal(np.concatenate([results[FUSED][0][s] for s in parts]), lone, err_msg=f"{k}")


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_member_nonfinite_flags_the_member_alone(bad, rng):
    K = 4
    blocks, n = member_blocks(K, [5, 17])
    g = rng.standard_normal(n).astype(np.float32)
    g[blocks[1].start + 2 * blocks[1].size + 3] = bad  # member 2's second block
    g[blocks[0].start + K * blocks[0].size + 1] = bad  # a gap between blocks: no member's
    for be in (NUMPY, FUSED):
        flags = np.array([1, 1, 0, 1], np.uint32)  # cleared where finite
        be.flag_nonfinite_members(g, blocks, flags)
        np.testing.assert_array_equal(flags, [0, 0, 1, 0])
