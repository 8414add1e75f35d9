"""The gpubackprop command line (gpubackprop.cli)."""

import gzip
import importlib.util
import json
import re
import struct
import sys

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop import data, io
from gpubackprop.cli import main

HAS_CUPY = importlib.util.find_spec("cupy") is not None
ACCURACY = re.compile(r"^held-out accuracy: (\d\.\d{4}) \((\d+) samples\)$", re.M)


def reported(out):
    match = ACCURACY.search(out)
    assert match, f"no held-out accuracy line in:\n{out}"
    return float(match.group(1)), int(match.group(2))


def train(tmp_path, *extra, name="run"):
    out = tmp_path / name
    return main(["train", "--out", str(out), "--no-progress", *extra]), out


def test_train_digits_writes_a_reloadable_run(tmp_path, capsys):
    rc, out = train(tmp_path, "--dataset", "digits", "--hidden", "32", "--epochs", "3", "--device", "cpu")
    stdout = capsys.readouterr().out
    assert rc == 0
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "curves.png", "history.json"}
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "device: cpu" in stdout
    accuracy, n_test = reported(stdout)
    assert n_test == 360

    # The reloaded model gives the reported accuracy on the same held-out split.
    model = gb.load(out / "model.safetensors")
    assert model.sizes == [64, 32, 10]
    X, y = data.load_dataset("digits")
    _, X_te, _, y_te = data.train_test_split(X, y, 0.2, seed=0)
    assert f"{np.mean(model.predict(X_te) == y_te):.4f}" == f"{accuracy:.4f}"

    meta = io.load_metadata(out / "model.safetensors")
    assert meta["standardize"] is None and meta["held_out_accuracy"] == pytest.approx(accuracy, abs=5e-5)
    opt = io.load_optimizer(out / "model.safetensors")
    assert type(opt) is gb.optim.Adam and opt.steps == 3 * 45  # 1437 rows in batches of 32

    history = json.loads((out / "history.json").read_text())
    assert set(history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(v) == 3 for v in history.values())
    assert history["val_accuracy"][-1] == pytest.approx(accuracy, abs=5e-5)


def test_demo_setting_reaches_97_percent(tmp_path, capsys):
    rc, _ = train(tmp_path, "--dataset", "digits", "--hidden", "128", "64", "--epochs", "30", "--device", "auto")
    stdout = capsys.readouterr().out
    assert rc == 0
    accuracy, n_test = reported(stdout)
    assert accuracy >= 0.97 and n_test == 360
    if not HAS_CUPY:
        assert "device='auto' chose cpu" in stdout and "CuPy" in stdout  # says why


def test_train_csv_is_standardized(tmp_path, capsys):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 150)
    X = rng.normal(size=(150, 4)) * [1, 10, 100, 0] + y[:, None] * [4, 40, 0, 0] + 50
    path = tmp_path / "blobs.csv"
    np.savetxt(path, np.column_stack([X, y]), delimiter=",", header="a,b,c,d,label", comments="")
    rc, out = train(tmp_path, "--dataset", str(path), "--hidden", "16", "--epochs", "20", "--device", "cpu",
                    "--optimizer", "sgd", "--momentum", "--lr", "0.05", "--test-fraction", "0.3")
    assert rc == 0
    accuracy, n_test = reported(capsys.readouterr().out)
    assert n_test == 45 and accuracy > 0.8
    meta = io.load_metadata(out / "model.safetensors")
    assert len(meta["standardize"]["mean"]) == 4
    assert meta["standardize"]["std"][3] == 1.0  # the constant feature
    opt = io.load_optimizer(out / "model.safetensors")
    assert type(opt) is gb.optim.SGD and opt.hyperparams["momentum"] == 0.9


def test_train_idx_with_labels(tmp_path, capsys):
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(2, dtype=np.uint8), 40)
    images = rng.integers(0, 60, size=(80, 5, 5)).astype(np.uint8)
    images[labels == 1, :2] += 190  # class 1 is bright on top
    for name, arr in (("imgs-idx3-ubyte.gz", images), ("labs-idx1-ubyte.gz", labels)):
        header = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
        (tmp_path / name).write_bytes(gzip.compress(header + arr.tobytes()))
    rc, out = train(tmp_path, "--dataset", str(tmp_path / "imgs-idx3-ubyte.gz"),
                    "--labels", str(tmp_path / "labs-idx1-ubyte.gz"), "--hidden", "8", "--epochs", "10",
                    "--device", "cpu", "--dtype", "float64", "--batch-size", "8", "--lr", "0.01")
    assert rc == 0
    accuracy, n_test = reported(capsys.readouterr().out)
    assert n_test == 16 and accuracy > 0.9
    assert io.load_metadata(out / "model.safetensors")["standardize"] is None  # pixels already in [0, 1]
    assert gb.load(out / "model.safetensors").dtype == "float64"


def test_without_matplotlib_the_png_is_skipped(tmp_path, capsys, monkeypatch):
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)
    rc, out = train(tmp_path, "--hidden", "8", "--epochs", "1", "--device", "cpu")
    stdout = capsys.readouterr().out
    assert rc == 0
    assert "pip install 'gpubackprop[plot]'" in stdout
    assert not (out / "curves.png").exists() and (out / "model.safetensors").exists()


def test_info(capsys):
    assert main(["info"]) == 0
    stdout = capsys.readouterr().out
    assert "gpubackprop " + gb.__version__ in stdout
    assert re.search(r"NumPy \S+, BLAS: \S+", stdout)
    assert "Python " in stdout and "torch: " in stdout and "threads: " in stdout
    if not HAS_CUPY:
        assert re.search(r"CUDA: not available: .*CuPy", stdout)


def test_info_on_an_old_numpy(capsys, monkeypatch):
    def old_show_config():  # NumPy < 1.25: no mode= argument
        pass

    monkeypatch.setattr(np, "show_config", old_show_config)
    assert main(["info"]) == 0
    assert "BLAS: unknown" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--dataset", "no/such/file.npz"], "no such file"),
    (["--dataset", "mnist"], "not a built-in name"),
    (["--hidden", "0"], "every layer size must be >= 1"),
    (["--epochs", "-1"], "epochs must be >= 0"),
    (["--lr", "-1"], "lr must be in"),
    (["--momentum", "0.5"], "--momentum is for --optimizer sgd"),
    (["--test-fraction", "1.5"], "test_fraction"),
    (["--device", "tpu"], "unknown device 'tpu'"),
])
def test_bad_input_exits_2_with_a_message(tmp_path, capsys, args, message):
    rc, _ = train(tmp_path, "--epochs", "1", "--device", "cpu", *args)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("gpubackprop: error: ") and message in err
    assert "Traceback" not in err


def test_bad_csv_cell_exits_2_naming_the_row(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text("1,2,0\n3,x,1\n")
    rc, _ = train(tmp_path, "--dataset", str(path), "--device", "cpu")
    assert rc == 2
    assert "row 2, column 2: 'x' is not a number" in capsys.readouterr().err


@pytest.mark.skipif(HAS_CUPY, reason="CuPy is installed here")
def test_cuda_without_cupy_exits_2_and_says_why(tmp_path, capsys):
    rc, out = train(tmp_path, "--device", "cuda")
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("gpubackprop: error: ") and "CuPy" in err and "Traceback" not in err
    assert not out.exists()  # failed before any work


def test_usage_errors_and_help_return_codes(capsys):
    assert main([]) == 2
    assert main(["train", "--epochs", "many"]) == 2
    assert main(["--help"]) == 0
    assert main(["--version"]) == 0
    assert "gpubackprop " + gb.__version__ in capsys.readouterr().out
