import os
import zlib

import numpy as np
import pytest


# The CPU multiplies with NumPy's BLAS in the tests unless the environment says
# otherwise: "auto" would time every new model shape against MKL (where installed)
# and could choose differently from run to run. tests/backend/test_cpu_blas.py
# tests the choice and MKL's products themselves.
os.environ.setdefault("GPUBACKPROP_CPU_BLAS", "numpy")


@pytest.fixture
def rng(request):
    # Fresh random inputs per test, reproducible from the test's name.
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


class StrictFloat32:
    """Stands in for the numpy module and fails any call that mixes float64 into
    float32 work: a float64 array or NumPy float64 scalar among the arguments of a
    call whose other arrays are float32 (NumPy 2 would promote it and compute in
    float64, silently, even with a float32 ``out=``)."""

    def __init__(self):
        self.calls = 0

    def __getattr__(self, name):
        target = getattr(np, name)
        if not callable(target) or isinstance(target, type):
            return target

        def checked(*args, **kwargs):
            values = list(args) + list(kwargs.values())
            dtypes = {v.dtype for v in values if isinstance(v, (np.ndarray, np.generic))}
            if np.dtype(np.float32) in dtypes and np.dtype(np.float64) in dtypes:
                raise AssertionError(f"np.{name} mixes float64 into float32 work: {sorted(map(str, dtypes))}")
            self.calls += 1
            return target(*args, **kwargs)

        return checked


@pytest.fixture
def strict_float32():
    return StrictFloat32()


def require_tool(what):
    """Skip for a missing compiler, except in CI (.ci/run sets
    GPUBACKPROP_REQUIRE_KERNEL_TOOLS), where CI must prove the kernels."""
    if os.environ.get("GPUBACKPROP_REQUIRE_KERNEL_TOOLS"):
        pytest.fail(f"{what} is missing, and CI must compile and run the kernels")
    pytest.skip(f"{what} is not installed")


@pytest.fixture(scope="session")
def host_module(tmp_path_factory):
    """kernels/*.cu compiled for the CPU through the host harness (tests/kernels)."""
    from .kernels.host_module import CXX, HostModule

    if CXX is None:
        require_tool("a C++ compiler (g++)")
    return HostModule(str(tmp_path_factory.mktemp("host_kernels")))


@pytest.fixture(scope="session", params=["host", pytest.param("cuda", marks=pytest.mark.gpu)])
def kernel_backend(request):
    """The CUDA backend's code path: on the CPU through the host harness ("host"),
    and on a real GPU ("cuda", skipped without one). A small multiprocessor count
    for the host makes modest test sizes reach the kernels' grid-stride loops and
    multi-block reductions."""
    from gpubackprop.backend import DeviceUnavailableError, get_backend
    from gpubackprop.backend.kernels import KernelBackend

    if request.param == "host":
        return KernelBackend(np, request.getfixturevalue("host_module"), n_sm=2)
    try:
        return get_backend("cuda")
    except DeviceUnavailableError as e:
        pytest.skip(str(e))
