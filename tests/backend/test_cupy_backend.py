"""The CUDA backend's own parts: loading kernels/*.cu through cupy.RawModule (with a
stand-in CuPy, so it runs everywhere), and the digits demo trained through the
kernels on a real GPU (``-m gpu``).

Its primitives are KernelBackend's, checked against NumPy in test_kernel_backend.
"""

import sys
import types

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.backend import cupy_backend, kernel_backend


def test_sources_inline_their_headers():
    """CuPy caches compiled code by its text: an edited header must change that text."""
    for filename in kernel_backend.SOURCES:
        text = kernel_backend.source(filename)
        assert '#include "' not in text
        assert "arrived_last" in text and "template <typename T" in text


class _FakeRawModule:
    compiled = []
    fail = False

    def __init__(self, *, code, options, name_expressions):
        self.options, self.names = options, name_expressions

    def compile(self):
        if self.fail:
            raise _FakeCompileException("error: identifier __half is undefined")
        self.compiled.append((self.options, tuple(self.names)))

    def get_function(self, name):
        assert name in self.names
        return lambda grid, block, args: self.launches.append((name, grid, block, args))


class _FakeCompileException(Exception):
    pass


@pytest.fixture
def fake_cupy(monkeypatch):
    _FakeRawModule.compiled, _FakeRawModule.launches, _FakeRawModule.fail = [], [], False
    cupy = types.SimpleNamespace(RawModule=_FakeRawModule,
                                 cuda=types.SimpleNamespace(compiler=types.SimpleNamespace(CompileException=_FakeCompileException)))
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    return cupy


def test_raw_modules_compile_each_file_once_per_precision(fake_cupy):
    modules = cupy_backend.RawModules(fake_cupy)
    for dtype in ("float32", "float64", "float32", "float16", "bfloat16"):
        modules.launch(kernel_backend.instance("bias_act_forward", dtype, 1), (1, 1, 1), (32, 8, 1), ())
    assert len(_FakeRawModule.launches) == 5
    (float_opts, float_names), (low_opts, low_names) = _FakeRawModule.compiled
    assert "-DGPUBACKPROP_LOW_PRECISION" not in float_opts and "-DGPUBACKPROP_LOW_PRECISION" in low_opts
    assert "--fmad=false" in float_opts and any(o.startswith("--std=c++") for o in float_opts)
    assert not any(kernel_backend.is_low_precision(n) for n in float_names)
    assert all(kernel_backend.is_low_precision(n) for n in low_names)


def test_a_compile_failure_names_the_file_and_the_fix(fake_cupy):
    _FakeRawModule.fail = True
    with pytest.raises(RuntimeError, match=r"kernels/bias_activation.cu.*cupy-cuda13x\[ctk\]"):
        cupy_backend.RawModules(fake_cupy).launch(kernel_backend.instance("bias_act_forward", "float16", 1),
                                                  (1, 1, 1), (32, 8, 1), ())


@pytest.mark.gpu
def test_digits_on_the_gpu():
    """The README's demo on the GPU: >= 0.97 held out. (Through the host harness it
    takes minutes; there test_kernel_backend's 100 steps stand for it.)"""
    from gpubackprop import data

    try:
        gb.get_backend("cuda")
    except gb.DeviceUnavailableError as e:
        pytest.skip(str(e))

    X, y = data.load_dataset("digits")
    X_train, X_test, y_train, y_test = data.train_test_split(X, y, 0.2, 0)
    model = gb.MLP([X.shape[1], 128, 64, 10], device="cuda", seed=0)
    model.fit(X_train, y_train, epochs=30, batch_size=32, optimizer=gb.optim.Adam(1e-3), progress=False)
    assert model.evaluate(X_test, y_test)["accuracy"] >= 0.97
    assert isinstance(model.predict(X_test), np.ndarray)


@pytest.mark.parametrize("a,out,precision,expected", [
    ("float64", "float64", "float32", "float64"),
    ("float32", "float32", "float32", "float32"),
    ("float32", "float32", "tf32", "tf32"),
    ("float16", "float16", "fp16", "float32"),  # 16-bit operands accumulate in float32
    ("float16", "float32", "fp16", "float32"),  # dW straight into the float32 gradients
])
def test_gemm_compute_type_per_precision(a, out, precision, expected):
    assert cupy_backend.gemm_compute(np.empty(1, a), np.empty(1, out), precision) == expected
    assert expected in cupy_backend._COMPUTE
