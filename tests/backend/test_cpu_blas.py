"""The CPU's choice of BLAS (cpu_blas): MKL's products against NumPy's on odd shapes
and every operand layout the layers pass, outputs poisoned; the choice by
measurement (with a stand-in clock and stand-in measurements: no test times
anything), its cache, the override; whole fits on MKL."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.backend import cpu_blas

pytest.importorskip("gpubackprop.backend.cpu_kernels", reason="needs numba (the fast extra)")
FusedCpuBackend = gb.backend.FusedCpuBackend
MKL = cpu_blas.mkl()
needs_mkl = pytest.mark.skipif(MKL is None, reason="needs the mkl wheel (pip install 'gpubackprop[mkl]')")
TOL = {np.float32: 1e-5, np.float64: 1e-12}


def layouts(x):
    """x (m, k) as the layers hand it over: C order, a transposed view, rows of a wider array."""
    wide = np.full((x.shape[0], x.shape[1] + 3), np.nan, x.dtype)
    wide[:, :x.shape[1]] = x
    return {"c": x.copy(), "transposed": np.ascontiguousarray(x.T).T, "strided": wide[:, :x.shape[1]]}


@needs_mkl
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (3, 5, 7), (33, 17, 65), (64, 784, 10), (5, 0, 4), (0, 3, 2)])
def test_mkl_products_match_numpy_in_every_layout(m, k, n, dtype, rng):
    a0, b0 = rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)
    expected = a0.astype(np.float64) @ b0.astype(np.float64)
    for la, a in layouts(a0).items():
        for lb, b in layouts(b0).items():
            out = np.full((m, n), np.nan, dtype)
            MKL.matmul(a, b, out)
            np.testing.assert_allclose(out, expected, rtol=TOL[dtype], atol=TOL[dtype] * max(k, 1),
                                       err_msg=f"a {la}, b {lb}")


def member_stacks(x, members):
    """(K, m, k) stacks as a pack hands them over: C order, each member transposed, and
    member columns of one wide (m, K k) array (the first layer's activations)."""
    K, m, k = x.shape
    wide = np.full((m, K * k), np.nan, x.dtype)
    columns = wide.reshape(m, K, k).transpose(1, 0, 2)
    columns[...] = x
    return {"c": x.copy(), "transposed": np.ascontiguousarray(x.transpose(0, 2, 1)).transpose(0, 2, 1),
            "member columns": columns}


@needs_mkl
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K,m,k,n", [(1, 1, 1, 1), (3, 5, 7, 4), (5, 33, 17, 65)])
def test_mkl_stacked_products_match_numpy_in_every_layout_out_included(K, m, k, n, dtype, rng):
    """A pack's member stacks: one strided-batch call, or member by member where the
    outputs interleave (MKL refuses an output stride below a member's extent)."""
    a0, b0 = rng.standard_normal((K, m, k)).astype(dtype), rng.standard_normal((K, k, n)).astype(dtype)
    expected = a0.astype(np.float64) @ b0.astype(np.float64)
    for la, a in member_stacks(a0, K).items():
        for lb, b in member_stacks(b0, K).items():
            for lo, out in member_stacks(np.full((K, m, n), np.nan, dtype), K).items():
                MKL.matmul(a, b, out)
                np.testing.assert_allclose(out, expected, rtol=TOL[dtype], atol=TOL[dtype] * k,
                                           err_msg=f"a {la}, b {lb}, out {lo}")


@needs_mkl
def test_what_cblas_cannot_take_goes_to_numpy(rng):
    a = rng.standard_normal((6, 4)).astype(np.float32)
    square = rng.standard_normal((4, 4)).astype(np.float32)
    cases = {
        "mixed dtypes": (a, square.astype(np.float64), np.empty((6, 4), np.float32)),
        "a vector": (np.ones(6, np.float32), a, np.empty(4, np.float32)),
        "every other column": (rng.standard_normal((6, 8)).astype(np.float32)[:, ::2], square,
                               np.empty((6, 4), np.float32)),
        "float16": (a.astype(np.float16), square.astype(np.float16), np.empty((6, 4), np.float16)),
    }
    for what, (x, y, out) in cases.items():
        MKL.matmul(x, y, out)
        np.testing.assert_allclose(out, np.matmul(x, y), rtol=1e-3, err_msg=what)
    overlapping = np.ascontiguousarray(square)
    expected = square @ square
    MKL.matmul(overlapping, square, overlapping)  # out is an input: NumPy copies first, cblas would not
    np.testing.assert_allclose(overlapping, expected, rtol=1e-5)


def test_the_fastest_library_is_the_best_pass_of_each_alone_on_the_cores():
    now = [0.0]
    runs = {"slow": 0, "fast": 0}

    def clock():
        now[0] += 1e-4  # reading the clock takes time too
        return now[0]

    def library(name, cost):
        def matmul(a, b, out):
            runs[name] += 1
            now[0] += cost * (3 if runs[name] == 1 else 1)  # the first pass loads kernels

        return name, matmul

    gemms = [(None, None, None)] * 4
    best = cpu_blas.fastest([library("slow", 2e-3), library("fast", 1e-3)], gemms, clock)
    assert best["slow"] == pytest.approx(4 * 2e-3 + 1e-4) and best["fast"] == pytest.approx(4 * 1e-3 + 1e-4)
    # whole passes, at least PASSES of each, each library for SETTLE_S
    assert all(n % 4 == 0 and n // 4 >= cpu_blas.PASSES for n in runs.values())
    assert runs["slow"] * 2e-3 >= cpu_blas.SETTLE_S * 0.9 and runs["fast"] * 1e-3 >= cpu_blas.SETTLE_S * 0.9


class FakeMkl:
    name, version = "mkl", "MKL stand-in 1.0"

    @staticmethod
    def matmul(a, b, out):
        np.matmul(a, b, out=out)


def measured(mkl_seconds, calls):
    def measure(candidates, gemms):
        calls.append(([name for name, _ in candidates], len(gemms)))
        return {"numpy": 1.0, "mkl": mkl_seconds}

    return measure


@pytest.mark.parametrize("mkl_seconds,chosen", [(0.9, "mkl"), (0.99, "numpy"), (1.2, "numpy")])
def test_mkl_is_chosen_only_where_it_wins_by_the_margin_and_the_choice_is_cached(mkl_seconds, chosen, tmp_path):
    calls, path = [], str(tmp_path / "cache" / "cpu_blas.json")
    kw = dict(environ={}, library=lambda: FakeMkl, measure=measured(mkl_seconds, calls))
    matmul = cpu_blas.choose([300, 200, 100], 64, np.float32, cpu_blas.Choices(path), **kw)
    assert matmul is (FakeMkl.matmul if chosen == "mkl" else cpu_blas.numpy_matmul)
    assert calls == [(["numpy", "mkl"], 5)]  # two layers: 2 + 3 GEMMs
    # a new process (a new Choices) on this machine reads the file and measures nothing
    again = cpu_blas.choose([300, 200, 100], 64, np.float32, cpu_blas.Choices(path), **kw)
    assert again is matmul and len(calls) == 1
    with open(path) as f:
        assert list(json.load(f).values()) == [{"float32 64 x [300, 200, 100]": chosen}]
    # another shape, dtype or batch is measured again
    cpu_blas.choose([300, 200, 100], 128, np.float32, cpu_blas.Choices(path), **kw)
    cpu_blas.choose([300, 200, 100], 64, np.float64, cpu_blas.Choices(path), **kw)
    assert len(calls) == 3


def test_batch_sizes_share_a_measurement_by_power_of_two_and_small_steps_are_not_measured(tmp_path):
    calls, choices = [], cpu_blas.Choices(str(tmp_path / "c.json"))
    kw = dict(environ={}, library=lambda: FakeMkl, measure=measured(0.5, calls))
    for batch in (cpu_blas.MAX_ROWS, 3 * cpu_blas.MAX_ROWS, 65, 100, 128):
        cpu_blas.choose([400, 300], batch, np.float32, choices, **kw)
    assert len(calls) == 2  # MAX_ROWS, and 128 for 65..128: predicting on n rows is not a measurement per n
    assert cpu_blas.choose([12, 9, 4], 64, np.float32, choices, **kw) is cpu_blas.numpy_matmul
    assert len(calls) == 2  # a step of a few thousand FLOPs is Python's time: NumPy's, and no measurement


def test_a_damaged_cache_or_a_read_only_folder_costs_only_a_measurement(tmp_path):
    calls = []
    kw = dict(environ={}, library=lambda: FakeMkl, measure=measured(0.5, calls))
    damaged = tmp_path / "cpu_blas.json"
    damaged.write_text("{not json")
    assert cpu_blas.choose([400, 300], 64, np.float32, cpu_blas.Choices(str(damaged)), **kw) is FakeMkl.matmul
    blocked = tmp_path / "a file" / "cpu_blas.json"  # its folder cannot be made: a file stands there
    (tmp_path / "a file").write_text("")
    choices = cpu_blas.Choices(str(blocked))
    assert cpu_blas.choose([400, 300], 64, np.float32, choices, **kw) is FakeMkl.matmul
    assert cpu_blas.choose([400, 300], 64, np.float32, choices, **kw) is FakeMkl.matmul  # kept in memory
    assert len(calls) == 2


def test_the_variable_overrides_the_measurement_and_names_the_extra_it_needs(tmp_path):
    choices, calls = cpu_blas.Choices(str(tmp_path / "c.json")), []
    kw = dict(library=lambda: FakeMkl, measure=measured(0.5, calls))
    assert cpu_blas.choose([400, 300], 64, np.float32, choices, environ={"GPUBACKPROP_CPU_BLAS": "numpy"},
                           **kw) is cpu_blas.numpy_matmul
    assert cpu_blas.choose([400, 300], 64, np.float32, choices, environ={"GPUBACKPROP_CPU_BLAS": " MKL "},
                           **kw) is FakeMkl.matmul
    assert calls == []
    with pytest.raises(RuntimeError, match=r"pip install 'gpubackprop\[mkl\]'"):
        cpu_blas.choose([400, 300], 64, np.float32, choices, environ={"GPUBACKPROP_CPU_BLAS": "mkl"},
                        library=lambda: None)
    with pytest.raises(ValueError, match="GPUBACKPROP_CPU_BLAS='openblas': use one of auto, numpy, mkl"):
        cpu_blas.choose([400, 300], 64, np.float32, choices, environ={"GPUBACKPROP_CPU_BLAS": "openblas"}, **kw)
    # without MKL, or for a dtype cblas has no GEMM of, NumPy's without a word
    assert cpu_blas.choose([400, 300], 64, np.float32, choices, environ={}, library=lambda: None) is cpu_blas.numpy_matmul
    assert cpu_blas.choose([400, 300], 64, np.longdouble, choices, environ={}, **kw) is cpu_blas.numpy_matmul


def test_a_model_keeps_one_library_for_every_batch_size(monkeypatch):
    asked = []

    def matmul_for(self, sizes, act, batch, dtype, dropout):
        asked.append((list(sizes), act.name, batch, np.dtype(dtype).name, dropout))
        return FakeMkl.matmul

    monkeypatch.setattr(FusedCpuBackend, "matmul_for", matmul_for)
    model = gb.MLP([5, 4, 3], device=FusedCpuBackend())
    X, y = np.random.default_rng(0).standard_normal((50, 5)), np.arange(50) % 3
    model.fit(X, y, epochs=1, batch_size=16, progress=False)  # batches of 16 and the last 2, evaluation's
    assert asked == [([5, 4, 3], "relu", 16, "float32", False)]
    assert {ws.matmul for ws in model.workspaces.live()} == {FakeMkl.matmul}


@pytest.mark.parametrize("kw", [dict(dropout=0.2), dict(activation="gelu"), dict(dtype=np.longdouble)],
                         ids=["dropout", "gelu", "longdouble"])
def test_models_with_layers_on_numpys_code_keep_numpys_products(kw):
    """Their NumPy paths multiply with np.matmul: MKL beside it would be two thread pools."""
    model = gb.MLP([5, 4, 3], device=FusedCpuBackend(), **kw)
    model.predict(np.zeros((2, 5)))
    assert [ws.matmul for ws in model.workspaces.live()] == [None]


def fit_params(blas, monkeypatch, X, y):
    monkeypatch.setenv("GPUBACKPROP_CPU_BLAS", blas)
    model = gb.MLP([X.shape[1], 33, 17, 4], seed=5, device=FusedCpuBackend())
    model.fit(X, y, epochs=3, batch_size=37, optimizer=gb.optim.Adam(1e-2), progress=False)
    return model.params.copy()


@needs_mkl
def test_fit_on_mkl_follows_numpy_and_repeats_bit_for_bit(monkeypatch, rng):
    X = rng.standard_normal((301, 19)).astype(np.float32)
    y = rng.integers(0, 4, 301)
    on_numpy = fit_params("numpy", monkeypatch, X, y)
    on_mkl = fit_params("mkl", monkeypatch, X, y)
    np.testing.assert_allclose(on_mkl, on_numpy, rtol=1e-4, atol=1e-5)
    assert not np.array_equal(on_mkl, on_numpy)  # MKL's products did run: other roundings
    assert np.array_equal(fit_params("mkl", monkeypatch, X, y), on_mkl)


FORK_AFTER_MKL = """
import multiprocessing, sys
try:
    import torch  # first: with its OpenMP loaded before MKL's, every forked child hung
except ImportError:
    pass
import numpy as np
from gpubackprop.backend import cpu_blas

def child(queue):
    a = np.random.default_rng(1).standard_normal((300, 200)).astype(np.float32)
    out = np.empty((300, 300), np.float32)
    cpu_blas.mkl().matmul(a, a.T, out)
    queue.put(float(np.abs(out - a @ a.T).max()))

a = np.ones((500, 500), np.float32)
ctx = multiprocessing.get_context("fork")
for _ in range(3):
    cpu_blas.mkl().matmul(a, a, np.empty_like(a))  # the parent's pool is up, its worker spinning
    queue = ctx.Queue()
    p = ctx.Process(target=child, args=(queue,))
    p.start()
    p.join(timeout=120)
    if p.is_alive():
        p.kill()
        sys.exit("a forked child hung in MKL's GEMM")
    assert p.exitcode == 0 and queue.get(timeout=5) < 1e-3, p.exitcode
print("ok")
"""


@needs_mkl
@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX's")
def test_a_forked_child_multiplies_after_its_parent_did_with_mkl():
    """MKL's OpenMP pool does not survive fork: with PyTorch imported first (its own
    OpenMP beside Intel's), every forked child hung at the barrier of its first MKL
    GEMM. A forked child multiplies with NumPy's BLAS instead. (In a fresh process:
    whether it hangs depends on what the process loaded, and in which order.)"""
    done = subprocess.run([sys.executable, "-c", FORK_AFTER_MKL], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
