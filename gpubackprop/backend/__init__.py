"""Backends: where arrays live and how the fused primitives of a train step run.

A Backend (``base.py``: the interface) owns an array module (``xp``: NumPy or
CuPy) and implements the few primitives a train step is made of. The network
calls only these, so a new device needs a new Backend and nothing else. The
backends are siblings: ``cpu.py`` (NumPy), ``kernels.py`` (the primitives as
launches of kernels/*.cu, shared by the CUDA backend and the tests' host
harness), ``cuda.py`` (CuPy, cuBLAS, streams, graphs). ``cpu_fused.py`` is the
NumPy backend with its elementwise chains fused into compiled loops (numba,
``cpu_kernels.py``): the CPU's backend wherever numba is installed, its GEMMs on
NumPy's BLAS or MKL, whichever ``cpu_blas.py`` measured faster for the model.

    dense_forward    a_l = g(a_{l-1} W_l^T + b_l)                (bias and g fused on the GEMM output)
    dense_backward   delta_l = dL/da_l * g'(a_l)                 (from the stored activation)
                     dL/db_l = sum over the batch of delta_l,
                     dL/dW_l = delta_l^T a_{l-1},  dL/da_{l-1} = delta_l W_l
    loss             cross entropy or MSE: the loss and delta_L in one pass, and the
                     epoch's running loss and hit count
    optimizer_update one update over the flat parameter buffer (the rule's maths
                     and kernel arguments are in gpubackprop.optim)
    capture          (where ``supports_graphs``) a train step recorded once and
                     replayed: a CUDA graph on the GPU

The primitives take small structs (``Dense``, ``DenseBuffers``, ``LossBuffers``,
``optim.Update``: views into the network's flat buffers and a workspace) rather than
loose argument lists.

Arrays are row-major with the batch first: a_l is (B, n_l), W_l is (n_l, n_{l-1})
as in PyTorch, so a row of a is a sample and W matches ``torch.nn.Linear.weight``.

``get_backend("cpu" | "cuda" | "cuda:N" | "auto")`` returns one shared Backend
per device.
"""

import functools
import logging
import re

from . import cuda
from .base import Backend, Dense, DenseBuffers, DeviceUnavailableError, LossBuffers, MemberSettings, MemberUpdate, OutOfMemoryError
from .cpu import NumpyBackend

try:  # numba: the "fast" extra
    from .cpu_fused import FusedCpuBackend
except ImportError as e:
    FusedCpuBackend, NUMBA_PROBLEM = None, str(e)
else:
    NUMBA_PROBLEM = ""

log = logging.getLogger("gpubackprop")


def get_backend(device="cpu"):
    """The Backend for ``device``: "cpu", "cuda", "cuda:N", "auto", or a Backend.

    "auto" takes the first GPU when CuPy can use it, else the CPU, and logs which
    (logger "gpubackprop", INFO) with the reason; ``backend.note`` keeps it.
    """
    if isinstance(device, Backend):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'cpu', 'cuda:0' or 'auto', not {type(device).__name__}")
    return backend_for(device.strip().lower())


@functools.lru_cache(maxsize=None)
def backend_for(name):
    """The backend of a device name, made once per process (CuPy is imported only here)."""
    if name == "cpu":
        return cpu_backend()
    if name == "auto":
        try:
            backend = _cuda_backend(0)
        except DeviceUnavailableError as e:
            backend = cpu_backend(f"device='auto' chose cpu: {e.cause}")
        else:
            backend.note = f"device='auto' chose {backend.name}"
        log.info(backend.note)
        return backend
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match:
        return _cuda_backend(int(match.group(1) or 0))
    raise ValueError(f"unknown device {name!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'")


def cpu_backend(note=""):
    """The CPU's backend: fused loops where numba is installed, else NumPy alone (said in its note)."""
    if FusedCpuBackend is None:
        why = (f"the CPU runs NumPy's ufuncs without the fused loops ({NUMBA_PROBLEM or 'numba is not available'}); "
               "pip install 'gpubackprop[fast]' for them")
        return NumpyBackend(note="; ".join(n for n in (note, why) if n))
    return FusedCpuBackend(note=note)


def _cuda_backend(index):
    return cuda.CupyBackend(index)


__all__ = ["Backend", "Dense", "DenseBuffers", "DeviceUnavailableError", "FusedCpuBackend", "LossBuffers", "MemberSettings", "MemberUpdate",
           "NumpyBackend", "OutOfMemoryError", "cpu_backend", "get_backend"]
