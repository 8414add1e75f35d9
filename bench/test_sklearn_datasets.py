"""sklearn_datasets runs end to end and scores both libraries: results and the
shape of its table and JSON only, never a timing."""

import json

import pytest

pytest.importorskip("sklearn")

from bench import sklearn_datasets  # noqa: E402

ROW_KEYS = {"dataset", "solver", "kind", "metric", "n_train", "n_test", "n_features", "sklearn", "ours", "speedup"}
IMPL_KEYS = {"score", "fit_s", "n_iter", "timing"}


def test_a_tiny_run_prints_the_table_and_writes_the_json(tmp_path, capsys):
    path = sklearn_datasets.main(["--datasets", "wine", "diabetes", "--solvers", "adam", "lbfgs",
                                  "--repeats", "1", "--max-iter", "5", "--out", str(tmp_path)])
    result = json.loads(open(path).read())
    assert set(result) >= {"date", "machine", "versions", "settings", "repeats", "rows", "caption", "table"}
    assert path.endswith(f"sklearn-datasets-{result['date']}.json")
    assert result["settings"]["max_iter"] == 5 and result["repeats"] == 1
    assert [(r["dataset"], r["solver"]) for r in result["rows"]] == [
        ("wine", "adam"), ("wine", "lbfgs"), ("diabetes", "adam"), ("diabetes", "lbfgs")]
    for r in result["rows"]:
        assert set(r) == ROW_KEYS and set(r["sklearn"]) == IMPL_KEYS == set(r["ours"])
        assert r["metric"] == ("R^2" if r["dataset"] == "diabetes" else "accuracy")
        assert all(1 <= r[impl]["n_iter"] <= 5 for impl in ("sklearn", "ours"))

    lines = result["table"].split("\n")
    assert lines[:2] == list(sklearn_datasets.HEADER)
    assert [line.split(" | ")[:2] for line in lines[2:]] == [
        ["| wine (accuracy)", "adam"], ["| wine (accuracy)", "lbfgs"],
        ["| diabetes (R^2)", "adam"], ["| diabetes (R^2)", "lbfgs"]]
    assert all(line.count("|") == 8 for line in lines)
    out = capsys.readouterr().out
    assert result["caption"] in out and result["table"] in out and path in out


def test_wine_is_fitted_and_scored_by_both_with_lbfgs():
    row = sklearn_datasets.measure("wine", "lbfgs", repeats=1)
    assert all(row[impl]["score"] > 0.85 and row[impl]["n_iter"] >= 1 for impl in ("sklearn", "ours"))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_both_libraries_get_the_same_settings_in_float64():
    X_tr, _, y_tr, _ = sklearn_datasets.split("diabetes")
    make = sklearn_datasets.estimators("regressor")
    fitted = {impl: make[impl](**sklearn_datasets.settings("adam", max_iter=2)).fit(X_tr, y_tr) for impl in make}
    assert all(est.coefs_[0].dtype == "float64" and est.coefs_[0].shape == (10, 100) for est in fitted.values())
    theirs, ours = (fitted[impl].get_params() for impl in ("sklearn", "ours"))
    assert ours["device"] == "cpu" and theirs.pop("loss") == "squared_error"  # ours: squared error, no choice
    assert {k: ours[k] for k in theirs} == theirs  # adam's defaults included
