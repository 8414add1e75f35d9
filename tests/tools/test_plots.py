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
