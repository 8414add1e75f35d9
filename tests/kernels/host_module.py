"""Compile kernels/*.cu for the CPU (g++ and cuda_host.h) and launch them from Python.

HostModule has CuPy's RawModule launch signature, so a KernelBackend given NumPy
and a HostModule runs the CUDA backend's code path, kernels included, on the CPU.
Each source file becomes one shared library exporting ``launch_<i>`` for the i-th
name expression of ``kernel_backend.SOURCES[file]``: the instantiations CuPy and
nvcc compile.
"""

import ctypes
import hashlib
import os
import shutil
import subprocess

import numpy as np

from gpubackprop.backend import kernels as kernel_backend

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_DIR = str(kernel_backend.KERNEL_DIR)
CXX = shutil.which(os.environ.get("CXX", "g++"))

# Blocked threads sleep instead of spinning: a 256-thread block shares 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

_SCALARS = {
    np.dtype(np.float32): ctypes.c_float,
    np.dtype(np.float64): ctypes.c_double,
    np.dtype(np.int32): ctypes.c_int32,
    np.dtype(np.int64): ctypes.c_int64,
    np.dtype(np.uint32): ctypes.c_uint32,
    np.dtype(np.uint64): ctypes.c_uint64,
}


def _wrapper(filename):
    lines = ['#include "cuda_host.h"', f'#include "{filename}"', 'extern "C" {']
    for i, name in enumerate(kernel_backend.SOURCES[filename]):
        lines.append(f"int launch_{i}(const unsigned* g, const unsigned* b, void** a) "
                     f"{{ return host_launch(&{name}, g, b, a); }}")
    return "\n".join(lines + ["}", ""])


def build(filename, out_dir):
    """The shared library of ``kernels/filename`` (rebuilt when a source or the harness changes)."""
    code = _wrapper(filename)
    digest = hashlib.sha256(code.encode())
    for path in sorted(os.listdir(KERNEL_DIR)) + ["cuda_host.h"]:
        if path.endswith((".cu", ".cuh", ".h")):
            with open(os.path.join(HERE if path == "cuda_host.h" else KERNEL_DIR, path), "rb") as f:
                digest.update(f.read())
    lib = os.path.join(out_dir, f"{filename}.{digest.hexdigest()[:16]}.so")
    if not os.path.exists(lib):
        src = os.path.join(out_dir, f"{filename}.host.cpp")
        with open(src, "w") as f:
            f.write(code)
        cmd = [CXX, "-std=c++20", "-O1", "-fopenmp", "-fPIC", "-shared", "-Wall", "-Werror",
               "-Wno-unknown-pragmas", "-I", HERE, "-I", KERNEL_DIR, src, "-o", lib + ".tmp", "-lpthread"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"host build of {filename} failed:\n{' '.join(cmd)}\n{done.stderr}")
        os.replace(lib + ".tmp", lib)
    return lib


class HostModule:
    """kernels/*.cu on the CPU: ``launch(name_expression, grid, block, args)``.

    Arguments are NumPy arrays (passed as pointers), None (a null pointer) and
    NumPy scalars (by value, as the C type of their dtype), as CuPy's RawKernel
    takes them.
    """

    def __init__(self, out_dir):
        self._libs = {f: ctypes.CDLL(build(f, out_dir)) for f in kernel_backend.SOURCES}

    def launch(self, name, grid, block, args):
        filename = kernel_backend.FILE_OF[name]
        fn = getattr(self._libs[filename], f"launch_{kernel_backend.SOURCES[filename].index(name)}")
        held = [self._arg(a) for a in args]  # kept alive until the call returns
        argv = (ctypes.c_void_p * len(held))(*[ctypes.addressof(h) for h in held])
        dims = [(ctypes.c_uint * 3)(*d) for d in (grid, block)]
        if fn(dims[0], dims[1], argv):
            raise RuntimeError(f"host launch of {name} failed (see stderr)")

    @staticmethod
    def _arg(a):
        if a is None:  # a null pointer, as CuPy passes None
            return ctypes.c_void_p(None)
        if isinstance(a, np.ndarray):
            if not a.flags.c_contiguous:
                raise ValueError("kernels take C-contiguous arrays")
            return ctypes.c_void_p(a.ctypes.data)
        if isinstance(a, np.generic) and a.dtype in _SCALARS:
            return _SCALARS[a.dtype](a.item())
        raise TypeError(f"kernel argument {a!r}: pass NumPy arrays or NumPy scalars of an explicit C type")
