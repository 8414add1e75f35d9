"""Raw rows to features and labels to ids (gpubackprop.tabular), and a model that
carries both: fitted on training rows only, applied the same way on new rows, kept
in the model file."""

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop import modelfile, tabular

RAW = np.array([
    [5.1, "red", "3.5"],
    [4.9, "green", ""],
    [6.3, "red", "2.9"],
    [5.8, None, "NA"],
    [7.1, "blue", "3.0"],
], dtype=object)
NAMES = ["length", "colour", "width"]


def test_numbers_are_scaled_by_the_training_rows_and_text_is_one_hot():
    inputs = tabular.Inputs.fit(RAW, NAMES, scale="standard", impute="mean")
    assert [c["kind"] for c in inputs.columns] == ["number", "category", "number"]
    assert inputs.columns[1]["categories"] == ["blue", "green", "red"] and inputs.columns[1]["fill"] == "red"
    assert inputs.columns[2]["fill"] == pytest.approx((3.5 + 2.9 + 3.0) / 3)
    X = inputs.transform(RAW)
    assert X.shape == (5, 1 + 3 + 1) == (5, inputs.n_features)
    length = np.array([5.1, 4.9, 6.3, 5.8, 7.1])
    np.testing.assert_allclose(X[:, 0], (length - length.mean()) / length.std())
    np.testing.assert_array_equal(X[:, 1:4], [[0, 0, 1], [0, 1, 0], [0, 0, 1], [0, 0, 1], [1, 0, 0]])
    width = np.array([3.5, 3.1333333333333333, 2.9, 3.1333333333333333, 3.0])
    np.testing.assert_allclose(X[:, 4], (width - width.mean()) / width.std())


def test_new_rows_use_the_training_statistics_and_unseen_categories_warn():
    inputs = tabular.Inputs.fit(RAW, NAMES, scale="minmax", impute="median")
    new = np.array([[6.1, "purple", 4.0]], dtype=object)
    with pytest.warns(RuntimeWarning, match=r"not seen in training are encoded as all zeros: column 'colour': "
                                            r"\['purple'\]"):
        X = inputs.transform(new)
    np.testing.assert_allclose(X[0], [(6.1 - 4.9) / (7.1 - 4.9), 0, 0, 0, (4.0 - 2.9) / (3.5 - 2.9)])


def test_missing_values_without_imputation_are_counted_per_column_and_name_the_flag():
    with pytest.raises(ValueError, match=r"missing values \(empty, NA or NaN cells\): 1 in column 'colour', "
                                         r"2 in column 'width'; .*--impute mean\|median"):
        tabular.Inputs.fit(RAW, NAMES)
    inputs = tabular.Inputs.fit(RAW[[0, 2, 4]], NAMES)  # complete rows: fine
    with pytest.raises(ValueError, match="1 in column 'colour', 2 in column 'width'"):
        inputs.transform(RAW)  # at predict time too, and not in training's words


def test_a_number_column_with_a_text_cell_is_a_typo_named_by_its_row():
    rows = np.array([[1.0, "2"], [2.0, "x"], [3.0, "4"]], dtype=object)
    with pytest.raises(ValueError, match=r"column 'b', row 2: 'x' is not a number, and the column's other cells"):
        tabular.Inputs.fit(rows, ["a", "b"])


def test_a_dataframe_is_matched_by_column_name_and_an_array_by_position():
    pd = pytest.importorskip("pandas")
    inputs = tabular.Inputs.fit(RAW, NAMES, impute="mean")
    frame = pd.DataFrame(RAW, columns=NAMES)
    shuffled = frame[["width", "colour", "length"]].assign(extra=1)  # other order, a column more
    np.testing.assert_array_equal(inputs.transform(shuffled), inputs.transform(RAW))
    with pytest.raises(ValueError, match=r"lack the column\(s\) \['width'\]"):
        inputs.transform(frame.drop(columns=["width"]))
    with pytest.raises(ValueError, match="rows have 2 columns; the model was trained on 3"):
        inputs.transform(RAW[:, :2])


def test_too_many_categories_is_an_error_naming_the_cap():
    rows = np.array([[f"v{i}"] for i in range(60)], dtype=object)
    with pytest.raises(ValueError, match="column 'c' holds 60 distinct text values; one-hot encoding is capped at 50"):
        tabular.Inputs.fit(rows, ["c"])
    assert tabular.Inputs.fit(rows, ["c"], max_categories=60).n_features == 60


@pytest.mark.parametrize("y, task", [
    ([151.0, 75.0, 141.0, 206.0] * 20 + list(range(100, 160)), "regression"),  # diabetes: whole floats, many
    ([0.5, 1.25, 2.0, 0.5], "regression"),
    ([1, 2, 3, 1, 2, 3], "classification"),
    ([0, 1000, 2000, 0], "classification"),
    (["a", "b", "a"], "classification"),
])
def test_the_task_is_inferred_from_the_target(y, task):
    assert tabular.infer_task(np.array(y, dtype=object))[0] == task


def test_class_labels_of_any_values_map_to_ids_and_back():
    for y in ([1, 3, 2, 3], [0, 1000, 2000, 1000], ["virginica", "setosa", "setosa", "versicolor"]):
        target = tabular.Target.fit(np.array(y, dtype=object), "classification")
        ids = target.encode(y)
        assert ids.min() == 0 and ids.max() == len(set(y)) - 1
        assert list(target.decode(ids)) == list(y)
    target = tabular.Target.fit(np.array(["1", "2", "2"], dtype=object), "classification")
    assert target.classes == [1, 2] and target.decode([1]).dtype == np.int64  # numbers read from text are numbers
    with pytest.raises(ValueError, match=r"labels the model does not know: \['7'\]; it was trained on the classes"):
        target.encode([7])


def test_a_regression_target_is_standardized_by_its_training_rows():
    y = np.array([10.0, 20.0, 30.0, 1000.0])
    target = tabular.Target.fit(y, "regression", train=[0, 1, 2])
    assert target.mean == 20.0 and target.std == pytest.approx(np.std([10, 20, 30]))
    np.testing.assert_allclose(target.decode(target.encode(y)), y)
    assert target.encode(y).shape == (4, 1)


def test_a_model_with_inputs_and_a_target_trains_and_predicts_on_raw_rows_and_keeps_them_in_its_file(tmp_path):
    rng = np.random.default_rng(0)
    n = 200
    colour = rng.choice(["red", "green"], n)
    x = rng.normal(size=n) * 100 + 500
    label = np.where((x > 500) ^ (colour == "red"), "yes", "no")
    rows = np.column_stack([x, colour]).astype(object)
    model = gb.MLP([3, 16, 2], seed=0)
    model.inputs = tabular.Inputs.fit(rows, ["x", "colour"])
    model.target = tabular.Target.fit(label, "classification")
    model.fit(rows, label, epochs=40, batch_size=16, optimizer=gb.optim.Adam(1e-2), progress=False,
              validation_data=(rows[:20], label[:20]))
    predicted = model.predict(rows)
    assert set(predicted) <= {"yes", "no"} and np.mean(predicted == label) > 0.9
    assert model.evaluate(rows, label)["accuracy"] == pytest.approx(np.mean(predicted == label))
    model.save(tmp_path / "m.safetensors")
    loaded = gb.load(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(loaded.predict(rows), predicted)
    np.testing.assert_array_equal(loaded.predict_proba(rows), model.predict_proba(rows))


def test_a_file_of_the_first_cli_format_predicts_with_its_stored_scaling(tmp_path, rng):
    """The first CLI format kept mean and std in the file's metadata, and gb.load
    ignored them: its predictions on raw rows were wrong."""
    X = rng.normal(size=(50, 3)) * 10 + 100
    mean, std = X.mean(axis=0), X.std(axis=0)
    model = gb.MLP([3, 4, 2], seed=0, dtype="float64")
    path = tmp_path / "old.safetensors"
    modelfile.write(path, model.config(), model.state_dict(), metadata={
        "scale": "standard", "standardize": {"mean": mean.tolist(), "std": std.tolist()}, "min_max": None})
    loaded = gb.load(path)
    np.testing.assert_array_equal(loaded.forward(loaded.inputs.transform(X)), model.forward((X - mean) / std))
    np.testing.assert_array_equal(loaded.predict(X), model.predict((X - mean) / std))
