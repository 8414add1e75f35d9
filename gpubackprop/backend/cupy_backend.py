"""The CUDA backend: our kernels of ``kernels/*.cu`` through cupy.RawModule, cuBLAS
GEMMs through CuPy (the launches themselves are in ``kernel_backend``).

Opening it checks, in order, that CuPy imports, that the CUDA driver and a GPU
answer, and that the GPU runs a kernel; each failure becomes a
DeviceUnavailableError naming the cause and the fix.
"""

import numpy as np

from . import DeviceUnavailableError
from .kernel_backend import FILE_OF, SOURCES, KernelBackend, is_low_precision, source

# --fmad=false: no contraction of a*b+c into one rounding, so the kernels round as
# the NumPy backend does (they are bound by memory, so it costs no time).
_OPTIONS = ("--std=c++17", "--fmad=false")


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


class RawModules:
    """kernels/*.cu on the GPU: ``launch(name_expression, grid, block, args)``.

    A source file is compiled by NVRTC on the first launch of one of its kernels
    (CuPy keeps the binary in its disk cache), once for float32 / float64 and once,
    only if asked for, for float16 / bfloat16; functions are looked up once.
    """

    def __init__(self, cupy):
        self._cupy = cupy
        self._modules = {}
        self._functions = {}

    def launch(self, name, grid, block, args):
        fn = self._functions.get(name)
        if fn is None:
            fn = self._functions[name] = self._module(FILE_OF[name], is_low_precision(name)).get_function(name)
        fn(grid, block, args)

    def _module(self, filename, low):
        key = (filename, low)
        if key not in self._modules:
            names = [n for n in SOURCES[filename] if is_low_precision(n) == low]
            options = _OPTIONS + (("-DGPUBACKPROP_LOW_PRECISION",) if low else ())
            try:
                module = self._cupy.RawModule(code=source(filename), options=options, name_expressions=names)
                module.compile()
            except self._cupy.cuda.compiler.CompileException as e:
                hint = (" float16 / bfloat16 kernels need the CUDA headers: pip install 'cupy-cuda13x[ctk]'"
                        if low else " check that the CuPy wheel matches the driver's CUDA version")
                raise RuntimeError(f"NVRTC could not compile kernels/{filename}:{hint}.\n{e}") from None
            self._modules[key] = module
        return self._modules[key]


class CupyBackend(KernelBackend):
    def __init__(self, index=0):
        cupy = _import_cupy()
        _open_device(cupy, index)
        n_sm = cupy.cuda.runtime.getDeviceProperties(index)["multiProcessorCount"]
        super().__init__(cupy, RawModules(cupy), n_sm)
        self.index = index
        self.name = f"cuda:{index}"

    def asarray(self, x, dtype=None):
        with self.context():
            return self.xp.ascontiguousarray(self.xp.asarray(x, dtype=dtype))

    def to_host(self, x):
        return x.get() if isinstance(x, self.xp.ndarray) else np.asarray(x)

    def context(self):
        return self.xp.cuda.Device(self.index)

    def free_bytes(self):
        with self.context():
            # The pool's cached blocks are free to reuse as well.
            return self.xp.cuda.runtime.memGetInfo()[0] + self.xp.get_default_memory_pool().free_bytes()
