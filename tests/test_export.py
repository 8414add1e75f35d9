"""ONNX export (gpubackprop.export): the file run in onnxruntime gives what predict and
predict_proba give, for every activation, loss and dtype, with the input transform
and the target encoding folded in."""

import sys

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop import tabular
from gpubackprop.cli import main
from gpubackprop.nn.activations import ACTIVATIONS
from gpubackprop.nn.losses import LOSSES

from .helpers import random_batch

ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime (the test extra)")
pytest.importorskip("onnx", reason="needs onnx (pip install 'gpubackprop[onnx]')")
TOL = {"float32": 1e-5, "float64": 1e-12}


def run(model, X, path=None):
    proto = model.to_onnx(path)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return {o.name: v for o, v in zip(session.get_outputs(), session.run(None, {"X": X}))}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_onnxruntime_gives_what_predict_gives(activation, loss, dtype, rng):
    X = rng.normal(size=(37, 6)).astype(dtype)
    _, y = random_batch(rng, [6, 3], loss, 37)
    model = gb.MLP([6, 9, 7, 3], activation=activation, loss=loss, dtype=dtype, seed=1)
    model.fit(X, y, epochs=3, batch_size=8, optimizer=gb.optim.Adam(1e-2), progress=False)
    out = run(model, X)
    if LOSSES[loss].classifies:
        assert sorted(out) == ["label", "probabilities"] and out["probabilities"].dtype == np.dtype(dtype)
        np.testing.assert_allclose(out["probabilities"], model.predict_proba(X), rtol=0, atol=TOL[dtype])
        np.testing.assert_array_equal(out["label"], model.predict(X))
    else:  # poisson's e^z: relative to its size
        assert sorted(out) == ["variable"]
        np.testing.assert_allclose(out["variable"], model.predict(X), rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)
    assert run(model, X[:1])[sorted(out)[-1]].shape[0] == 1  # the batch dimension is dynamic


def test_the_input_transform_missing_values_and_string_classes_are_folded_in(rng):
    X = rng.normal(size=(80, 4)) * [1, 10, 100, 1000] + 50
    label = np.where(X[:, 0] > 50, "high", "low")
    X[::7, 2] = np.nan  # missing cells, imputed as trained
    model = gb.MLP([4, 8, 2], seed=0)
    model.inputs = tabular.Inputs.fit(X, ["a", "b", "c", "d"], scale="standard", impute="median")
    model.target = tabular.Target.fit(label, "classification")
    model.fit(X, label, epochs=20, batch_size=8, optimizer=gb.optim.Adam(1e-2), progress=False)
    out = run(model, X.astype(np.float32))
    assert list(out["label"]) == list(model.predict(X)) and set(out["label"]) <= {"high", "low"}
    np.testing.assert_allclose(out["probabilities"], model.predict_proba(X), atol=1e-5)


def test_a_regression_targets_scaling_is_folded_in(rng):
    X = rng.normal(size=(60, 3))
    y = X @ [3.0, -2.0, 1.0] * 40 + 150
    model = gb.MLP([3, 8, 1], loss="mse", dtype="float64", seed=0)
    model.inputs = tabular.Inputs.fit(X, scale="minmax")
    model.target = tabular.Target.fit(y, "regression")
    model.fit(X, y, epochs=10, batch_size=8, progress=False)
    out = run(model, X)["variable"]
    assert out.shape == (60, 1)
    np.testing.assert_allclose(out[:, 0], model.predict(X), rtol=1e-12)  # in the target's units


def test_text_columns_are_refused_with_the_reason():
    rows = np.array([[1.0, "red"], [2.0, "blue"]], dtype=object)
    model = gb.MLP([3, 2], seed=0)
    model.inputs = tabular.Inputs.fit(rows, ["x", "colour"])
    with pytest.raises(ValueError, match=r"text columns \['colour'\] cannot be exported to ONNX yet"):
        model.to_onnx()


def test_the_cli_exports_a_trained_model(tmp_path, capsys):
    assert main(["train", "--dataset", "digits", "--hidden", "16", "--epochs", "2", "--device", "cpu",
                 "--no-progress", "--out", str(tmp_path)]) == 0
    assert main(["export", "--model", str(tmp_path / "model.safetensors"), "--onnx", str(tmp_path / "m.onnx")]) == 0
    assert capsys.readouterr().out.endswith(f"wrote {tmp_path / 'm.onnx'}\n")
    model = gb.load(tmp_path / "model.safetensors")
    X = gb.data.load_dataset("digits")[0][:50].astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    label, proba = session.run(None, {"X": X})
    np.testing.assert_array_equal(label, model.predict(X))
    np.testing.assert_allclose(proba, model.predict_proba(X), atol=1e-5)


def test_one_logistic_unit_for_two_classes_exports_its_labels_and_both_columns(rng):
    X = rng.normal(size=(80, 3))
    labels = np.where(X[:, 0] > 0, "yes", "no")
    model = gb.MLP([3, 6, 1], loss="binary_cross_entropy", seed=0, dtype="float64")
    model.target = tabular.Target.fit(labels, "classification")
    model.fit(X, labels, epochs=5, progress=False)
    out = run(model, X)
    np.testing.assert_array_equal(out["label"], model.predict(X))
    np.testing.assert_allclose(out["probabilities"], model.predict_proba(X), atol=1e-12)


def test_without_onnx_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"pip install 'gpubackprop\[onnx\]'"):
        gb.MLP([2, 2]).to_onnx()


def test_the_scikit_learn_estimators_export(rng):
    from gpubackprop.sklearn import MLPClassifier, MLPRegressor

    X = rng.normal(size=(60, 4))
    labels = np.array(["cat", "dog", "eel"])[rng.integers(0, 3, 60)]
    clf = MLPClassifier((8,), max_iter=20, random_state=0).fit(X, labels)
    out = run(clf, X)
    np.testing.assert_array_equal(out["label"], clf.predict(X))
    np.testing.assert_allclose(out["probabilities"], clf.predict_proba(X), atol=1e-12)
    reg = MLPRegressor(hidden_layer_sizes=(8,), max_iter=20, random_state=0).fit(X, X @ [1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(run(reg, X)["variable"][:, 0], reg.predict(X), atol=1e-12)
    counts = MLPRegressor(loss="poisson", hidden_layer_sizes=(8,), max_iter=20, random_state=0).fit(X, rng.poisson(2.0, 60))
    np.testing.assert_allclose(run(counts, X)["variable"][:, 0], counts.predict(X), rtol=1e-12)
    multilabel = MLPClassifier(hidden_layer_sizes=(8,), max_iter=20, random_state=0).fit(X, rng.integers(0, 2, (60, 3)))
    out = run(multilabel, X)
    np.testing.assert_array_equal(out["label"], multilabel.predict(X))
    np.testing.assert_allclose(out["probabilities"], multilabel.predict_proba(X), atol=1e-12)
