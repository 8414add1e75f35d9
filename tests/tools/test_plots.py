"""Figures: training curves and the benchmark bar chart (drawn, and read back as PNG)."""

import json

import pytest

pytest.importorskip("matplotlib")

from gpubackprop import cli
from gpubackprop.tools import plots  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
STEP_ROW = {"case": "small", "net": [784, 128, 10], "batch": 64, "precision": "float32", "ours_samples_per_s": 2e5,
            "torch_eager_samples_per_s": 1e5, "torch_graph_samples_per_s": None, "ceiling_fraction": 0.4,
            "ours_peak_bytes": None, "torch_peak_bytes": None}
CPU_ROW = {"case": "784-128-10", "batch": 64, "ours": {"samples_per_s": 2e5}, "torch": {"samples_per_s": 1e5},
           "sklearn": None, "ours_train_step": {"samples_per_s": 1.9e5}}


def test_training_curves_write_a_png(tmp_path):
    path = tmp_path / "curves.png"
    plots.training_curves({"loss": [1.0, 0.5], "val_loss": [1.1, 0.7], "accuracy": [0.5, 0.8]}, str(path), "t")
    assert path.read_bytes().startswith(PNG)


@pytest.mark.parametrize("row,names", [
    (STEP_ROW, ["gpubackprop", "PyTorch eager"]),  # the empty torch graph column is left out
    (CPU_ROW, ["gpubackprop", "gpubackprop train_step", "PyTorch"]),
])
def test_benchmark_series_reads_both_result_formats(row, names):
    labels, series = plots.benchmark_series({"rows": [row, row]})
    assert len(labels) == 2 and list(series) == names


def test_bench_command_draws_a_result_file(tmp_path, capsys):
    results = tmp_path / "gpu-2026-11-22.json"
    results.write_text(json.dumps({"device": "test", "date": "2026-11-22", "rows": [STEP_ROW]}))
    assert cli.main(["bench", str(results)]) == 0
    assert (tmp_path / "gpu-2026-11-22.png").read_bytes().startswith(PNG)
    assert cli.main(["bench", str(tmp_path / "missing.json")]) == 2
    assert "error" in capsys.readouterr().err


def test_an_empty_result_file_is_refused():
    with pytest.raises(ValueError, match="no rows"):
        plots.benchmark_series({"rows": []})


RESULT_FILES = {  # the shape of each kind of file bench/ writes, as small as it comes
    "fit_bench": {"rows": [{"case": "784-128-10_b64", "batch": 64, "ours": {"samples_per_s": 2e5},
                            "jax": {"samples_per_s": 1.9e5}}]},
    "one_pool": {"samples_per_s": {"shipped": {"a_b64": 1e5, "b_b8": 2e3}, "mkl-parallel": {"a_b64": 9e4}}},
    "allreduce": {"machine": "vm: 2 cores", "measured": [
        {"case": "medium", "net": [784, 10], "batch": 64, "ranks": r, "step_s": 0.01 * r} for r in (1, 2)]},
    "pytest-benchmark": {"benchmarks": [
        {"group": "784-128-10_b64", "name": "test_train_step[ours-784-128-10_b64]", "params": {"impl": "ours"},
         "extra_info": {"batch": 64}, "stats": {"min": 0.001}},
        {"group": "784-128-10_b64", "name": "test_fit_run[torch-784-128-10_b64]", "params": {"impl": "torch"},
         "extra_info": {"rows": 640, "epochs": 2}, "stats": {"min": 0.01}},
        {"group": "sgemm", "name": "test_sgemm_ceiling[numpy]", "params": {"library": "numpy"},
         "extra_info": {"flops": 1e9}, "stats": {"min": 0.01}}]},
    "complexity": {"machine": {"cpu": "x"}, "results": {"cpu": {"methods": {
        "backprop": {"full": [{"n": 2, "P": 12, "seconds": 1e-5}, {"n": 3, "P": 36, "seconds": 2e-5}], "stopped": None},
        "finite_diff": {"full": [{"n": 2, "P": 12, "seconds": 1e-4}], "stopped": "too slow"}}},
        "cuda": {"skipped": "no CuPy"}}},
}


@pytest.mark.parametrize("kind", sorted(RESULT_FILES))
def test_the_bench_command_draws_every_kind_of_result_file(kind, tmp_path, capsys):
    """Before, allreduce, complexity (and pytest-benchmark, one_pool) files failed with 'no rows to plot'."""
    results = tmp_path / f"{kind}.json"
    results.write_text(json.dumps(RESULT_FILES[kind]))
    assert cli.main(["bench", str(results)]) == 0, capsys.readouterr().err
    assert (tmp_path / f"{kind}.png").read_bytes().startswith(PNG)


def test_series_of_pytest_benchmark_allreduce_and_one_pool_files():
    labels, series = plots.benchmark_series(RESULT_FILES["pytest-benchmark"])
    assert labels == ["784-128-10_b64\nstep", "784-128-10_b64\nfit"]  # sgemm (FLOPs, not samples) left out
    assert series == {"ours": [64 / 0.001, None], "torch": [None, 1280 / 0.01]}
    labels, series = plots.benchmark_series(RESULT_FILES["allreduce"])
    assert series == {"1 rank(s)": [6400.0], "2 rank(s)": [3200.0]}
    labels, series = plots.benchmark_series(RESULT_FILES["one_pool"])
    assert labels == ["a_b64", "b_b8"] and series["mkl-parallel"] == [9e4, None]


def test_regression_curves_have_one_panel_named_by_the_loss(tmp_path):
    path = tmp_path / "curves.png"
    assert plots.training_curves({"loss": [1.0, 0.5], "mse": [1.0, 0.5], "val_loss": [1.2, 0.6]}, str(path), "t",
                                 loss="MSE (of the standardized target)") == ["MSE (of the standardized target)"]
    assert path.read_bytes().startswith(PNG)
    assert plots.training_curves({"loss": [1.0], "accuracy": [0.5]}, str(path)) == ["cross-entropy loss", "accuracy"]
