"""Class weights as scikit-learn computes them."""

import numpy as np
import pytest

from gpubackprop.nn.inputs import class_weights

sklearn_weights = pytest.importorskip("sklearn.utils.class_weight")


@pytest.mark.parametrize("labels", [np.array([0, 0, 0, 1, 2, 2]), np.array(["b", "a", "a", "c", "a", "b", "b"])])
def test_balanced_is_scikit_learns_formula(labels):
    np.testing.assert_allclose(class_weights(labels, "balanced"),
                               sklearn_weights.compute_sample_weight("balanced", labels), rtol=1e-15)


def test_a_dict_weighs_its_labels_and_leaves_the_rest_at_one():
    labels = np.array(["cat", "dog", "cat", "eel"])
    np.testing.assert_array_equal(class_weights(labels, {"cat": 2.0, "eel": 0.5}), [2.0, 1.0, 2.0, 0.5])
    np.testing.assert_array_equal(class_weights(labels, {"cat": 2.0, "eel": 0.5}),
                                  sklearn_weights.compute_sample_weight({"cat": 2.0, "eel": 0.5}, labels))


def test_probability_rows_are_weighed_by_their_argmax():
    rows = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    np.testing.assert_allclose(class_weights(rows, "balanced"), [0.75, 1.5, 0.75])


def test_a_dict_for_probability_rows_names_their_columns():
    rows = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0]])  # column 1 is never the argmax, yet a class
    np.testing.assert_array_equal(class_weights(rows, {1: 2.0, 0: 3.0}), [3.0, 3.0])
    with pytest.raises(ValueError, match=r"class_weight names label\(s\) \[5\] that y does not hold; its labels "
                                         r"are \[0, 1, 2\]"):
        class_weights(rows, {5: 1.0})
