"""bench/gpu_check.sh, the GPU machine's whole check: its CPU half runs here (CI), so
the script a GPU session depends on cannot rot between GPU sessions."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_the_cpu_half_runs_every_stage_and_writes_its_files(tmp_path):
    out = tmp_path / "check"
    done = subprocess.run(["bash", os.path.join(HERE, "gpu_check.sh"), str(out), "--quick", "--device", "cpu"],
                          env=dict(os.environ, PYTHON=sys.executable, STEP_BENCH_ARGS="--target-s 0.01 --repeats 1",
                                   GPU_CHECK_LIMITS="off"),  # no deadlines in a test
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + "".join((out / f).read_text()[-2000:] for f in os.listdir(out))
    names = set(os.listdir(out))
    assert {"env.log", "selftest.log", "selftest.json", "profile.log", "step_bench.log", "explain.log"} <= names
    assert "pytest-gpu.log" not in names  # nothing of it runs without a GPU
    assert json.loads((out / "selftest.json").read_text())["passed"]
    [steps] = [n for n in names if n.startswith("cpu-steps-")]
    rows = json.loads((out / steps).read_text())["rows"]
    assert [(r["net"], r["batch"]) for r in rows] == [([784, 128, 10], 64), ([784, 128, 10], 256)]
    assert "us of host time per step" in (out / "profile.log").read_text()
    assert "One training step" in (out / "explain.log").read_text()
    for stage in ("selftest", "profile", "step_bench", "explain"):
        assert f"== {stage}: exit 0" in done.stdout


def test_arguments_are_checked():
    done = subprocess.run(["bash", os.path.join(HERE, "gpu_check.sh"), "out", "--device", "tpu"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--device must be cuda or cpu" in done.stderr
