"""gpubackprop selftest: it passes where the engine is right, and fails, naming the
primitive, where it is not."""

import json

import numpy as np
import pytest

from gpubackprop.tools import selftest
from gpubackprop.backend.kernels import KernelBackend
from gpubackprop.backend.cpu import NumpyBackend
from gpubackprop.cli import main


def test_the_numpy_backend_passes_against_float64(capsys):
    report = selftest.run("cpu", quick=True, seed=0)
    assert report.passed, report.table()
    ran = {(c.name.split(" (")[0], c.mode) for c in report.checks if c.ran}
    assert ("dense forward+backward relu", "float32") in ran and ("gather_rows", "float64") in ran
    assert {m for _, m in ran} == {"float64", "float32", "tf32", "uint32"}
    optimizer_modes = {c.mode for c in report.checks if c.name.startswith("optimizer Adam(")}
    assert optimizer_modes == {"float32", "float64"}  # state is float32 in the other modes
    skipped = {c.mode: c.note for c in report.checks if not c.ran and c.name == "every check"}
    assert set(skipped) == {"bf16", "fp16"} and "16-bit kernels" in skipped["bf16"]
    assert "checks passed, 0 failed" in capsys.readouterr().out


def test_the_kernels_pass_through_the_host_harness(host_module):
    """The CUDA backend's code path, every kernel of it, in the modes of mixed
    precision too (the loss-scale and guard counters among them: launched as one
    warp, they once counted a step 32 times)."""
    backend = KernelBackend(np, host_module, n_sm=2)
    report = selftest.run(backend, quick=True, modes=["float32", "bf16", "fp16"], seed=1, log=None)
    assert report.passed, report.table()
    names = {c.name for c in report.checks if c.ran}
    assert {"update_loss_scale (clean, clean: grow, overflow: back off, clean)",
            "count_nonfinite (one bad step, then a clean one)", "fit steps, graphs = eager bit for bit, mse",
            "subnormals through sgd_update (p - 0.5 g)"} <= names


def test_flushing_subnormals_to_zero_fails():
    """What a kernel compiled with -ftz=true (a plain cupy.RawModule's default) would do."""
    class FlushToZero(NumpyBackend):
        def optimizer_update(self, rule, update, h):
            super().optimizer_update(rule, update, h)
            update.p[np.abs(update.p) < np.finfo(np.float32).tiny] = 0

    report = selftest.run(FlushToZero(), quick=True, modes=["float32"], seed=4, log=None)
    assert [c.name for c in report.failures] == ["subnormals through sgd_update (p - 0.5 g)"]


class _WrongBias(NumpyBackend):
    """A backend whose forward pass forgets the bias of the last column."""

    def dense_forward(self, layer, buf, dropout=None):
        b = layer.b.copy()
        b[-1] = 0
        super().dense_forward(layer._replace(b=b), buf, dropout)


def test_a_wrong_primitive_fails_by_name():
    report = selftest.run(_WrongBias(), quick=True, modes=["float64"], seed=2, log=None)
    failed = {c.name for c in report.failures}
    assert "dense forward+backward relu" in failed and not report.passed
    assert all(c.error > c.bound for c in report.failures)
    assert "optimizer SGD(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0) (3 steps, state)" \
        not in failed  # the other primitives still pass


def test_an_unwritten_element_fails():
    got, want = np.array([1.0, np.nan]), np.array([1.0, 2.0])
    assert selftest.error(got, want) == np.inf and selftest.error(want, want) == 0.0
    assert selftest.error(np.zeros(3), np.zeros(2)) == np.inf


def test_a_crash_is_a_failure_of_its_group():
    class Broken(NumpyBackend):
        def optimizer_update(self, *args, **kwargs):
            raise RuntimeError("no kernel")

    report = selftest.run(Broken(), quick=True, modes=["float32"], seed=3, log=None)
    assert [c.name for c in report.failures][0].startswith("check_optimizers crashed: RuntimeError: no kernel")


def test_the_command_line_writes_json_and_sets_the_exit_status(tmp_path, capsys):
    path = tmp_path / "selftest.json"
    assert main(["selftest", "--device", "cpu", "--quick", "--modes", "float32", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["passed"] and report["device"] == "cpu" and all(c["passed"] for c in report["checks"])
    assert "| check | mode | error | bound | result |" in capsys.readouterr().out


def test_unknown_modes_are_refused():
    with pytest.raises(ValueError, match="unknown modes"):
        selftest.run("cpu", modes=["float8"])


def test_a_report_where_nothing_ran_does_not_pass():
    report = selftest.Report("cuda:0", {}, [selftest.Check("every check", m, note="no cuBLAS") for m in selftest.MODES])
    assert not report.passed and report.failures == []


def test_modes_the_backend_refuses_are_skipped_with_its_reason():
    class NoTensorCores(NumpyBackend):
        def precision_unavailable(self, mode):
            return "precision='tf32' needs cuBLAS" if mode == "tf32" else super().precision_unavailable(mode)

    report = selftest.run(NoTensorCores(), quick=True, modes=["float32", "tf32"], seed=5, log=None)
    assert report.passed
    [skip] = [c for c in report.checks if c.mode == "tf32"]
    assert not skip.ran and skip.note == "precision='tf32' needs cuBLAS"


def test_the_command_line_checks_the_gpu_unless_told_otherwise(capsys, monkeypatch):
    """No silent fallback: without a usable GPU `gpubackprop selftest` is an error."""
    from gpubackprop.backend import DeviceUnavailableError

    def no_gpu(name):
        raise DeviceUnavailableError("cannot use CUDA: no NVIDIA GPU found")

    monkeypatch.setattr("gpubackprop.cli.gb.get_backend", lambda device: no_gpu(device) if device == "cuda" else None)
    assert main(["selftest"]) == 2
    assert "gpubackprop: error: cannot use CUDA: no NVIDIA GPU found" in capsys.readouterr().err
