"""allreduce_bench: the measurement on 1 and 2 ranks runs here (CI); the ring model's arithmetic."""

import json

import pytest

from bench import allreduce_bench as ab


def test_ring_model_moves_2_n_minus_1_over_n_of_the_parameters():
    compute = {"medium": 2e-3}
    [nvlink, network] = ab.scaling_model(["medium"], compute, n=4)
    params = 784 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10
    assert nvlink["params"] == params
    assert network["allreduce_s"] == pytest.approx(2 * 3 / 4 * 4 * params / 12.5e9)
    t_ar = nvlink["allreduce_s"]
    assert nvlink["weak_efficiency"] == pytest.approx(2e-3 / (2e-3 + t_ar))
    assert nvlink["strong_efficiency"] == pytest.approx(0.5e-3 / (0.5e-3 + t_ar))
    assert [r["allreduce_s"] for r in ab.scaling_model(["medium"], compute, n=1)] == [0.0, 0.0]


def test_one_and_two_ranks_are_measured_and_written(tmp_path):
    pytest.importorskip("mpi4py")
    result = ab.main(["--ranks", "1", "2", "--cases", "medium", "--repeats", "1", "--out", str(tmp_path)])
    [json_file] = tmp_path.glob("allreduce-*.json")
    assert json.loads(json_file.read_text()) == json.loads(json.dumps(result))
    one, two = result["measured"]
    assert (one["ranks"], two["ranks"]) == (1, 2) and (one["rows_per_rank"], two["rows_per_rank"]) == (4096, 2048)
    assert one["allreduce_bytes"] == 0 and two["allreduce_bytes"] == 4 * one["params"]  # one rank reduces nothing
    assert all(r["compute_s"] > 0 and r["step_s"] > 0 for r in (one, two))
    assert {r["link"] for r in result["model"]} == set(ab.LINKS)


def test_the_model_takes_a_gpu_run_s_measured_step(tmp_path, capsys):
    rows = [{"net": [784, 1024, 1024, 10], "batch": 4096, "precision": p, "ours_samples_per_s": rate}
            for p, rate in (("tf32", 8e6), ("float32", 4e6))]
    rows.append({"net": [4096, 4096, 4096, 4096, 10], "batch": 8192, "precision": "float32", "ours_samples_per_s": None})
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"device": "GPU X", "date": "2026-11-29", "rows": rows}))
    seconds, what = ab.gpu_step_seconds(["medium"], str(path))
    assert seconds == {"medium": 4096 / 4e6} and what.startswith("measured: GPU X, 2026-11-29, float32")
    model = ab.main(["--model-only", "--cases", "medium", "--gpu-results", str(path)])
    assert {r["compute_s"] for r in model} == {4096 / 4e6}
    assert "| medium (1.9 M params, batch 4096) |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no float32 row of ours for large"):
        ab.gpu_step_seconds(["large"], str(path))
    estimated, what = ab.gpu_step_seconds(["medium"])
    assert "estimate" in what and estimated["medium"] > 0
