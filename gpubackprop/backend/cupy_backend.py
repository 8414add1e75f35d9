"""The CUDA backend, through CuPy.

Opening it checks, in order, that CuPy imports, that the CUDA driver and a GPU
answer, and that the GPU runs a kernel; each failure becomes a
DeviceUnavailableError naming the cause and the fix.

Until the kernels of ``kernels/`` replace them, the primitives are the NumPy
backend's array-module code run through CuPy (its elementwise kernels and cuBLAS).
"""

import numpy as np

from . import DeviceUnavailableError
from .numpy_backend import NumpyBackend


def _import_cupy():
    try:
        import cupy
    except ImportError as e:
        raise DeviceUnavailableError(
            f"CuPy is not installed ({e}). Install it with "
            "`pip install 'gpubackprop[cuda13]'` (CUDA 13 drivers) or "
            "`pip install 'gpubackprop[cuda12]'` (CUDA 12)"
        ) from None
    return cupy


def _open_device(cupy, index):
    runtime = cupy.cuda.runtime
    try:
        count = runtime.getDeviceCount()
    except runtime.CUDARuntimeError as e:
        text = str(e)
        if "InsufficientDriver" in text:
            cause = (
                f"the NVIDIA driver is older than this CuPy build needs ({text}); "
                "update the driver or install the CuPy wheel for its CUDA version "
                "(gpubackprop[cuda12] for CUDA 12 drivers)"
            )
        elif "NoDevice" in text:
            cause = f"no NVIDIA GPU is visible ({text}); check CUDA_VISIBLE_DEVICES and `nvidia-smi`"
        else:
            cause = f"the CUDA driver did not answer ({text}); check that the NVIDIA driver is installed (`nvidia-smi`)"
        raise DeviceUnavailableError(f"cannot use CUDA: {cause}") from None
    if count == 0:
        raise DeviceUnavailableError("cannot use CUDA: no NVIDIA GPU found")
    if index >= count:
        raise DeviceUnavailableError(
            f"cuda:{index} requested but only {count} GPU(s) found (cuda:0..cuda:{count - 1})"
        )
    try:
        with cupy.cuda.Device(index):
            (cupy.arange(4, dtype=cupy.float32) * 2.0).sum().item()
    except Exception as e:  # a broken install surfaces as any of CuPy's many errors
        raise DeviceUnavailableError(
            f"cuda:{index} was found but could not run a kernel ({type(e).__name__}: {e})"
        ) from None


class CupyBackend(NumpyBackend):
    def __init__(self, index=0):
        cupy = _import_cupy()
        _open_device(cupy, index)
        self.xp = cupy
        self.index = index
        self.name = f"cuda:{index}"
        self.note = ""

    def asarray(self, x, dtype=None):
        with self.context():
            return self.xp.ascontiguousarray(self.xp.asarray(x, dtype=dtype))

    def to_host(self, x):
        return x.get() if isinstance(x, self.xp.ndarray) else np.asarray(x)

    def gather_rows(self, src, index, out):
        self.xp.take(src, index, axis=0, out=out)

    def context(self):
        return self.xp.cuda.Device(self.index)
