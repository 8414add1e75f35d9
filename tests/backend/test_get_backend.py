import logging
import sys
import types

import pytest

import gpubackprop as gb
from gpubackprop.backend import DeviceUnavailableError, backend_for, get_backend


@pytest.fixture(autouse=True)
def fresh_cache():
    backend_for.cache_clear()
    yield
    backend_for.cache_clear()


def test_cpu_is_shared_and_named():
    b = get_backend("cpu")
    assert b is get_backend(" CPU ") and b.name == "cpu"
    assert get_backend(b) is b


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "tpu:0", ""])
def test_unknown_device_names_the_choices(bad):
    with pytest.raises(ValueError, match="'cpu', 'cuda', 'cuda:N' or 'auto'"):
        get_backend(bad)


def test_device_must_be_a_string():
    with pytest.raises(TypeError, match="device must be a string"):
        get_backend(0)


def _fake_cupy(monkeypatch, count=None, error=None):
    """A stand-in CuPy whose runtime reports ``count`` GPUs or raises ``error``."""

    class CUDARuntimeError(RuntimeError):
        pass

    def get_count():
        if error:
            raise CUDARuntimeError(error)
        return count

    runtime = types.SimpleNamespace(getDeviceCount=get_count, CUDARuntimeError=CUDARuntimeError)
    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(runtime=runtime)
    monkeypatch.setitem(sys.modules, "cupy", cupy)


def test_cuda_without_cupy_names_the_extra_and_the_fallback(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import fails as if not installed
    with pytest.raises(DeviceUnavailableError) as e:
        gb.MLP([2, 2], device="cuda")
    msg = str(e.value)
    assert "CuPy is not installed" in msg and "gpubackprop[cuda13]" in msg and "device='cpu'" in msg


@pytest.mark.parametrize(
    "error,expected",
    [
        ("cudaErrorNoDevice: no CUDA-capable device is detected", "no NVIDIA GPU is visible"),
        ("cudaErrorInsufficientDriver: CUDA driver version is insufficient", "driver is older than this CuPy build"),
        ("cudaErrorUnknown", "CUDA driver did not answer"),
    ],
)
def test_cuda_driver_problems_are_explained(monkeypatch, error, expected):
    from gpubackprop.backend import cuda as cupy_backend

    monkeypatch.setattr(cupy_backend, "driver_installed", lambda: True)  # one is (test_cuda: when not)
    _fake_cupy(monkeypatch, error=error)
    with pytest.raises(DeviceUnavailableError, match=expected):
        get_backend("cuda")


def test_cuda_index_beyond_the_gpus(monkeypatch):
    _fake_cupy(monkeypatch, count=2)
    with pytest.raises(DeviceUnavailableError, match=r"cuda:5 requested but only 2 GPU\(s\)"):
        get_backend("cuda:5")


def test_auto_falls_back_to_cpu_and_says_why(monkeypatch, caplog):
    _fake_cupy(monkeypatch, count=0)
    with caplog.at_level(logging.INFO, logger="gpubackprop"):
        b = get_backend("auto")
    assert b.name == "cpu"
    assert "device='auto' chose cpu" in b.note and "no NVIDIA GPU" in b.note
    assert b.note in caplog.text
