"""Every kernel instantiation compiles with nvcc for sm_80 (A100) and sm_90 (H100),
without warnings and without register spills.

The instantiations are kernel_backend.SOURCES, the list CuPy hands NVRTC, compiled
as CuPy compiles them: float32 / float64 alone, and float16 / bfloat16 with
GPUBACKPROP_LOW_PRECISION. Skipped where nvcc is absent (but not in CI).
"""

import os
import re
import shutil
import subprocess

import pytest

from gpubackprop.backend import kernels as kernel_backend

from ..conftest import require_tool
from .host_module import KERNEL_DIR

ARCHS = ("sm_80", "sm_90")
NVCC = shutil.which("nvcc")


def compile_report(filename, low, out_dir):
    """ptxas's report (-Xptxas -v) for the file's float or 16-bit instantiations."""
    names = [n for n in kernel_backend.SOURCES[filename] if kernel_backend.is_low_precision(n) == low]
    tu = os.path.join(out_dir, f"{filename}.{'low' if low else 'float'}.cu")
    with open(tu, "w") as f:
        # Taking each kernel's address instantiates it, exactly as a name expression does.
        f.write(f'#include "{filename}"\nvoid* gpubackprop_instances[] = {{\n')
        f.write("".join(f"    (void*)&{n},\n" for n in names) + "};\n")
    cmd = [NVCC, "-std=c++17", "-fmad=false", "-Werror", "all-warnings", "-Xptxas", "-v", "-I", KERNEL_DIR,
           *(["-DGPUBACKPROP_LOW_PRECISION"] if low else []),
           *[f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS], "-c", tu, "-o", tu + ".o"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr}"
    return names, done.stderr


UNITS = [pytest.param(f, low, id=f"{f}-{'float16-bfloat16' if low else 'float'}")
         for f, names in sorted(kernel_backend.SOURCES.items()) for low in (False, True)
         if any(kernel_backend.is_low_precision(n) == low for n in names)]


@pytest.mark.parametrize("filename,low", UNITS)
def test_compiles_for_sm80_and_sm90_without_spills(filename, low, tmp_path):
    if NVCC is None:
        require_tool("nvcc")
    names, report = compile_report(filename, low, str(tmp_path))
    entries = re.findall(r"Compiling entry function '(\w+)' for '(sm_\d+)'", report)
    # Each instantiation, per arch (a file's plain kernels come along in both variants).
    assert len(entries) >= len(names) * len(ARCHS), report
    for arch in ARCHS:
        for name in names:
            base = name.split("<")[0]
            assert any(f"{len(base)}{base}" in e for e, a in entries if a == arch), f"{name} not compiled for {arch}"
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(spills) >= len(entries), report  # entries, and callees such as pow
    assert all(s == ("0", "0") for s in spills), f"register spills in {filename}:\n{report}"
