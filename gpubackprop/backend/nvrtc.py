"""kernels/*.cu compiled for a GPU: NVRTC through CuPy's binding, and a disk cache.

CuPy's RawModule appends ``-ftz=true`` after the caller's options
(``_compile_with_cache_cuda`` in cupy/cuda/compiler.py), so every float32 operation
of a RawModule flushes subnormals to zero, where NumPy, the host harness and nvcc
keep them. The kernels are therefore compiled here: the include paths CuPy
assembles for its own kernels, CuPy's execution-space default, and our options,
``-ftz=false`` among them. Nothing here needs a GPU: CI compiles every module this
way for several architectures.

A module is kernels/<file>'s float (float32, float64) or 16-bit (float16, bfloat16)
instantiations, the name expressions of ``kernel_backend.SOURCES``.
"""

import hashlib
import json
import os

from ..io import atomic_write
from .kernel_backend import SOURCES, is_low_precision, source

# --fmad=false: no contraction of a*b+c into one rounding, so the kernels round as
# the NumPy backend does (they are bound by memory, so it costs no time).
OPTIONS = ("--std=c++17", "--fmad=false", "-ftz=false")
FIX = ("install CuPy with the CUDA toolkit's libraries: pip install 'gpubackprop[cuda13]' (CUDA 13 drivers) or "
       "'gpubackprop[cuda12]' (CUDA 12), which bring cupy-cuda13x[ctk] / cupy-cuda12x[ctk]: NVRTC, cuBLAS and the "
       "CUDA headers")


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel source; the message holds NVRTC's log."""


def toolkit_problem(error):
    """What ``error`` says is missing from the CUDA toolkit CuPy needs (NVRTC, its
    headers, cuBLAS), or None when it is some other failure."""
    text = f"{type(error).__name__}: {error}"
    for what, marks in (("the CUDA headers", ("Failed to find CUDA headers", "cuda_fp16.h", "cuda_bf16.h")),
                        ("NVRTC (libnvrtc)", ("libnvrtc", "nvrtc")),
                        ("cuBLAS (libcublas)", ("libcublas", "cublas"))):
        if any(mark in text for mark in marks) and ("NotFound" in text or "Failed to find" in text
                                                   or "No such file" in text or "cannot open" in text):
            return f"CuPy cannot find {what} ({text.splitlines()[0]})"
    return None


def module_names(filename, low):
    return [n for n in SOURCES[filename] if is_low_precision(n) == low]


def options(low):
    """NVRTC's options for a module, the architecture aside."""
    from cupy._core.core import assemble_cupy_compiler_options

    ours = OPTIONS + (("-DGPUBACKPROP_LOW_PRECISION",) if low else ())
    return tuple(assemble_cupy_compiler_options(ours)) + ("--device-as-default-execution-space",)


def target(arch, supported):
    """NVRTC's architecture option for compute capability ``arch`` (e.g. 90): a cubin
    where NVRTC knows it, else PTX of the newest it knows below it (the driver
    compiles that when the module loads)."""
    if arch in supported:
        return f"-arch=sm_{arch}"
    older = [a for a in supported if a < arch]
    if not older:
        raise KernelCompileError(f"this NVRTC compiles for {sorted(supported)}, nothing at or below sm_{arch}")
    return f"-arch=compute_{max(older)}"


def compile_module(filename, low, arch):
    """(binary, {name expression: lowered name}) of one module for compute capability
    ``arch``: a cubin, or PTX (see ``target``)."""
    from cupy_backends.cuda.libs import nvrtc

    names = module_names(filename, low)
    arch_option = target(arch, nvrtc.getSupportedArchs())
    program = nvrtc.createProgram(source(filename), filename, (), ())
    try:
        for name in names:
            nvrtc.addNameExpression(program, name)
        try:
            nvrtc.compileProgram(program, options(low) + (arch_option,))
        except nvrtc.NVRTCError as e:
            raise KernelCompileError(f"NVRTC could not compile kernels/{filename} ({e}):\n"
                                     f"{nvrtc.getProgramLog(program)}") from None
        binary = nvrtc.getCUBIN(program) if arch_option.startswith("-arch=sm_") else nvrtc.getPTX(program)
        return binary, {name: nvrtc.getLoweredName(program, name) for name in names}
    finally:
        nvrtc.destroyProgram(program)


def ptx(filename, low, arch):
    """The module's PTX for compute_<arch>, with the options of ``compile_module``
    (to read what the compiler made of it: CI looks for .ftz in it)."""
    from cupy_backends.cuda.libs import nvrtc

    program = nvrtc.createProgram(source(filename), filename, (), ())
    try:
        for name in module_names(filename, low):
            nvrtc.addNameExpression(program, name)
        nvrtc.compileProgram(program, options(low) + (f"-arch=compute_{arch}",))
        text = nvrtc.getPTX(program)
        return text.decode() if isinstance(text, bytes) else text
    finally:
        nvrtc.destroyProgram(program)


class KernelCache:
    """Compiled modules on disk, keyed by everything that goes into them (source
    text, options, architecture, NVRTC's version), so an edited kernel or another
    compiler never loads a stale binary. ``directory`` defaults to
    $GPUBACKPROP_KERNEL_CACHE, else ~/.cache/gpubackprop/kernels; a folder that
    cannot be written only costs a compile per process."""

    def __init__(self, directory=None):
        if directory is None:
            directory = os.environ.get("GPUBACKPROP_KERNEL_CACHE") or os.path.join(
                os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                "gpubackprop", "kernels")
        self.directory = directory

    @staticmethod
    def key(filename, low, arch):
        from cupy_backends.cuda.libs import nvrtc

        parts = [source(filename), "\0".join(options(low)), str(arch), repr(nvrtc.getVersion()), str(low)]
        return hashlib.sha256("\x01".join(parts).encode()).hexdigest()

    def _path(self, key):
        return os.path.join(self.directory, key + ".module")

    def load(self, key):
        """(binary, mapping), or None if absent or unreadable."""
        try:
            with open(self._path(key), "rb") as f:
                header, binary = f.read().split(b"\n", 1)
            return binary, json.loads(header)
        except (OSError, ValueError):
            return None

    def store(self, key, binary, mapping):
        try:
            os.makedirs(self.directory, exist_ok=True)
            atomic_write(self._path(key), json.dumps(mapping).encode() + b"\n" + bytes(binary))
        except OSError:
            pass  # a read-only home: compile again next time

    def get(self, filename, low, arch):
        """The module's (binary, mapping), compiled only when not cached."""
        key = self.key(filename, low, arch)
        found = self.load(key)
        if found is None:
            found = compile_module(filename, low, arch)
            self.store(key, *found)
        return found
