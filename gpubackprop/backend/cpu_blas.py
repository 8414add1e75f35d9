"""The CPU's matrix products: NumPy's BLAS, or MKL where the ``mkl`` wheel is
installed and a measurement on this machine says it is faster for a model's shapes.

Every GEMM of a dense layer's step has one of three forms (B rows, layer l):

    forward   z_l      = a_{l-1} W_l^T       (B, n_l)
    backward  dL/dW_l  = delta_l^T a_{l-1}   (n_l, n_{l-1})
              dL/da_{l-1} = delta_l W_l      (B, n_{l-1})

NumPy's OpenBLAS and MKL differ by up to a fifth on these (2-core Xeon, 2026-11-30:
MKL 1.05-1.17x on [784,1024,1024,10] and [64,64,64,64,64,16], 0.95x on
[784,128,10] @ 64), and by CPU, so neither is chosen by brand: the first time a
model's workspaces are made, ``choose`` times that model's GEMMs under each (the
best of several passes) and keeps the faster, MKL only where it wins by
``MARGIN``. The choice is cached on disk per machine (``choices``), so every later
process, a resumed run included, multiplies with the same library and gets the
same bits. One model keeps one library for all its batch sizes: two thread pools
taking turns within a step would spin against each other on the same cores.

$GPUBACKPROP_CPU_BLAS = ``auto`` (the default) | ``numpy`` | ``mkl`` overrides the
measurement. MKL runs in its Conditional Numerical Reproducibility mode
(MKL_CBWR=AUTO, unless the user set MKL_CBWR): without it, its results may vary
with the arrays' alignment, and a run would not repeat bit for bit.
"""

import ctypes
import functools
import json
import logging
import os
import platform
import time

import numpy as np

from ..state import atomic_write, cache_folder
from .base import gemm_layout

log = logging.getLogger("gpubackprop")

CHOICE_VARIABLE = "GPUBACKPROP_CPU_BLAS"
CHOICES = ("auto", "numpy", "mkl")
MARGIN = 0.03  # MKL must be this much faster: a near tie keeps the library NumPy ships with
MAX_ROWS = 4096  # measure on at most this many rows: the choice does not change beyond, memory would
MIN_FLOPS = 1e7  # a step of fewer GEMM FLOPs is Python's time, not the BLAS's: NumPy's, unmeasured
SETTLE_S, PASSES = 0.3, 3  # each library's passes: for this long, and at least this many
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112  # CBLAS_LAYOUT, CBLAS_TRANSPOSE
CBWR_AUTO = 2  # MKL_CBWR_AUTO: reproducible on this machine for a fixed thread count


def numpy_matmul(a, b, out):
    """out = a @ b through NumPy (its BLAS)."""
    np.matmul(a, b, out=out)


class Mkl:
    """cblas_sgemm / cblas_dgemm of the mkl wheel's libmkl_rt, through ctypes."""

    name = "mkl"

    def __init__(self, lib):
        P, I = ctypes.c_void_p, ctypes.c_int
        self._gemm, self._batched = {}, {}
        for name, scalar, dtype in (("cblas_sgemm", ctypes.c_float, np.float32),
                                    ("cblas_dgemm", ctypes.c_double, np.float64)):
            f = getattr(lib, name)
            f.restype = None
            f.argtypes = [I, I, I, I, I, I, scalar, P, I, P, I, scalar, P, I]
            self._gemm[np.dtype(dtype)] = f
            batched = getattr(lib, name + "_batch_strided", None)  # MKL 2020 on; without, stacks go to NumPy
            if batched is not None:
                batched.restype = None
                batched.argtypes = [I, I, I, I, I, I, scalar, P, I, I, P, I, I, scalar, P, I, I, I]
                self._batched[np.dtype(dtype)] = batched
        buf = ctypes.create_string_buffer(256)
        lib.MKL_Get_Version_String(buf, len(buf))  # the C names: the lowercase ones are Fortran's
        self.version = buf.value.decode(errors="replace").strip()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    # MKL's OpenMP pool does not survive fork: a child's first threaded GEMM can wait
    # forever at a barrier for a worker its parent had. So a forked child (``_gemm``
    # cleared) multiplies with NumPy's BLAS: the same products, other roundings.

    @staticmethod
    def _operand(x):
        """(transpose flag, leading dimension) of a 2-D operand with one unit stride, else None."""
        layout = gemm_layout(x)
        return None if layout is None else (TRANS if layout[0] else NO_TRANS, layout[1])

    def _forget(self):
        self._gemm.clear()
        self._batched.clear()

    def matmul(self, a, b, out):
        """out = a @ b, of 2-D operands or of stacks of them (3-D: a pack's members, one
        strided-batch call); what cblas cannot take as it is (other dtypes, 1-D operands,
        odd strides, overlapping arrays) goes to NumPy, as correct and only slower."""
        stacked = out.ndim == 3
        gemm = (self._batched if stacked else self._gemm).get(out.dtype)
        if (gemm is None or not a.ndim == b.ndim == out.ndim or out.ndim not in (2, 3) or a.dtype != out.dtype
                or b.dtype != out.dtype or np.may_share_memory(out, a) or np.may_share_memory(out, b)
                or stacked and not a.shape[0] == b.shape[0] == out.shape[0]):
            return numpy_matmul(a, b, out)
        fa, fb, fo = (self._operand(x[0] if stacked else x) for x in (a, b, out))
        if (fa is None or fb is None or fo is None or fo[0] != NO_TRANS or a.shape[-1] != b.shape[-2]
                or out.shape[-2:] != (a.shape[-2], b.shape[-1])):  # out: rows of unit stride (a pack's column block too)
            return numpy_matmul(a, b, out)
        m, n, k = out.shape[-2], out.shape[-1], a.shape[-1]
        if not (m and n):
            return None
        if not stacked:
            return gemm(ROW_MAJOR, fa[0], fb[0], m, n, k, 1.0, a.ctypes.data, fa[1], b.ctypes.data, fb[1], 0.0,
                        out.ctypes.data, fo[1])
        step = [x.strides[0] // x.itemsize for x in (a, b, out)]
        if step[2] < fo[1] * m:  # members' outputs interleaved (a pack's first-layer columns): MKL refuses them
            for i in range(out.shape[0]):
                self.matmul(a[i], b[i], out[i])
            return None
        return gemm(ROW_MAJOR, fa[0], fb[0], m, n, k, 1.0, a.ctypes.data, fa[1], step[0], b.ctypes.data, fb[1],
                    step[1], 0.0, out.ctypes.data, fo[1], step[2], out.shape[0])


def mkl_distribution():
    """The installed mkl wheel's metadata, or None."""
    from importlib import metadata

    try:
        return metadata.distribution("mkl")
    except metadata.PackageNotFoundError:
        return None


def mkl_version():
    """The mkl wheel's version (without loading it), or None."""
    dist = mkl_distribution()
    return dist and dist.version


def mkl_library_path():
    """Where the mkl wheel put libmkl_rt, or None when it is not installed."""
    dist = mkl_distribution()
    if dist is None:
        return None
    for f in dist.files or ():
        if os.path.basename(str(f)).startswith(("libmkl_rt.so", "mkl_rt")):
            return str(dist.locate_file(f))
    return None


@functools.lru_cache(maxsize=None)
def mkl():
    """This process's Mkl, or None (and the reason, logged) when the wheel is absent or will not load."""
    path = mkl_library_path()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)
        if not os.environ.get("MKL_CBWR"):  # before any other MKL call, as its manual requires
            lib.MKL_CBWR_Set.argtypes = [ctypes.c_int]
            if lib.MKL_CBWR_Set(CBWR_AUTO) != 0:
                raise OSError("MKL_CBWR_Set(MKL_CBWR_AUTO) failed")
        return Mkl(lib)
    except (OSError, AttributeError) as e:
        log.warning("the mkl wheel is installed but its library did not load (%s); the CPU multiplies "
                    "with NumPy's BLAS", e)
        return None


def requested(environ=os.environ):
    """$GPUBACKPROP_CPU_BLAS, checked."""
    value = environ.get(CHOICE_VARIABLE, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{CHOICE_VARIABLE}={value!r}: use one of {', '.join(CHOICES)}")
    return value


def step_gemms(sizes, rows, dtype, rng):
    """The (a, b, out) of one train step's GEMMs for layer sizes ``sizes`` on ``rows``
    rows (random values: a BLAS's speed does not depend on them)."""
    gemms = []
    for l in range(1, len(sizes)):
        n_in, n_out = sizes[l - 1], sizes[l]
        a, W = rng.standard_normal((rows, n_in), dtype), rng.standard_normal((n_out, n_in), dtype)
        delta = rng.standard_normal((rows, n_out), dtype)
        gemms.append((a, W.T, np.empty((rows, n_out), dtype)))
        gemms.append((delta.T, a, np.empty((n_out, n_in), dtype)))
        if l > 1:
            gemms.append((delta, W, np.empty((rows, n_in), dtype)))
    return gemms


def fastest(candidates, gemms, clock=time.perf_counter):
    """{name: the best seconds of a pass over ``gemms``} of each (name, matmul) in
    ``candidates``, one after the other. Each runs for SETTLE_S and at least PASSES
    passes: its first passes may meet the other library's threads still spinning
    (MKL's wait 200 ms before they sleep) and its own kernels loading, so the best
    pass counts, the library alone on the cores, as a model that keeps it sees it."""
    best = {}
    for name, matmul in candidates:
        start = clock()
        passes = 0
        while passes < PASSES or clock() - start < SETTLE_S:
            t = clock()
            for a, b, out in gemms:
                matmul(a, b, out)
            best[name] = min(best.get(name, float("inf")), clock() - t)
            passes += 1
    return best


class Choices:
    """The libraries chosen on this machine, by model shape, in a JSON file under the
    cache folder; entries are keyed by everything that changes the answer (the CPU,
    the cores this process may use, the thread-count variables, both libraries'
    versions). A folder that cannot be written only costs a measurement per process."""

    def __init__(self, path=None):
        self.path = path or cache_folder("cpu_blas.json")
        self.memory = {}

    @staticmethod
    def machine(mkl_version):
        try:
            blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
            numpy_blas = f"{blas.get('name')} {blas.get('version')}"
        except Exception:  # an old NumPy without show_config's dicts: its version alone
            numpy_blas = "?"
        cores = usable_cores()
        threads = ",".join(f"{v}={os.environ.get(v, '')}" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                                    "MKL_NUM_THREADS"))
        return (f"{cpu_name()}|{cores} cores|{threads}|numpy {np.__version__} {numpy_blas}|{mkl_version}"
                f"|{os.environ.get('MKL_CBWR', '')}")

    def _read(self):
        try:
            with open(self.path) as f:
                found = json.load(f)
            return found if isinstance(found, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, machine, key):
        if (machine, key) in self.memory:
            return self.memory[machine, key]
        entry = self._read().get(machine, {}).get(key)
        return entry if entry in ("numpy", "mkl") else None

    def put(self, machine, key, name):
        self.memory[machine, key] = name
        found = self._read()
        found.setdefault(machine, {})[key] = name
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            atomic_write(self.path, json.dumps(found, indent=1).encode())
        except OSError as e:
            log.debug("could not cache the CPU BLAS choice in %s (%s)", self.path, e)


def usable_cores():
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_name():
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def choose(sizes, batch, dtype, choices, environ=os.environ, library=mkl, measure=fastest):
    """out = a @ b for a model of layer sizes ``sizes`` whose first workspace has
    ``batch`` rows: ``numpy_matmul``, or MKL's where it is installed and faster here
    (measured once per machine and shape, see the module's docstring)."""
    wanted = requested(environ)
    if wanted == "numpy" or np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
        return numpy_matmul
    found = library()
    if found is None:
        if wanted == "mkl":
            raise RuntimeError(f"{CHOICE_VARIABLE}=mkl, but MKL is not available (the mkl wheel is not installed, "
                               "or its library did not load): pip install 'gpubackprop[mkl]', or unset "
                               f"{CHOICE_VARIABLE} to use NumPy's BLAS")
        return numpy_matmul
    if wanted == "mkl":
        return found.matmul
    rows = min(1 << max(int(batch) - 1, 0).bit_length(), MAX_ROWS)  # the next power of 2: a few keys, not one per size
    if 6 * rows * sum(a * b for a, b in zip(sizes, sizes[1:])) < MIN_FLOPS:
        return numpy_matmul
    machine, key = Choices.machine(found.version), f"{np.dtype(dtype).name} {rows} x {list(sizes)}"
    name = choices.get(machine, key)
    if name is None:
        times = measure((("numpy", numpy_matmul), ("mkl", found.matmul)),
                        step_gemms(sizes, rows, dtype, np.random.default_rng(0)))
        name = "mkl" if times["mkl"] < (1 - MARGIN) * times["numpy"] else "numpy"
        choices.put(machine, key, name)
        log.info("CPU GEMMs of %s: %s (a step's GEMMs took %.3g ms with NumPy's BLAS, %.3g ms with MKL; "
                 "cached in %s)", key, name, 1e3 * times["numpy"], 1e3 * times["mkl"], choices.path)
    return found.matmul if name == "mkl" else numpy_matmul
