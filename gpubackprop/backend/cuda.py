"""The CUDA backend: our kernels of ``kernels/*.cu`` (compiled by ``nvrtc``), cuBLAS
GEMMs through ctypes, one stream, CUDA graphs (the launches themselves are in
``kernels.py``).

Opening it checks, in order, that CuPy imports, that an NVIDIA driver and a GPU
answer, that CuPy finds the toolkit libraries it needs (NVRTC, its headers,
cuBLAS) and that the GPU runs a kernel; each failure becomes a
DeviceUnavailableError naming the cause and the fix.
"""

import contextlib
import ctypes
import ctypes.util

import numpy as np

from .base import DeviceUnavailableError
from .kernels import FILE_OF, KernelBackend, column_major_gemm, is_low_precision
from .nvrtc import FIX, KernelCache, toolkit_problem


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


def driver_installed():
    """Whether the NVIDIA driver's library (libcuda) can be loaded at all."""
    for name in ("libcuda.so.1", "libcuda.so", ctypes.util.find_library("cuda"), "nvcuda.dll"):
        if name:
            try:
                ctypes.CDLL(name)
                return True
            except OSError:
                continue
    return False


def open_device(cupy, index):
    runtime = cupy.cuda.runtime
    try:
        count = runtime.getDeviceCount()
    except runtime.CUDARuntimeError as e:
        text = str(e)
        if "InsufficientDriver" in text and not driver_installed():
            cause = f"no NVIDIA driver is installed (libcuda cannot be loaded; {text}); install the driver for your GPU"
        elif "InsufficientDriver" in text:
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
        raise _unavailable(index, e) from None


def _missing_toolkit(index, error):
    """The DeviceUnavailableError naming the part of the toolkit whose absence caused
    ``error`` on cuda:index, or None when nothing is missing."""
    problem = toolkit_problem(error)
    return DeviceUnavailableError(f"cuda:{index} cannot run kernels: {problem}", fix=FIX) if problem else None


def _unavailable(index, error):
    """The DeviceUnavailableError for a failure to run or compile on cuda:index."""
    return _missing_toolkit(index, error) or DeviceUnavailableError(
        f"cuda:{index} was found but could not run a kernel ({type(error).__name__}: {error})")


class RawModules:
    """kernels/*.cu on the GPU: ``launch(name_expression, grid, block, args)``.

    A source file is compiled (``nvrtc``: NVRTC without CuPy's flush-to-zero, the
    binary cached on disk) on the first launch of one of its kernels, once for
    float32 / float64 and once, only if asked for, for float16 / bfloat16;
    functions are looked up once.
    """

    def __init__(self, cupy, index, arch, cache=None):
        self._cupy = cupy
        self.index, self.arch = index, arch
        self.cache = KernelCache() if cache is None else cache
        self._modules = {}
        self._functions = {}

    def launch(self, name, grid, block, args):
        fn = self._functions.get(name)
        if fn is None:
            module, lowered = self._module(FILE_OF[name], is_low_precision(name))
            fn = self._functions[name] = module.get_function(lowered[name])
        fn(grid, block, args)

    def _module(self, filename, low):
        key = (filename, low)
        if key not in self._modules:
            try:
                try:
                    module, lowered = self._load(filename, low)
                except self._cupy.cuda.driver.CUDADriverError:  # a cached binary the driver refuses
                    self.cache.forget(filename, low, self.arch)
                    module, lowered = self._load(filename, low)
            except Exception as e:  # a missing NVRTC, header or library: say which, and the fix
                missing = _missing_toolkit(self.index, e)
                if missing is None:
                    raise
                raise missing from None
            self._modules[key] = module, lowered
        return self._modules[key]

    def _load(self, filename, low):
        binary, lowered = self.cache.get(filename, low, self.arch)
        module = self._cupy.cuda.function.Module()
        module.load(bytes(binary))
        return module, lowered


# cudaDataType and cublasComputeType values (cuda_runtime / cublas_api.h).
_CUDA_TYPE = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 14}
COMPUTE = {"float64": 70, "float32": 68, "tf32": 77}  # CUBLAS_COMPUTE_64F, _32F, _32F_FAST_TF32
_WORKSPACE_BYTES = 32 << 20  # what cuBLAS asks for on Hopper; kept for the process, so graphs may use it


def gemm_compute(a, out, precision):
    """The cuBLAS compute type of out = a @ b: float64 for float64, TF32 only when asked
    for float32 operands, float32 accumulation otherwise (16-bit operands included)."""
    if out.dtype == np.float64:
        return "float64"
    return "tf32" if precision == "tf32" and a.dtype == np.float32 else "float32"


def libcublas():
    """The cuBLAS library CuPy loaded, or None. CuPy 14 loads its libraries through
    cuda.pathfinder, which keeps what it loaded and hands it back: so this is CuPy's
    cuBLAS, not the first libcublas.so mapped in the process (PyTorch's, when torch
    was imported first). None where pathfinder gives no path for it."""
    try:
        from cuda import pathfinder
    except ImportError:  # an older CuPy, which loads cuBLAS by its soname
        found = ctypes.util.find_library("cublas")
        return ctypes.CDLL(found) if found else None
    try:
        path = pathfinder.load_nvidia_dynamic_lib("cublas").abs_path
    except RuntimeError:  # DynamicLibNotFoundError and pathfinder's other failures
        return None
    return ctypes.CDLL(path) if path else None


class Cublas:
    """cublasGemmEx called directly, on a handle of our own bound to one stream.

    CuPy refuses cuBLAS calls while a stream is being captured (its wrappers reset
    the handle's stream, which capture forbids), so the GEMMs of a captured train
    step go through this: stream and workspace are set once, up front, and the
    call itself is capturable. It also picks the compute type per call (TF32).
    """

    def __init__(self, cupy, lib, stream):
        self._lib = lib
        self.handle = ctypes.c_void_p()
        self._check(lib.cublasCreate_v2(ctypes.byref(self.handle)), "cublasCreate")
        self._check(lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(stream.ptr)), "cublasSetStream")
        self._workspace = cupy.empty(_WORKSPACE_BYTES, np.uint8)
        self._check(lib.cublasSetWorkspace_v2(self.handle, ctypes.c_void_p(self._workspace.data.ptr),
                                              ctypes.c_size_t(_WORKSPACE_BYTES)), "cublasSetWorkspace")
        self._one = {t: np.ones(1, t) for t in (np.float32, np.float64)}
        self._zero = {t: np.zeros(1, t) for t in (np.float32, np.float64)}

    @staticmethod
    def _check(status, what):
        if status != 0:
            raise RuntimeError(f"{what} failed with cuBLAS status {status}")

    def gemm(self, a, b, out, compute):
        """out = a @ b in compute type ``compute`` ("float32", "tf32", "float64")."""
        ta, tb, m, n, k, first, ld1, second, ld2, ldc = column_major_gemm(a, b, out)
        scalar = np.float64 if compute == "float64" else np.float32
        i = ctypes.c_int
        self._check(self._lib.cublasGemmEx(
            self.handle, i(ta), i(tb), i(m), i(n), i(k),
            ctypes.c_void_p(self._one[scalar].ctypes.data),
            ctypes.c_void_p(first.data.ptr), i(_CUDA_TYPE[first.dtype.name]), i(ld1),
            ctypes.c_void_p(second.data.ptr), i(_CUDA_TYPE[second.dtype.name]), i(ld2),
            ctypes.c_void_p(self._zero[scalar].ctypes.data),
            ctypes.c_void_p(out.data.ptr), i(_CUDA_TYPE[out.dtype.name]), i(ldc),
            i(COMPUTE[compute]), i(-1),  # CUBLAS_GEMM_DEFAULT
        ), "cublasGemmEx")


class _CudaGraph:
    def __init__(self, graph, stream):
        self._graph, self.stream = graph, stream

    def launch(self):
        self._graph.launch(self.stream)


class CupyBackend(KernelBackend):
    def __init__(self, index=0):
        cupy = _import_cupy()
        open_device(cupy, index)
        props = cupy.cuda.runtime.getDeviceProperties(index)
        super().__init__(cupy, RawModules(cupy, index, 10 * props["major"] + props["minor"]),
                         props["multiProcessorCount"])
        self.index = index
        self.name = f"cuda:{index}"
        with cupy.cuda.Device(index):
            # All of this backend's work runs on one stream of its own: graphs cannot
            # be captured on the legacy default stream, and one stream keeps eager
            # work and graph launches in order.
            self.stream = cupy.cuda.Stream(non_blocking=True)
            try:
                cupy.cuda.device.get_cublas_handle()  # CuPy loads libcublas
            except Exception as e:  # without cuBLAS there is no GEMM at all, not even CuPy's
                raise _unavailable(index, e) from None
            lib = libcublas()
            self.cublas = Cublas(cupy, lib, self.stream) if lib is not None else None
        if self.cublas is None:
            self.supports_graphs = False
            self.note = ("cuda.pathfinder gave no path for the libcublas CuPy loaded: GEMMs through cupy.matmul, "
                         "no CUDA graphs, float32 only")

    def _matmul(self, a, b, out):
        if self.cublas is None:
            return super()._matmul(a, b, out)
        compute = gemm_compute(a, out, self.matmul_precision)
        self._issue(lambda: self.cublas.gemm(a, b, out, compute))

    def capture(self, fn):
        stream = self.stream
        with self.context():  # this GPU current and our stream: what fn issues is what is captured
            stream.begin_capture()
            try:
                fn()
            except BaseException:
                try:
                    stream.end_capture()  # the stream must leave capture mode
                except Exception:
                    pass  # the capture is broken by fn's failure: that failure is the one to report
                raise
            graph = stream.end_capture()
        return _CudaGraph(graph, stream)

    def precision_unavailable(self, mode):
        if mode != "float32" and self.cublas is None:
            return f"precision={mode!r} needs cuBLAS, and {self.name} has none ({self.note}); {FIX}"
        return super().precision_unavailable(mode)

    def asarray(self, x, dtype=None):
        with self.context():
            return self.xp.ascontiguousarray(self.xp.asarray(x, dtype=dtype))

    def to_host(self, x):
        if not isinstance(x, self.xp.ndarray):
            return np.asarray(x)
        self.stream.synchronize()  # our work on x is done before the default stream reads it
        return x.get()

    def context(self):
        """This GPU current and our stream, ordered after the caller's default-stream
        work on entry and before it again on exit."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.xp.cuda.Device(self.index))
        null = self.xp.cuda.Stream.null
        self.stream.wait_event(null.record())
        stack.enter_context(self.stream)
        stack.callback(lambda: null.wait_event(self.stream.record()))
        return stack

    def free_bytes(self):
        with self.context():
            # The pool's cached blocks are free to reuse as well.
            return self.xp.cuda.runtime.memGetInfo()[0] + self.xp.get_default_memory_pool().free_bytes()
