"""kernels/*.cu compiled for a GPU: NVRTC through CuPy's binding, and a disk cache.

CuPy's RawModule appends ``-ftz=true`` after the caller's options
(``_compile_with_cache_cuda`` in cupy/cuda/compiler.py), so every float32 operation
of a RawModule flushes subnormals to zero, where NumPy, the host harness and nvcc
keep them. The kernels are therefore compiled here: the include paths CuPy
assembles for its own kernels, CuPy's execution-space default, and our options,
``-ftz=false`` among them. Nothing here needs a GPU: CI compiles every module this
way for several architectures.

A module is kernels/<file>'s float (float32, float64) or 16-bit (float16, bfloat16)
instantiations, the name expressions of ``kernels.SOURCES``.
"""

import glob
import hashlib
import json
import os

from ..state import atomic_write, cache_folder
from .kernels import SOURCES, is_low_precision, source

# --fmad=false: no contraction of a*b+c into one rounding, so the kernels round as
# the NumPy backend does (they are bound by memory, so it costs no time).
OPTIONS = ("--std=c++17", "--fmad=false", "-ftz=false")
FIX = ("install CuPy with the CUDA toolkit's libraries: pip install 'gpubackprop[cuda13]' (CUDA 13 drivers) or "
       "'gpubackprop[cuda12]' (CUDA 12), which bring cupy-cuda13x[ctk] / cupy-cuda12x[ctk]: NVRTC, cuBLAS and the "
       "CUDA headers")


HEADERS = ("cuda_fp16.h", "cuda_bf16.h", "crt/host_defines.h")  # the 16-bit types, and what NVRTC includes itself


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel source; the message holds NVRTC's log."""


def missing_parts():
    """What CuPy cannot find of the toolkit the CUDA backend needs, looked up directly
    (not guessed from an error's text): NVRTC and its builtins, cuBLAS (through
    cuda.pathfinder, CuPy 14's loader), and the headers (in the include paths CuPy
    assembles). A list of descriptions; empty when everything is there."""
    missing = []
    try:
        from cuda import pathfinder
    except ImportError:  # a CuPy that finds its libraries without it: nothing to ask
        pathfinder = None
    if pathfinder is not None:
        for lib, what in (("nvrtc", "NVRTC (libnvrtc)"), ("cublas", "cuBLAS (libcublas)")):
            try:
                found = pathfinder.load_nvidia_dynamic_lib(lib)
            except Exception as e:
                missing.append(f"{what}: {str(e).splitlines()[0]}")
                continue
            if lib == "nvrtc" and found.abs_path and not glob.glob(
                    os.path.join(os.path.dirname(found.abs_path), "libnvrtc-builtins*")):
                missing.append(f"NVRTC's builtins (no libnvrtc-builtins beside {found.abs_path})")
    try:
        folders = [o[2:] for o in options(False) if o.startswith("-I")]
    except Exception as e:
        missing.append(f"the CUDA headers ({type(e).__name__}: {e})")
    else:
        absent = [h for h in HEADERS if not any(os.path.isfile(os.path.join(d, h)) for d in folders)]
        if absent:
            missing.append(f"the CUDA headers ({', '.join(absent)} in none of {folders})")
    return missing


def toolkit_problem(error):
    """'CuPy cannot find ...' when a part of the toolkit is missing (see
    ``missing_parts``), which is then the likely cause of ``error``; else None."""
    missing = missing_parts()
    if not missing:
        return None
    first = str(error).splitlines()[0] if str(error) else ""
    return f"CuPy cannot find {'; '.join(missing)} (the failure: {type(error).__name__}: {first})"


def module_names(filename, low):
    return [n for n in SOURCES[filename] if is_low_precision(n) == low]


def options(low):
    """NVRTC's options for a module, the architecture aside."""
    try:
        from cupy._core.core import assemble_cupy_compiler_options  # the include paths CuPy's own kernels get
    except ImportError as e:
        raise KernelCompileError(f"this CuPy ({e}) does not assemble compiler options as CuPy 14 does; "
                                 "gpubackprop needs cupy-cuda13x or cupy-cuda12x 14.x") from None
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


def compile_module(filename, low, arch, ptx=False):
    """(binary, {name expression: lowered name}) of one module for compute capability
    ``arch``: a cubin, or PTX (see ``target``; ``ptx=True``: PTX for compute_<arch>,
    to read what the compiler made of the source)."""
    from cupy_backends.cuda.libs import nvrtc

    names = module_names(filename, low)
    arch_option = f"-arch=compute_{arch}" if ptx else target(arch, nvrtc.getSupportedArchs())
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


class KernelCache:
    """Compiled modules on disk, keyed by everything that goes into them (source
    text, options, architecture, NVRTC's version), so an edited kernel or another
    compiler never loads a stale binary. ``directory`` defaults to
    $GPUBACKPROP_KERNEL_CACHE, else ~/.cache/gpubackprop/kernels; a folder that
    cannot be written only costs a compile per process."""

    def __init__(self, directory=None):
        if directory is None:
            directory = os.environ.get("GPUBACKPROP_KERNEL_CACHE") or cache_folder("kernels")
        self.directory = directory

    @staticmethod
    def key(filename, low, arch):
        from cupy_backends.cuda.libs import nvrtc

        parts = [source(filename), "\0".join(module_names(filename, low)), "\0".join(options(low)), str(arch),
                 repr(nvrtc.getVersion())]
        return hashlib.sha256("\x01".join(parts).encode()).hexdigest()

    def _path(self, key):
        return os.path.join(self.directory, key + ".module")

    def load(self, key, names):
        """(binary, mapping), or None if absent, unreadable, or not naming every one
        of ``names``."""
        try:
            with open(self._path(key), "rb") as f:
                header, binary = f.read().split(b"\n", 1)
            mapping = json.loads(header)
        except (OSError, ValueError):
            return None
        if not isinstance(mapping, dict) or set(mapping) != set(names) or not binary:
            return None
        return binary, mapping

    def forget(self, filename, low, arch):
        """Drop a cached module (one the driver would not load)."""
        try:
            os.unlink(self._path(self.key(filename, low, arch)))
        except OSError:
            pass

    def store(self, key, binary, mapping):
        try:
            os.makedirs(self.directory, exist_ok=True)
            atomic_write(self._path(key), json.dumps(mapping).encode() + b"\n" + bytes(binary))
        except OSError:
            pass  # a read-only home: compile again next time

    def get(self, filename, low, arch):
        """The module's (binary, mapping), compiled only when not cached."""
        key = self.key(filename, low, arch)
        found = self.load(key, module_names(filename, low))
        if found is None:
            found = compile_module(filename, low, arch)
            self.store(key, *found)
        return found
