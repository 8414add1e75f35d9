"""The CUDA backend's own parts, with stand-ins for CuPy, NVRTC and the toolkit so
they run everywhere: loading the compiled kernels, naming what is missing,
capture, cuBLAS; and the digits demo trained through the kernels on a real GPU
(``-m gpu``).

Its primitives are KernelBackend's, checked against NumPy in test_kernel_backend.
"""

import contextlib
import sys
import types

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.optim import precision
from gpubackprop.backend import cuda as cupy_backend, kernels as kernel_backend, nvrtc


def test_sources_inline_their_headers():
    """CuPy caches compiled code by its text: an edited header must change that text."""
    for filename in kernel_backend.SOURCES:
        text = kernel_backend.source(filename)
        assert '#include "' not in text
        assert "arrived_last" in text and "template <typename T" in text


class _FakeModule:
    """cupy.cuda.function.Module: records what it loads and launches."""

    loaded, launches = [], []

    def load(self, binary):
        self.loaded.append(binary)

    def get_function(self, lowered):
        return lambda grid, block, args: self.launches.append((lowered, grid, block, args))


class _FakeCache:
    """nvrtc.KernelCache: 'compiles' by naming what it was asked for."""

    def __init__(self, error=None):
        self.asked, self.error = [], error

    def get(self, filename, low, arch):
        if self.error is not None:
            raise self.error
        self.asked.append((filename, low, arch))
        names = nvrtc.module_names(filename, low)
        return f"{filename}:{low}:{arch}".encode(), {n: f"_Z{i}" for i, n in enumerate(names)}


class _DriverError(Exception):
    pass


@pytest.fixture
def fake_cupy():
    _FakeModule.loaded, _FakeModule.launches = [], []
    return types.SimpleNamespace(cuda=types.SimpleNamespace(function=types.SimpleNamespace(Module=_FakeModule),
                                                            driver=types.SimpleNamespace(CUDADriverError=_DriverError)))


def test_raw_modules_compile_each_file_once_per_precision(fake_cupy):
    cache = _FakeCache()
    modules = cupy_backend.RawModules(fake_cupy, 0, 90, cache)
    for dtype in ("float32", "float64", "float32", "float16", "bfloat16"):
        modules.launch(kernel_backend.instance("bias_act_forward", dtype, 1), (1, 1, 1), (32, 8, 1), ())
    assert cache.asked == [("bias_activation.cu", False, 90), ("bias_activation.cu", True, 90)]
    assert _FakeModule.loaded == [b"bias_activation.cu:False:90", b"bias_activation.cu:True:90"]
    assert len(_FakeModule.launches) == 5 and all(name.startswith("_Z") for name, *_ in _FakeModule.launches)


def test_a_cached_module_the_driver_refuses_is_compiled_again(fake_cupy, monkeypatch):
    cache = _FakeCache()
    cache.forgotten = []
    cache.forget = lambda *key: cache.forgotten.append(key)
    real_load = _FakeModule.load
    refusals = [_DriverError("CUDA_ERROR_INVALID_IMAGE")]

    def load(self, binary):
        if refusals:
            raise refusals.pop()
        real_load(self, binary)

    monkeypatch.setattr(_FakeModule, "load", load)
    cupy_backend.RawModules(fake_cupy, 0, 90, cache).launch(kernel_backend.instance("sgd_update", "float32"),
                                                          (1, 1, 1), (256, 1, 1), ())
    assert cache.forgotten == [("optimizers.cu", False, 90)] and len(cache.asked) == 2
    assert len(_FakeModule.launches) == 1


def test_a_missing_toolkit_part_names_it_and_the_ctk_extra(fake_cupy, monkeypatch):
    monkeypatch.setattr(nvrtc, "missing_parts", lambda: ["the CUDA headers (cuda_fp16.h in none of ['/x'])"])
    error = nvrtc.KernelCompileError('NVRTC could not compile kernels/bias_activation.cu\ncannot open "cuda_fp16.h"')
    modules = cupy_backend.RawModules(fake_cupy, 0, 90, _FakeCache(error))
    with pytest.raises(gb.DeviceUnavailableError,
                       match=r"cuda:0 cannot run kernels: CuPy cannot find the CUDA headers \(cuda_fp16.h.*\[ctk\]"):
        modules.launch(kernel_backend.instance("bias_act_forward", "float16", 1), (1, 1, 1), (32, 8, 1), ())


def test_other_compile_failures_are_not_disguised(fake_cupy, monkeypatch):
    monkeypatch.setattr(nvrtc, "missing_parts", lambda: [])
    error = nvrtc.KernelCompileError("kernels/loss.cu(12): error: identifier x is undefined")
    with pytest.raises(nvrtc.KernelCompileError, match="identifier x is undefined"):
        cupy_backend.RawModules(fake_cupy, 0, 90, _FakeCache(error)).launch(
            kernel_backend.instance("softmax_cross_entropy", "float32"), (1, 1, 1), (256, 1, 1), ())


def _toolkit(tmp_path, monkeypatch, libs=("nvrtc", "cublas"), builtins=True, headers=nvrtc.HEADERS):
    """A stand-in toolkit in tmp_path: pathfinder finds ``libs``, the include folder holds ``headers``."""
    lib_dir, include = tmp_path / "lib", tmp_path / "include"
    lib_dir.mkdir()
    for h in headers:
        (include / h).parent.mkdir(parents=True, exist_ok=True)
        (include / h).write_text("")
    if builtins:
        (lib_dir / "libnvrtc-builtins.so.13.5").write_text("")

    class NotFound(RuntimeError):
        pass

    def load(name):
        if name not in libs:
            raise NotFound(f'Failure finding "lib{name}.so.13": No such file: lib{name}.so.13')
        return types.SimpleNamespace(abs_path=str(lib_dir / f"lib{name}.so.13"))

    pathfinder = types.SimpleNamespace(load_nvidia_dynamic_lib=load)
    monkeypatch.setitem(sys.modules, "cuda", types.SimpleNamespace(pathfinder=pathfinder))
    monkeypatch.setitem(sys.modules, "cuda.pathfinder", pathfinder)
    monkeypatch.setattr(nvrtc, "options", lambda low: ("-I" + str(include), "--std=c++17"))


def test_missing_parts_are_looked_up_not_guessed(tmp_path, monkeypatch):
    _toolkit(tmp_path, monkeypatch)
    assert nvrtc.missing_parts() == []
    assert nvrtc.toolkit_problem(RuntimeError("cudaErrorIllegalAddress")) is None


@pytest.mark.parametrize("toolkit,says", [
    (dict(libs=("cublas",)), "NVRTC (libnvrtc): Failure finding"),
    (dict(builtins=False), "NVRTC's builtins (no libnvrtc-builtins beside"),
    (dict(libs=("nvrtc",)), "cuBLAS (libcublas): Failure finding"),
    (dict(headers=("cuda_fp16.h", "cuda_bf16.h")), "the CUDA headers (crt/host_defines.h in none of"),
])
def test_each_missing_part_is_named(tmp_path, monkeypatch, toolkit, says):
    _toolkit(tmp_path, monkeypatch, **toolkit)
    [missing] = nvrtc.missing_parts()
    assert missing.startswith(says)
    problem = nvrtc.toolkit_problem(RuntimeError("the failure itself\nsecond line"))
    assert problem.startswith("CuPy cannot find " + says) and "RuntimeError: the failure itself)" in problem


class _RuntimeError(Exception):
    pass


def _cupy_without_driver(message):
    def count():
        raise _RuntimeError(message)

    runtime = types.SimpleNamespace(getDeviceCount=count, CUDARuntimeError=_RuntimeError)
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))


@pytest.mark.parametrize("installed,says", [(False, "no NVIDIA driver is installed"),
                                            (True, "the NVIDIA driver is older than this CuPy build needs")])
def test_no_driver_is_not_called_an_old_one(monkeypatch, installed, says):
    monkeypatch.setattr(cupy_backend, "driver_installed", lambda: installed)
    cupy = _cupy_without_driver("cudaErrorInsufficientDriver: CUDA driver version is insufficient")
    with pytest.raises(gb.DeviceUnavailableError, match=says):
        cupy_backend.open_device(cupy, 0)


def test_a_kernel_that_cannot_compile_at_open_names_the_fix(monkeypatch):
    class Failing:
        def __mul__(self, other):
            raise RuntimeError("CUDA headers not found")

    monkeypatch.setattr(nvrtc, "missing_parts", lambda: ["the CUDA headers (cuda_fp16.h in none of [])"])
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1, CUDARuntimeError=_RuntimeError)
    cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime, Device=lambda i: contextlib.nullcontext()),
                                 arange=lambda *a, **k: Failing(), float32=np.float32)
    with pytest.raises(gb.DeviceUnavailableError, match=r"CuPy cannot find the CUDA headers.*cupy-cuda13x\[ctk\]"):
        cupy_backend.open_device(cupy, 0)


class _Stream:
    def __init__(self, log, fail_end=False):
        self.log, self.fail_end, self.ptr = log, fail_end, 1

    def record(self):
        return "event"

    def wait_event(self, event):
        pass

    def __enter__(self):
        self.log.append("stream on")

    def __exit__(self, *exc):
        self.log.append("stream off")

    def begin_capture(self):
        self.log.append("begin")

    def end_capture(self):
        self.log.append("end")
        if self.fail_end:
            raise RuntimeError("cudaErrorStreamCaptureInvalidated")
        return types.SimpleNamespace(launch=lambda stream: self.log.append("launch"))


def _backend_with_stream(log, fail_end=False):
    class Device:
        def __init__(self, index):
            pass

        def __enter__(self):
            log.append("device on")

        def __exit__(self, *exc):
            log.append("device off")

    be = object.__new__(cupy_backend.CupyBackend)
    be.index, be.stream = 0, _Stream(log, fail_end)
    be.xp = types.SimpleNamespace(cuda=types.SimpleNamespace(Device=Device, Stream=types.SimpleNamespace(
        null=_Stream(log))))
    return be


def test_capture_makes_the_device_and_its_stream_current():
    log = []
    graph = _backend_with_stream(log).capture(lambda: log.append("work"))
    assert log == ["device on", "stream on", "begin", "work", "end", "stream off", "device off"]
    graph.launch()
    assert log[-1] == "launch"


def test_a_failing_capture_reports_the_step_s_error_not_the_broken_capture():
    log = []

    def step():
        raise ValueError("the step's own error")

    with pytest.raises(ValueError, match="the step's own error"):
        _backend_with_stream(log, fail_end=True).capture(step)
    assert log[-2:] == ["stream off", "device off"] and "end" in log


def test_without_cublas_tf32_and_mixed_precision_are_refused_by_name():
    be = object.__new__(cupy_backend.CupyBackend)
    be.name, be.cublas, be.note = "cuda:0", None, "cuda.pathfinder gave no path for the libcublas CuPy loaded"
    for mode in ("tf32", "bf16", "fp16"):
        with pytest.raises(ValueError, match=rf"precision='{mode}' needs cuBLAS, and cuda:0 has none"):
            precision.check(mode, "float32", be)
    precision.check("float32", "float32", be)


def test_cublas_is_the_library_cupy_loaded(monkeypatch):
    """Not the first libcublas.so* of the process (torch's, when torch came first)."""
    loaded = types.SimpleNamespace(abs_path="/site-packages/nvidia/cu13/lib/libcublas.so.13")

    class NotFound(RuntimeError):
        pass

    pathfinder = types.SimpleNamespace(load_nvidia_dynamic_lib=lambda name: loaded, DynamicLibNotFoundError=NotFound)
    monkeypatch.setitem(sys.modules, "cuda", types.SimpleNamespace(pathfinder=pathfinder))
    monkeypatch.setitem(sys.modules, "cuda.pathfinder", pathfinder)
    opened = []
    monkeypatch.setattr(cupy_backend.ctypes, "CDLL", lambda path: opened.append(path) or path)
    assert cupy_backend.libcublas() == loaded.abs_path and opened == [loaded.abs_path]

    def missing(name):
        raise NotFound("no cublas")

    pathfinder.load_nvidia_dynamic_lib = missing
    assert cupy_backend.libcublas() is None
    pathfinder.load_nvidia_dynamic_lib = lambda name: types.SimpleNamespace(abs_path=None)
    assert cupy_backend.libcublas() is None  # loaded, but where is not known: not guessed either


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
    assert expected in cupy_backend.COMPUTE
