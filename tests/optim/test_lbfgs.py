"""L-BFGS (gpubackprop.optim.lbfgs) and solver='lbfgs' in the estimators: scipy's
minimum of the loss with scikit-learn's penalty, the biases spared."""

import warnings

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.optim.lbfgs import minimize_lbfgs, weight_mask

sklearn = pytest.importorskip("sklearn")


def test_the_weight_mask_follows_the_flat_layout():
    model = gb.MLP([3, 4, 2])
    mask = weight_mask(model)
    flat = np.arange(model.n_params, dtype=np.float64)
    model.parameters.assign(flat)
    state = model.state_dict()
    assert sorted(flat[mask]) == sorted(np.concatenate([state["layers.0.weight"].ravel(),
                                                        state["layers.1.weight"].ravel()]))


def test_it_reaches_a_minimum_of_the_loss_plus_the_weights_penalty(rng):
    X, y = rng.normal(size=(80, 5)), rng.integers(0, 3, 80)
    model = gb.MLP([5, 8, 3], activation="tanh", dtype="float64", seed=0)  # smooth: a minimum has zero gradient
    alpha = 0.5
    result = minimize_lbfgs(model, X, y, alpha=alpha, max_iter=500, tol=1e-8)
    assert result.success, result.message
    loss, grads = model.loss_and_grad(X, y)
    state = model.state_dict()
    weights = [state[k] for k in state if k.endswith("weight")]
    assert result.fun == pytest.approx(loss + alpha / (2 * 80) * sum(float((w ** 2).sum()) for w in weights))
    for name, g in grads.items():  # at the minimum: dL/dW + (alpha / n) W = 0, and dL/db = 0 (biases spared)
        total = g + (alpha / 80) * state[name] if name.endswith("weight") else g
        np.testing.assert_allclose(total, 0.0, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("load", ["load_wine", "load_breast_cancer"])
def test_the_estimator_with_lbfgs_scores_as_scikit_learns(load):
    from sklearn import datasets
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier as Theirs
    from sklearn.preprocessing import StandardScaler

    from gpubackprop.sklearn import MLPClassifier

    X, y = getattr(datasets, load)(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(StandardScaler().fit_transform(X), y, random_state=0, stratify=y)
    ours = MLPClassifier((32,), solver="lbfgs", max_iter=300, random_state=0).fit(X_tr, y_tr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = Theirs((32,), solver="lbfgs", max_iter=300, random_state=0).fit(X_tr, y_tr)
    assert ours.score(X_te, y_te) >= theirs.score(X_te, y_te) - 0.05
    assert 1 <= ours.n_iter_ <= 300 and ours.loss_ > 0


def test_lbfgs_warns_when_stopped_by_max_iter_and_refuses_partial_fit(rng):
    from sklearn.exceptions import ConvergenceWarning

    from gpubackprop.sklearn import MLPClassifier, MLPRegressor

    X, y = rng.normal(size=(60, 4)), rng.integers(0, 2, 60)
    with pytest.warns(ConvergenceWarning, match="lbfgs did not converge within max_iter=2"):
        clf = MLPClassifier((8,), solver="lbfgs", max_iter=2, random_state=0).fit(X, y)
    assert clf.n_iter_ == 2
    with pytest.raises(ValueError, match="partial_fit is only available for stochastic optimizers"):
        MLPRegressor(hidden_layer_sizes=(8,), solver="lbfgs").partial_fit(X, y.astype(float))
    with pytest.raises(ValueError, match="max_fun must be an integer >= 1"):
        MLPClassifier(solver="lbfgs", max_fun=0).fit(X, y)


@pytest.mark.parametrize("loss", ["cross_entropy", "poisson"])
def test_zero_sample_weights_leave_rows_out_penalty_included(loss, rng):
    """The weighted loss and scikit-learn's alpha / (2 sum w) penalty: weights 0 and 1 train
    as the rows of weight 1 alone (the same evaluations, so the same steps)."""
    X = rng.normal(size=(60, 4))
    y = rng.integers(0, 3, 60) if loss == "cross_entropy" else rng.poisson(2.0, (60, 3)).astype(float)
    w = (rng.random(60) > 0.3).astype(float)
    keep = w > 0
    runs = []
    for args in ((X, y, w), (X[keep], y[keep], None)):
        model = gb.MLP([4, 6, 3], activation="tanh", loss=loss, dtype="float64", seed=0)
        runs.append((minimize_lbfgs(model, *args[:2], alpha=0.3, max_iter=30, sample_weight=args[2]), model.state_dict()))
    (weighted, p_weighted), (dropped, p_dropped) = runs
    assert weighted.nit == dropped.nit and weighted.fun == pytest.approx(dropped.fun, rel=1e-10)
    for k in p_dropped:
        np.testing.assert_allclose(p_weighted[k], p_dropped[k], rtol=1e-7, atol=1e-9, err_msg=k)
