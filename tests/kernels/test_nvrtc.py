"""Every kernel module compiles the way the CUDA backend compiles it on a GPU
(gpubackprop.backend.nvrtc: CuPy's NVRTC binding, the include paths CuPy assembles,
our options), for A100, H100 and B200, with no GPU here. And float32 arithmetic
is compiled without flush-to-zero, unlike a plain cupy.RawModule.

Needs CuPy and NVRTC (the ``nvrtc`` extra: CuPy, the NVRTC wheel and the CUDA
headers: 131 MB to download); skipped without them, except in CI.
"""

import re

import pytest

from gpubackprop.backend import kernels as kernel_backend, nvrtc

from ..conftest import require_tool

ARCHS = (80, 90, 100)
MODULES = [pytest.param(f, low, id=f"{f}-{'16bit' if low else 'float'}")
           for f, names in sorted(kernel_backend.SOURCES.items()) for low in (False, True)
           if any(kernel_backend.is_low_precision(n) == low for n in names)]
# Float32 instructions that flush subnormals (.ftz.f32 in PTX), but for the
# approximate ex2 and rcp that libdevice's expf and tanhf use inside their range
# reduction in either mode (compiled with -ftz=false they still appear, and the
# functions' results keep their subnormals).
FTZ = re.compile(r"\t(?!ex2\.approx|rcp\.approx)[a-z][a-z0-9.]*\.ftz\.f32")


@pytest.fixture(scope="module")
def nvrtc_binding():
    try:
        from cupy_backends.cuda.libs import nvrtc as binding

        binding.getVersion()
        nvrtc.options(False)  # CuPy finds the CUDA headers
    except Exception as e:  # no CuPy, no libnvrtc, no headers
        require_tool(f"CuPy with NVRTC and the CUDA headers (pip install '.[nvrtc]'): {type(e).__name__}: {e}")
    return binding


@pytest.mark.parametrize("filename,low", MODULES)
def test_every_instantiation_compiles_for_each_architecture(nvrtc_binding, filename, low):
    names = nvrtc.module_names(filename, low)
    for arch in ARCHS:
        binary, lowered = nvrtc.compile_module(filename, low, arch)
        assert len(binary) > 1000, f"{filename} for sm_{arch}: no cubin"
        assert set(lowered) == set(names) and all(v.startswith("_Z") for v in lowered.values())


@pytest.mark.parametrize("filename,low", MODULES)
def test_float32_arithmetic_keeps_subnormals(nvrtc_binding, filename, low):
    text, _ = nvrtc.compile_module(filename, low, 90, ptx=True)
    text = text.decode()
    assert ".f32" in text and not FTZ.search(text), f"{filename}: flush-to-zero in {FTZ.findall(text)[:3]}"


def test_the_ftz_check_sees_cupys_default(nvrtc_binding, monkeypatch):
    """CuPy's RawModule adds -ftz=true after our options: compiled so, the check fails."""
    monkeypatch.setattr(nvrtc, "OPTIONS", nvrtc.OPTIONS + ("-ftz=true",))
    assert FTZ.search(nvrtc.compile_module("optimizers.cu", False, 90, ptx=True)[0].decode())


def test_the_cache_compiles_once_and_keys_on_what_goes_in(nvrtc_binding, tmp_path, monkeypatch):
    cache = nvrtc.KernelCache(str(tmp_path))
    binary, lowered = cache.get("clipping.cu", False, 90)
    assert len(list(tmp_path.iterdir())) == 1

    def no_compile(*args):
        raise AssertionError("compiled again")

    monkeypatch.setattr(nvrtc, "compile_module", no_compile)
    assert cache.get("clipping.cu", False, 90) == (binary, lowered)
    key = nvrtc.KernelCache.key("clipping.cu", False, 90)
    assert key != nvrtc.KernelCache.key("clipping.cu", False, 80)
    names = dict(nvrtc.SOURCES)
    names["clipping.cu"] = names["clipping.cu"][:-1]  # an instantiation fewer: another module
    monkeypatch.setattr(nvrtc, "SOURCES", names)
    assert nvrtc.KernelCache.key("clipping.cu", False, 90) != key
    monkeypatch.setattr(nvrtc, "SOURCES", kernel_backend.SOURCES)
    real_source = nvrtc.source
    monkeypatch.setattr(nvrtc, "source", lambda f: real_source(f) + "\n// edited\n")
    with pytest.raises(AssertionError, match="compiled again"):  # an edited source is a new key
        cache.get("clipping.cu", False, 90)


def test_a_damaged_cache_file_is_compiled_again(nvrtc_binding, tmp_path):
    cache = nvrtc.KernelCache(str(tmp_path))
    binary, lowered = cache.get("nonfinite.cu", False, 90)
    [path] = tmp_path.iterdir()
    for damaged in (b"", b"not json\n" + bytes(binary), b'["a list"]\n' + bytes(binary),
                    b'{"another": "name"}\n' + bytes(binary)):
        path.write_bytes(damaged)
        assert cache.get("nonfinite.cu", False, 90) == (binary, lowered)
    cache.forget("nonfinite.cu", False, 90)
    assert not path.exists()


def test_this_machine_s_toolkit_has_what_the_kernels_need(nvrtc_binding):
    """NVRTC, its builtins and the headers; cuBLAS (for the GEMMs) only comes with [ctk]."""
    assert [m for m in nvrtc.missing_parts() if not m.startswith("cuBLAS")] == []
