"""gpubackprop.sklearn: scikit-learn's own estimator checks, and the estimators in
scikit-learn's machinery (Pipeline, GridSearchCV, clone, pickle), on digits against
scikit-learn's MLPClassifier."""

import pickle
import re
import warnings

import numpy as np
import pytest
import scipy.sparse

sklearn = pytest.importorskip("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.model_selection import GridSearchCV, KFold, StratifiedKFold, train_test_split  # noqa: E402
from sklearn.neural_network import MLPClassifier as SkMLPClassifier  # noqa: E402
from sklearn.neural_network import MLPRegressor as SkMLPRegressor  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import gpubackprop as gb  # noqa: E402
import gpubackprop.sklearn as gbs  # noqa: E402
from gpubackprop.sklearn import MLPClassifier, MLPRegressor, MLPSearchCV  # noqa: E402


def _settings_to_check(seed=0):
    """The solvers and schedules beyond the defaults, small and short so that the checks
    stay quick (about 10 s on two cores), with rates that train the checks' problems:
    sgd regressors at 0.002 for 200 epochs, since make_regression's targets (in the
    hundreds) in check_regressor_multioutput make faster sgd diverge (scikit-learn's
    own sgd MLPRegressor diverges there at 0.005, and fails check_regressors_train
    at every rate we tried at 50 epochs); early stopping
    holds out 0.2, since at 0.1 the checks' 10-row sets leave one validation row, and
    its classifier learns at 0.05, since check_class_weight_classifiers' 40 noisy rows
    (one full batch a step) at 0.01 plateau for the 20 epochs of patience it allows."""
    small = dict(hidden_layer_sizes=(8,), random_state=seed)
    sgd = dict(solver="sgd", max_iter=50, **small)
    slow_sgd = dict(sgd, max_iter=200)
    return [
        MLPClassifier(solver="lbfgs", max_iter=15, **small), MLPRegressor(solver="lbfgs", max_iter=15, **small),
        MLPClassifier(learning_rate="invscaling", learning_rate_init=0.5, power_t=0.25, **sgd),
        MLPRegressor(learning_rate="invscaling", learning_rate_init=0.002, power_t=0.1, **slow_sgd),
        MLPClassifier(learning_rate="adaptive", learning_rate_init=0.05, **sgd),
        MLPRegressor(learning_rate="adaptive", learning_rate_init=0.002, **slow_sgd),
        *(Est(early_stopping=True, validation_fraction=0.2, learning_rate_init=lr, max_iter=50, **small)
          for Est, lr in ((MLPClassifier, 0.05), (MLPRegressor, 0.01))),
        MLPClassifier(class_weight="balanced", learning_rate_init=0.01, max_iter=100, **small),
        MLPClassifier(n_ensemble=3, bootstrap=True, learning_rate_init=0.01, max_iter=100, **small),
        MLPRegressor(n_ensemble=2, random_state=seed),
    ]


def _expected_failures(estimator):
    """Weights as repeated rows (scikit-learn's equivalence checks) cannot hold where
    the training itself counts rows, not weights, as scikit-learn's own MLP counts
    them: invscaling's rate follows t_, the rows seen, and early stopping holds out
    rows, so a repeated row may land on both sides of the split where its weighted
    twin lands on one (scikit-learn's _fit_stochastic says so in a TODO); and
    class_weight="balanced" weighs classes by their row counts. The solvers and
    schedules that do not count rows pass them: lbfgs, adam, sgd constant and adaptive."""
    if estimator.bootstrap:
        why = "each member trains on a resample of the rows, which repeating rows changes"
    elif estimator.early_stopping or estimator.learning_rate == "invscaling":
        why = "training counts rows (early stopping's split, invscaling's t_), as scikit-learn's MLP does"
    elif getattr(estimator, "class_weight", None) == "balanced":
        why = "'balanced' weighs classes by their counts of rows, which repeating rows changes"
    else:
        return {}
    return {f"check_sample_weight_equivalence_on_{kind}_data": why for kind in ("dense", "sparse")}


@parametrize_with_checks([MLPClassifier(random_state=0), MLPRegressor(random_state=0), *_settings_to_check()],
                         expected_failed_checks=_expected_failures)
def test_scikit_learn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return train_test_split(X / 16.0, y, test_size=0.25, random_state=0, stratify=y)


def test_digits_accuracy_matches_scikit_learn(digits):
    X_train, X_test, y_train, y_test = digits
    settings = dict(hidden_layer_sizes=(64,), max_iter=60, batch_size=32, learning_rate_init=1e-3)
    ours, theirs = [], []
    for seed in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            ours.append(MLPClassifier(random_state=seed, **settings).fit(X_train, y_train).score(X_test, y_test))
            theirs.append(SkMLPClassifier(random_state=seed, **settings).fit(X_train, y_train).score(X_test, y_test))
    assert min(ours) >= 0.95
    assert abs(np.mean(ours) - np.mean(theirs)) <= 0.02  # within the seeds' spread


def test_pipeline_grid_search_clone_and_pickle(digits):
    X_train, X_test, y_train, y_test = digits
    pipe = make_pipeline(StandardScaler(), MLPClassifier(max_iter=20, random_state=0, dtype="float32"))
    search = GridSearchCV(pipe, {"mlpclassifier__hidden_layer_sizes": [(16,), (64,)]}, cv=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        search.fit(X_train, y_train)
    assert search.best_params_["mlpclassifier__hidden_layer_sizes"] in [(16,), (64,)]
    fitted = search.best_estimator_
    again = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(again.predict(X_test), fitted.predict(X_test))
    blank = clone(fitted[-1])
    assert not hasattr(blank, "model_") and blank.get_params() == fitted[-1].get_params()


def test_fitted_attributes_follow_scikit_learn(digits):
    X_train, _, y_train, _ = digits
    clf = MLPClassifier(hidden_layer_sizes=(20, 10), max_iter=5, early_stopping=True, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X_train, y_train)
    assert [c.shape for c in clf.coefs_] == [(64, 20), (20, 10), (10, 10)]
    assert [b.shape for b in clf.intercepts_] == [(20,), (10,), (10,)]
    assert len(clf.loss_curve_) == clf.n_iter_ == len(clf.validation_scores_) == 5
    assert clf.n_features_in_ == 64 and list(clf.classes_) == list(range(10))
    assert clf.best_validation_score_ == max(clf.validation_scores_)


def test_partial_fit_needs_classes_first_and_then_learns(digits):
    X_train, X_test, y_train, y_test = digits
    clf = MLPClassifier(hidden_layer_sizes=(32,), learning_rate_init=3e-3, random_state=0)
    with pytest.raises(ValueError, match="classes must be passed"):
        clf.partial_fit(X_train, y_train)
    for _ in range(20):
        clf.partial_fit(X_train, y_train, classes=np.arange(10))
    # n_iter_ is the last call's epochs and t_ every sample seen, as scikit-learn keeps them
    assert clf.n_iter_ == 1 and clf.t_ == 20 * len(X_train) and clf.score(X_test, y_test) > 0.9


def test_regressor_learns_a_smooth_function(rng):
    X = rng.uniform(-2, 2, (400, 3))
    y = np.sin(X[:, 0]) + 0.5 * X[:, 1] ** 2 - X[:, 2]
    reg = MLPRegressor(hidden_layer_sizes=(64, 64), max_iter=300, random_state=0, tol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        reg.fit(X[:300], y[:300])
    assert reg.predict(X[300:]).shape == (100,) and reg.score(X[300:], y[300:]) > 0.95


@pytest.mark.parametrize("X_dtype, dtype, expected", [
    (np.float32, None, "float32"), (np.float64, None, "float64"), (np.int64, None, "float64"),
    (np.float32, "float64", "float64"), (np.float64, "float32", "float32"),
])
def test_the_compute_dtype_follows_the_input_unless_dtype_says(X_dtype, dtype, expected):
    """As scikit-learn's MLP keeps float32 data float32 (before, the default made every
    input float64)."""
    rng = np.random.default_rng(0)
    X, y = (rng.normal(size=(40, 3)) * 3).astype(X_dtype), rng.integers(0, 2, 40)
    clf = MLPClassifier((4,), max_iter=2, random_state=0, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X, y)
        assert clf.model_.dtype == expected and clf.predict_proba(X).dtype == np.dtype(expected)
        clf.set_params(warm_start=True).fit(X.astype(np.float64), y)  # a warm start keeps the model's dtype
    assert clf.model_.dtype == expected


def _fit_quietly(est, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(X, y)


def test_invscaling_sets_scikit_learns_rate_after_every_epoch():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(50, 3)), rng.integers(0, 2, 50)
    clf = _fit_quietly(MLPClassifier((4,), solver="sgd", learning_rate="invscaling", learning_rate_init=0.1,
                                     power_t=0.25, max_iter=3, n_iter_no_change=100, random_state=0), X, y)
    assert clf.n_iter_ == 3 and clf.t_ == 150
    assert clf.model_.optimizer.lr == pytest.approx(0.1 / (150 + 1) ** 0.25)  # scikit-learn's, after its 3rd epoch
    adam = _fit_quietly(MLPClassifier((4,), learning_rate="invscaling", max_iter=3, random_state=0), X, y)
    assert adam.model_.optimizer.lr == 0.001  # learning_rate is sgd's, as in scikit-learn


def test_adaptive_divides_the_rate_by_5_on_each_plateau_and_stops_below_1e_6(monkeypatch):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(50, 3)), rng.integers(0, 2, 50)
    rates = []

    class Record:
        def on_epoch_end(self, model, epoch, logs):
            rates.append(model.optimizer.lr)

    clf = MLPClassifier((4,), solver="sgd", learning_rate="adaptive", learning_rate_init=0.01, n_iter_no_change=2,
                        tol=np.inf, max_iter=100, random_state=0)  # tol inf: no epoch ever improves enough
    original = gb.MLP.fit
    monkeypatch.setattr(gb.MLP, "fit", lambda self, *a, **k: original(self, *a, **{**k, "callbacks": [
        *k["callbacks"], Record()]}))
    clf.fit(X, y)
    # each second epoch a plateau: lr / 5, until it is at most 1e-6 (0.01 / 5^6 = 6.4e-7); then it stops
    assert rates[1::2] == pytest.approx([0.01 / 5 ** k for k in range(1, 7)] + [0.01 / 5 ** 6])
    assert clf.n_iter_ == 14


def test_a_learning_rate_scikit_learn_does_not_know_is_refused():
    with pytest.raises(ValueError, match="learning_rate must be 'constant', 'invscaling' or 'adaptive'"):
        MLPClassifier(learning_rate="cosine").fit([[0.0], [1.0]], [0, 1])


def test_verbose_prints_scikit_learns_iteration_lines_and_n_iter_no_change_may_be_inf(capsys):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(50, 3)), rng.integers(0, 2, 50)
    clf = _fit_quietly(MLPClassifier((4,), max_iter=3, tol=np.inf, n_iter_no_change=np.inf, verbose=True,
                                     random_state=0), X, y)
    lines = capsys.readouterr().out.splitlines()
    assert clf.n_iter_ == 3  # tol inf: no epoch improves, and an infinite patience never stops
    assert [line.split(",")[0] for line in lines] == ["Iteration 1", "Iteration 2", "Iteration 3"]
    assert lines[-1] == f"Iteration 3, loss = {clf.loss_curve_[-1]:.8f}"


# ---- fitted attributes, warnings and partial_fit's errors against scikit-learn's MLP ---------------------

def _problem(kind, rows=60):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(rows, 4))
    if kind == "regression":
        return X, X[:, :2] @ [1.0, -2.0] + 0.1 * rng.normal(size=rows)
    return X, np.arange(rows) % (2 if kind == "binary" else 3)


def _fit_both(settings, kind, X, y):
    """Ours and scikit-learn's fitted alike on (X, y), with the warnings each gave."""
    Ours, Theirs = (MLPRegressor, SkMLPRegressor) if kind == "regression" else (MLPClassifier, SkMLPClassifier)
    fitted = []
    for Est in (Ours, Theirs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fitted.append((Est(hidden_layer_sizes=(5,), max_iter=5, random_state=0, **settings).fit(X, y),
                           [w.category for w in caught]))
    return fitted


def _public_fitted(est):
    return {name for name in vars(est) if name.endswith("_") and not name.startswith("_")}


SOLVERS = [dict(), dict(solver="sgd"), dict(early_stopping=True), dict(solver="lbfgs")]


@pytest.mark.parametrize("kind", ["multiclass", "regression"])
@pytest.mark.parametrize("settings", SOLVERS, ids=["adam", "sgd", "early_stopping", "lbfgs"])
def test_fitted_attributes_are_scikit_learns(settings, kind):
    X, y = _problem(kind)
    (ours, our_warnings), (theirs, their_warnings) = _fit_both(settings, kind, X, y)
    # the same names (ours adds the engine's model_), so lbfgs has no loss_curve_ or best_loss_ in either
    assert _public_fitted(ours) - {"model_"} == _public_fitted(theirs)
    # max_iter=5 ends every fit here: both warn, stochastic and lbfgs alike
    assert ConvergenceWarning in our_warnings and ConvergenceWarning in their_warnings
    for name in ("n_iter_", "t_", "n_layers_", "n_outputs_", "out_activation_"):
        assert getattr(ours, name) == getattr(theirs, name) and type(getattr(ours, name)) is type(
            getattr(theirs, name)), name  # t_: samples the stochastic solvers saw; 0 for lbfgs, as theirs
    assert isinstance(ours.loss_, float) and ours.loss_ > 0
    if settings.get("solver") == "lbfgs":
        return
    assert ours.loss_ == ours.loss_curve_[-1]  # the last epoch's, as theirs
    if settings.get("early_stopping"):
        assert ours.best_loss_ is None is theirs.best_loss_
        assert isinstance(ours.best_validation_score_, float) and len(ours.validation_scores_) == 5
    else:
        assert ours.best_loss_ == min(ours.loss_curve_) and theirs.best_loss_ == min(theirs.loss_curve_)
        assert ours.validation_scores_ is None is theirs.validation_scores_


@pytest.mark.parametrize("settings", SOLVERS[:3], ids=["adam", "sgd", "early_stopping"])
def test_warm_start_and_partial_fit_keep_the_attributes_as_scikit_learn(settings):
    X, y = _problem("multiclass")
    for est, _ in _fit_both(settings, "multiclass", X, y):
        est.set_params(warm_start=True)
        with pytest.warns(ConvergenceWarning):  # a warm start that max_iter ends warns again
            est.fit(X, y)
        # n_iter_ counts this fit's epochs, t_ and loss_curve_ go on from the first fit's
        assert est.n_iter_ == 5 and len(est.loss_curve_) == 10
        assert est.t_ == 10 * (len(X) - (6 if settings.get("early_stopping") else 0))
        if not settings.get("early_stopping"):
            assert est.best_loss_ == min(est.loss_curve_)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # partial_fit never warns of max_iter
                est.partial_fit(X, y)
            assert est.n_iter_ == 1 and est.t_ == 11 * len(X) and est.loss_ == est.loss_curve_[-1]


def test_a_warm_lbfgs_fit_warns_again_and_counts_its_own_iterations():
    X, y = _problem("regression")
    for est, _ in _fit_both(dict(solver="lbfgs"), "regression", X, y):
        with pytest.warns(ConvergenceWarning):
            est.set_params(warm_start=True).fit(X, y)
        assert est.n_iter_ == 5 and est.t_ == 0 and not hasattr(est, "loss_curve_")


def test_binary_problems_have_two_softmax_outputs_where_scikit_learn_has_one_logistic_unit():
    X, y = _problem("binary")
    (ours, _), (theirs, _) = _fit_both({}, "binary", X, y)
    assert (ours.n_outputs_, ours.out_activation_) == (2, "softmax")  # our design: see the module docstring
    assert (theirs.n_outputs_, theirs.out_activation_) == (1, "logistic")
    assert ours.n_outputs_ == ours.coefs_[-1].shape[1] and ours.predict_proba(X).shape == theirs.predict_proba(X).shape


def test_partial_fit_is_there_only_where_it_can_run():
    X, y = _problem("multiclass")
    for Est in (MLPClassifier, SkMLPClassifier):
        assert not hasattr(Est(solver="lbfgs"), "partial_fit") and hasattr(Est(solver="sgd"), "partial_fit")
    # scikit-learn's MLPRegressor leaves it there by a slip (available_if(lambda est: est._check_solver),
    # never called) and then runs a whole lbfgs fit; ours refuses it as their classifier does
    assert not hasattr(MLPRegressor(solver="lbfgs"), "partial_fit")
    # scikit-learn's is there with early_stopping and raises; ours is not there, so that meta-estimators and
    # scikit-learn's checks (which look before they call) pass it by, and raises the same ValueError
    assert not hasattr(MLPClassifier(early_stopping=True), "partial_fit")
    assert not hasattr(MLPRegressor(early_stopping=True), "partial_fit")
    for error in (AttributeError, ValueError):
        with pytest.raises(error, match="partial_fit is only available for stochastic optimizers. lbfgs is not"):
            MLPClassifier(solver="lbfgs").partial_fit(X, y, classes=[0, 1, 2])


@pytest.mark.parametrize("Est", [MLPClassifier, SkMLPClassifier], ids=["ours", "scikit-learn"])
def test_partial_fit_refuses_what_scikit_learns_refuses(Est):
    X, y = _problem("multiclass")
    with pytest.raises(ValueError, match="classes must be passed on the first call to partial_fit"):
        Est().partial_fit(X, y)
    with pytest.raises(ValueError, match=re.escape("`y` has classes not in `self.classes_`")):
        Est().partial_fit(X, y, classes=[0, 1])  # a label (2) outside the first call's classes
    est = Est(hidden_layer_sizes=(5,)).partial_fit(X, y, classes=[0, 1, 2, 3])
    est.partial_fit(X, y, classes=[3, 2, 1, 0])  # the same classes again, in any order, is fine
    with pytest.raises(ValueError, match="is not the same as on last call to partial_fit"):
        est.partial_fit(X, y, classes=[0, 1, 2])
    with pytest.raises(ValueError, match="partial_fit does not support early_stopping=True"):
        Est(early_stopping=True).partial_fit(X, y, classes=[0, 1, 2])


# ---- sparse X ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["csr", "csc", "coo"])
@pytest.mark.parametrize("settings", [dict(), dict(solver="lbfgs"), dict(early_stopping=True, dtype="float32")],
                         ids=["adam", "lbfgs", "early_stopping-float32"])
@pytest.mark.parametrize("Est", [MLPClassifier, MLPRegressor])
def test_sparse_X_fits_and_predicts_as_its_dense_copy_bit_for_bit(Est, settings, fmt, monkeypatch):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(5000, 4)) * (rng.random((5000, 4)) < 0.3)  # 70% zeros
    y = (X[:, 0] + X[:, 1] > 0).astype(int) if Est is MLPClassifier else X[:, 0] - 2 * X[:, 1]
    fit, rest = slice(0, 200), slice(200, None)
    dense_est, sparse_est = (_fit_quietly(Est(hidden_layer_sizes=(8,), max_iter=5, random_state=0, **settings), data, y[fit])
                             for data in (X[fit], scipy.sparse.coo_matrix(X[fit]).asformat(fmt)))
    for ours, theirs in zip(dense_est.coefs_ + dense_est.intercepts_, sparse_est.coefs_ + sparse_est.intercepts_):
        np.testing.assert_array_equal(ours, theirs)
    # predict densifies 2048 rows at a time here (the engine's own chunk): 3 chunks, the last one short
    monkeypatch.setattr(gbs, "SPARSE_PREDICT_CHUNK_BYTES", 2048 * 4 * np.dtype(dense_est.model_.dtype).itemsize)
    methods = ["predict", "predict_proba", "predict_log_proba"] if Est is MLPClassifier else ["predict"]
    sparse = scipy.sparse.coo_matrix(X[rest]).asformat(fmt)
    for method in methods:
        np.testing.assert_array_equal(getattr(sparse_est, method)(sparse), getattr(dense_est, method)(X[rest]))
    assert sparse_est.score(sparse, y[rest]) == dense_est.score(X[rest], y[rest])


def test_partial_fit_takes_sparse_chunks_as_their_dense_copies():
    X, y = _problem("multiclass", rows=90)
    dense, sparse = MLPClassifier((5,), random_state=0), MLPClassifier((5,), random_state=0)
    for rows in (slice(0, 30), slice(30, 60), slice(60, 90)):
        dense.partial_fit(X[rows], y[rows], classes=[0, 1, 2])
        sparse.partial_fit(scipy.sparse.csr_matrix(X[rows]), y[rows], classes=[0, 1, 2])
    np.testing.assert_array_equal(dense.coefs_[0], sparse.coefs_[0])


def test_a_sparse_X_too_large_to_densify_is_refused_with_the_way_out(monkeypatch):
    X, y = _problem("multiclass", rows=100)  # dense: 100 x 4 float64 = 3200 bytes
    sparse = scipy.sparse.csr_matrix(X)
    monkeypatch.setattr(gbs, "SPARSE_FIT_MAX_BYTES", 1000)
    with pytest.raises(ValueError, match=r"dense copy would take 3\.1 KiB, over the 1000 bytes .*SPARSE_FIT_MAX_BYTES"
                                         r".* Reduce the features .* partial_fit in chunks"):
        MLPClassifier((5,), max_iter=2).fit(sparse, y)
    with pytest.raises(ValueError, match="smaller row chunks to partial_fit"):
        MLPClassifier((5,)).partial_fit(sparse, y, classes=[0, 1, 2])
    clf = MLPClassifier((5,), random_state=0)
    for start in range(0, 100, 25):  # 25 rows: 800 bytes dense, within the bound
        clf.partial_fit(sparse[start:start + 25], y[start:start + 25], classes=[0, 1, 2])
    assert clf.predict(sparse).shape == (100,)  # predict densifies in chunks, whatever the bound on fit


def test_the_default_bound_lets_a_small_sparse_set_through(monkeypatch):
    X, y = _problem("multiclass", rows=20)
    monkeypatch.setattr(gbs, "SPARSE_FIT_MAX_BYTES", None)
    _fit_quietly(MLPClassifier((3,), max_iter=1), scipy.sparse.csr_matrix(X), y)  # tiny: well within it
    monkeypatch.setattr(gbs, "SPARSE_FIT_MAX_BYTES", 0)
    with pytest.raises(ValueError, match="over the 0 bytes"):
        MLPClassifier((3,), max_iter=1).fit(scipy.sparse.csr_matrix(X), y)



@pytest.mark.parametrize("Est", [MLPClassifier, SkMLPClassifier], ids=["ours", "scikit-learn"])
def test_early_stopping_needs_two_validation_rows(Est):
    X, y = _problem("multiclass")
    with pytest.raises(ValueError, match="The validation set is too small"):
        Est(early_stopping=True).fit(X[:10], y[:10])  # 0.1 of 10 rows: one


def test_early_stopping_splits_plainly_where_it_cannot_stratify():
    """0.1 of 20 rows holds out 2, fewer than the 3 classes, which train_test_split
    cannot stratify (scikit-learn's MLP stratifies binary problems only)."""
    X, y = _problem("multiclass", rows=20)
    assert _fit_quietly(MLPClassifier((5,), early_stopping=True, max_iter=2), X, y).n_iter_ == 2


# ---- feature names ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("Est", [MLPClassifier, SkMLPClassifier], ids=["ours", "scikit-learn"])
def test_feature_names_behave_as_scikit_learns(Est):
    """Predictors, not transformers: neither MLP has get_feature_names_out or set_output."""
    pd = pytest.importorskip("pandas")
    X, y = _problem("multiclass")
    frame = pd.DataFrame(X, columns=["a", "b", "c", "d"])
    est = Est(hidden_layer_sizes=(5,), max_iter=2, random_state=0)
    assert not hasattr(est, "get_feature_names_out") and not hasattr(est, "set_output")
    _fit_quietly(est, frame, y)
    assert list(est.feature_names_in_) == ["a", "b", "c", "d"] and est.n_features_in_ == 4
    with pytest.warns(UserWarning, match="X does not have valid feature names, but"):
        est.predict(X)
    with pytest.raises(ValueError, match="The feature names should match those that were passed during fit"):
        est.predict(frame[["b", "a", "c", "d"]])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="X has 3 features, but .* is expecting 4"):
        est.predict(X[:, :3])
    _fit_quietly(est, X, y)  # refit on an array: the names go
    assert not hasattr(est, "feature_names_in_")
    with pytest.warns(UserWarning, match="X has feature names, but .* was fitted without feature names"):
        est.predict(frame)


# ---- sample and class weights, multilabel y, the poisson regressor ---------------------------
@pytest.mark.parametrize("solver", ["lbfgs", "adam"])
@pytest.mark.parametrize("Est", [MLPClassifier, MLPRegressor])
def test_a_zero_sample_weight_drops_the_row(Est, solver):
    """Full batches (batch_size >= the rows), float64: the weighted fit is the fit on the
    rows of weight 1, penalty included (alpha / the weights' sum, as scikit-learn's)."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 4)), rng.integers(0, 3, 60)
    y = y if Est is MLPClassifier else y.astype(float)
    w = (rng.random(60) > 0.3).astype(float)
    keep = w > 0
    settings = dict(hidden_layer_sizes=(6,), solver=solver, alpha=0.1, max_iter=30, batch_size=100, shuffle=False,
                    random_state=0, tol=0.0)
    weighted = _fit_weighted(Est(**settings), X, y, w)
    dropped = _fit_quietly(Est(**settings), X[keep], y[keep])
    for a, b in zip(weighted.coefs_ + weighted.intercepts_, dropped.coefs_ + dropped.intercepts_):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(weighted.loss_, dropped.loss_, rtol=1e-12)


def _fit_weighted(est, X, y, sample_weight):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(X, y, sample_weight=sample_weight)


def test_class_weight_balanced_is_scikit_learns_weighting():
    from_weights = sklearn.utils.class_weight.compute_sample_weight
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(80, 3)), np.where(rng.random(80) < 0.8, "common", "rare")
    settings = dict(hidden_layer_sizes=(5,), max_iter=20, random_state=0)
    balanced = _fit_quietly(MLPClassifier(class_weight="balanced", **settings), X, y)
    weighted = _fit_weighted(MLPClassifier(**settings), X, y, from_weights("balanced", y))
    for a, b in zip(balanced.coefs_, weighted.coefs_):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"The classes, \['common', 'rare'\], are not in class_weight"):
        MLPClassifier(class_weight={"unknown": 2.0}, **settings).fit(X, y)


def test_partial_fit_refuses_balanced_class_weights_as_scikit_learns_sgd():
    with pytest.raises(ValueError, match="class_weight 'balanced' is not supported for partial_fit"):
        MLPClassifier(class_weight="balanced").partial_fit(np.ones((4, 2)), [0, 1, 0, 1], classes=[0, 1])


def test_the_score_and_early_stopping_weigh_rows_as_scikit_learn():
    rng = np.random.default_rng(2)
    X, y = rng.normal(size=(100, 3)), rng.integers(0, 2, 100)
    w = rng.random(100)
    clf = _fit_weighted(MLPClassifier(hidden_layer_sizes=(5,), max_iter=5, random_state=0, early_stopping=True),
                        X, y, w)
    assert clf.score(X, y, sample_weight=w) == pytest.approx(
        sklearn.metrics.accuracy_score(y, clf.predict(X), sample_weight=w))
    assert len(clf.validation_scores_) == clf.n_iter_


def test_multilabel_y_trains_a_sigmoid_per_label_as_scikit_learns():
    X, Y = sklearn.datasets.make_multilabel_classification(n_samples=300, n_features=8, n_classes=4, random_state=0)
    X = StandardScaler().fit_transform(X)
    fitted = {Est: [_fit_quietly(Est(hidden_layer_sizes=(32,), max_iter=300, random_state=seed), X[:200], Y[:200])
                    for seed in range(3)] for Est in (MLPClassifier, SkMLPClassifier)}
    ours, theirs = fitted[MLPClassifier][0], fitted[SkMLPClassifier][0]
    predicted = ours.predict(X[200:])
    assert predicted.shape == theirs.predict(X[200:]).shape and set(np.unique(predicted)) <= {0, 1}
    assert ours.predict_proba(X[200:]).shape == (100, 4) and ours.out_activation_ == theirs.out_activation_
    np.testing.assert_array_equal(ours.classes_, theirs.classes_)
    np.testing.assert_array_equal(predicted, (ours.predict_proba(X[200:]) > 0.5).astype(int))
    # scikit-learn's scale of the loss (summed over the labels), and its subset accuracy over three seeds
    # (measured: 0.36 ours, 0.40 scikit-learn's; each draws its own starting weights)
    assert ours.loss_ == pytest.approx(theirs.loss_, rel=0.3)
    mean_score = {Est: np.mean([m.score(X[200:], Y[200:]) for m in models]) for Est, models in fitted.items()}
    assert mean_score[MLPClassifier] > mean_score[SkMLPClassifier] - 0.1


def test_the_poisson_regressor_predicts_mean_counts():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(400, 3))
    y = rng.poisson(np.exp(0.8 * X[:, 0] - 0.5 * X[:, 1]))
    settings = dict(loss="poisson", hidden_layer_sizes=(16,), max_iter=200, random_state=0, learning_rate_init=0.01)
    ours, theirs = (_fit_quietly(Est(**settings), X[:300], y[:300]) for Est in (MLPRegressor, SkMLPRegressor))
    assert ours.out_activation_ == theirs.out_activation_ == "exp"
    # scikit-learn's loss, the constant sum_c [y log y - y] included: within the two fits' own differences
    assert ours.loss_ == pytest.approx(theirs.loss_, rel=0.2)
    assert (ours.predict(X[300:]) > 0).all()
    deviance = sklearn.metrics.mean_poisson_deviance
    assert deviance(y[300:], ours.predict(X[300:])) < 1.2 * deviance(y[300:], theirs.predict(X[300:]))
    with pytest.raises(ValueError, match="poisson needs targets y of counts >= 0"):
        MLPRegressor(loss="poisson", max_iter=2).fit(X[:5], -np.ones(5))


def test_the_regressors_first_parameter_is_its_loss_as_scikit_learns():
    with pytest.raises(ValueError, match="loss is MLPRegressor's first parameter, as in scikit-learn 1.9"):
        MLPRegressor((8,)).fit(np.ones((4, 2)), np.ones(4))


def test_alpha_spares_the_biases_as_scikit_learns():
    clf = _fit_quietly(MLPClassifier(hidden_layer_sizes=(4,), max_iter=2, alpha=0.1, random_state=0),
                       np.random.default_rng(4).normal(size=(30, 3)), np.arange(30) % 2)
    assert clf.model_.optimizer.hyperparams["decay_biases"] is False


# ---- MLPSearchCV ------------------------------------------------------------------------------------------

def _search_problem(kind):
    if kind == "classifier":
        X, y = load_digits(return_X_y=True)
        return MLPClassifier((8,), random_state=0), X[:240] / 16.0, y[:240], StratifiedKFold(3)
    X, y = _problem("regression", rows=150)
    return MLPRegressor(hidden_layer_sizes=(8,), random_state=0), X, y, KFold(3, shuffle=True, random_state=1)


def _quiet(run):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return run()


@pytest.mark.parametrize("early_stopping", [False, True], ids=["training loss", "early stopping"])
@pytest.mark.parametrize("kind", ["classifier", "regressor"])
def test_search_scores_and_chooses_as_grid_search_cv_on_the_same_folds(kind, early_stopping):
    """Every (configuration, fold) fit is the estimator's own, so the scores are
    GridSearchCV's bit for bit (same rows, shuffle, optimizer, stop rule): sgd and adam,
    rates, penalties, seeds and patience in one pack, the no-improvement rule stopping
    the members at different epochs (checked on the lone fits)."""
    est, X, y, cv = _search_problem(kind)
    est.set_params(max_iter=25, tol=1e-2, early_stopping=early_stopping, validation_fraction=0.2)
    grid = {"solver": ["adam", "sgd"], "learning_rate_init": [3e-3, 3e-2], "alpha": [1e-4, 1e-1],
            "n_iter_no_change": [2, 5], "random_state": [0, 1]}
    ours = _quiet(lambda: MLPSearchCV(est, grid, cv=cv).fit(X, y))
    theirs = _quiet(lambda: GridSearchCV(est, grid, cv=cv).fit(X, y))
    assert ours.cv_results_.keys() == theirs.cv_results_.keys()
    for key, value in theirs.cv_results_.items():
        if not key.endswith("_time"):
            np.testing.assert_array_equal(ours.cv_results_[key], value, err_msg=key)
    assert ours.best_params_ == theirs.best_params_ and ours.best_index_ == theirs.best_index_
    assert ours.best_score_ == theirs.best_score_ and ours.n_splits_ == 3
    np.testing.assert_array_equal(ours.predict(X), theirs.predict(X))
    assert ours.score(X, y) == theirs.score(X, y)
    epochs = {_quiet(lambda: clone(est).set_params(**c).fit(X[train], y[train])).n_iter_
              for c in ours.cv_results_["params"][::3] for train, _ in cv.split(X, y)}
    assert len(epochs) > 2 and min(epochs) < 25


def test_search_runs_lbfgs_one_by_one_and_scores_failures_as_grid_search_cv():
    """lbfgs fits cannot be members: one warning says so and they run alone; a fit
    that fails (alpha < 0) scores error_score, with GridSearchCV's warning."""
    est, X, y, cv = _search_problem("classifier")
    grid = {"solver": ["adam", "lbfgs"], "alpha": [1e-4, -1.0], "max_iter": [5]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = MLPSearchCV(est, grid, cv=cv).fit(X, y)
    said = [str(w.message) for w in caught]
    assert sum("6 of 12 fits (solver='lbfgs', full batch) cannot be pack members" in s for s in said) == 1
    assert any("6 fits failed out of a total of 12" in s for s in said)
    theirs = _quiet(lambda: GridSearchCV(est, grid, cv=cv).fit(X, y))
    np.testing.assert_array_equal(ours.cv_results_["mean_test_score"], theirs.cv_results_["mean_test_score"])
    assert np.isnan(ours.cv_results_["mean_test_score"][2:]).all()  # alpha -1, the second of the sorted grid
    with pytest.raises(ValueError, match="alpha and tol must be >= 0"):
        MLPSearchCV(est, {"alpha": [-1.0]}, cv=cv, error_score="raise").fit(X, y)


def test_search_refuses_what_it_cannot_search():
    est, X, y, cv = _search_problem("classifier")
    with pytest.raises(ValueError, match=r"param_grid sets \['learning_rate_int'\], which is not parameter\(s\) of "
                                         r"MLPClassifier; its parameters are \[.*'learning_rate_init'"):
        MLPSearchCV(est, {"learning_rate_int": [0.1]}).fit(X, y)
    with pytest.raises(TypeError, match="use scikit-learn's GridSearchCV for other estimators"):
        MLPSearchCV(SkMLPClassifier(), {"alpha": [0.1]}).fit(X, y)
    with pytest.raises(NotImplementedError, match="scores one metric"):
        MLPSearchCV(est, {"alpha": [0.1]}, scoring=["accuracy", "f1_macro"]).fit(X, y)
    with pytest.raises(TypeError):  # scikit-learn's own check of the grid
        MLPSearchCV(est, {"alpha": 0.1}).fit(X, y)


# ---- deep ensembles ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bootstrap", [False, True], ids=["all rows", "bootstrap"])
@pytest.mark.parametrize("kind", ["classifier", "regressor"])
def test_each_ensemble_member_is_its_lone_fit_and_predictions_are_their_mean(kind, bootstrap):
    """Member k is the estimator with n_ensemble=1 and the k-th random_state drawn from
    random_state (then, with bootstrap, its n rows drawn with replacement), fitted
    alone on its rows: bit for bit, early stopping ending each at its own epoch."""
    est, X, y, _ = _search_problem(kind)
    est.set_params(n_ensemble=3, bootstrap=bootstrap, max_iter=30, early_stopping=True, n_iter_no_change=3,
                   learning_rate_init=0.01, random_state=4)
    ens = _quiet(lambda: clone(est).fit(X, y))
    draws = np.random.RandomState(4)
    for member in ens.estimators_:
        seed = draws.randint(2**31)
        rows = draws.randint(len(X), size=len(X)) if bootstrap else np.arange(len(X))
        lone = _quiet(lambda: clone(est).set_params(n_ensemble=1, bootstrap=False, random_state=seed)
                      .fit(X[rows], y[rows]))
        assert member.loss_curve_ == lone.loss_curve_ and member.n_iter_ == lone.n_iter_
        for ours, theirs in zip(member.coefs_ + member.intercepts_, lone.coefs_ + lone.intercepts_):
            np.testing.assert_array_equal(ours, theirs)
    outputs = np.stack([m.predict_proba(X) if kind == "classifier" else m.predict(X) for m in ens.estimators_])
    if kind == "classifier":
        np.testing.assert_allclose(ens.predict_proba(X), outputs.mean(axis=0), rtol=1e-12)
        np.testing.assert_array_equal(ens.predict(X), ens.classes_[outputs.mean(axis=0).argmax(axis=1)])
    else:
        np.testing.assert_allclose(ens.predict(X), outputs.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(ens.predict_std(X), outputs.std(axis=0), rtol=1e-12)
    assert ens.n_iter_ == max(m.n_iter_ for m in ens.estimators_)


def test_an_ensemble_member_whose_resample_missed_a_class_gives_it_probability_0():
    X, y = _problem("multiclass", rows=30)
    y = np.where(np.arange(30) == 0, 3, y)  # class 3 on one row: most resamples miss it
    ens = _quiet(lambda: MLPClassifier((4,), n_ensemble=4, bootstrap=True, max_iter=3, random_state=0).fit(X, y))
    missed = [m for m in ens.estimators_ if 3 not in m.classes_]
    assert missed and list(ens.classes_) == [0, 1, 2, 3]
    proba = ens.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    have = [m.predict_proba(X)[:, -1] for m in ens.estimators_ if 3 in m.classes_]
    np.testing.assert_allclose(proba[:, 3], np.sum(have, axis=0) / 4 if have else 0.0)


def test_a_single_model_has_no_spread_and_an_ensemble_refuses_what_it_cannot_do():
    X, y = _problem("regression")
    one = _quiet(lambda: MLPRegressor(hidden_layer_sizes=(4,), max_iter=5).fit(X, y))
    np.testing.assert_array_equal(one.predict_std(X), np.zeros(len(X)))
    assert not hasattr(one, "estimators_")
    ens = MLPRegressor(hidden_layer_sizes=(4,), max_iter=5, n_ensemble=2)
    assert not hasattr(ens, "partial_fit")
    with pytest.raises(ValueError, match="an ensemble .* is fitted from scratch: set warm_start=False"):
        clone(ens).set_params(warm_start=True).fit(X, y)
    with pytest.raises(ValueError, match="n_ensemble must be an integer >= 1"):
        clone(ens).set_params(n_ensemble=0).fit(X, y)
    with pytest.raises(NotImplementedError, match="export each of estimators_"):
        _quiet(lambda: ens.fit(X, y)).to_onnx()
    refit = _quiet(lambda: ens.set_params(n_ensemble=1).fit(X, y))  # a single model again: no members left over
    assert not hasattr(refit, "estimators_")


def test_the_search_fits_ensembles_one_by_one_and_says_so():
    est, X, y, cv = _search_problem("classifier")
    with pytest.warns(UserWarning, match="3 of 6 fits \\(ensembles, each a pack of its own\\)"):
        search = _quiet(lambda: MLPSearchCV(est.set_params(max_iter=3), {"n_ensemble": [1, 2]}, cv=cv).fit(X, y))
    theirs = _quiet(lambda: GridSearchCV(est, {"n_ensemble": [1, 2]}, cv=cv).fit(X, y))
    np.testing.assert_array_equal(search.cv_results_["split0_test_score"], theirs.cv_results_["split0_test_score"])


def test_fits_of_other_layer_sizes_go_in_packs_of_their_own_in_one_warning():
    est, X, y, cv = _search_problem("regressor")
    grid = {"hidden_layer_sizes": [(4,), (6, 3)], "learning_rate_init": [1e-3, 1e-2], "max_iter": [4]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = MLPSearchCV(est, grid, cv=cv).fit(X, y)
    said = [str(w.message) for w in caught if "MLPSearchCV" in str(w.message)]
    assert said == ["MLPSearchCV: 12 of 12 fits run in 2 packs, one per kind of model (layer sizes, activation, "
                    "loss, dtype, shuffle, weighting, classes)"]
    theirs = _quiet(lambda: GridSearchCV(est, grid, cv=cv).fit(X, y))
    np.testing.assert_array_equal(ours.cv_results_["split2_test_score"], theirs.cv_results_["split2_test_score"])
    assert ours.best_params_ == theirs.best_params_


def test_search_weighs_fits_and_scores_and_keeps_train_scores_as_grid_search_cv():
    """sample_weight split with the folds for fit and for a scorer that takes weights,
    class_weight varying inside the grid, train scores, a DataFrame's feature names."""
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(90, 4)), columns=list("abcd"))
    y, w = np.arange(90) % 3, rng.random(90)
    est, grid = MLPClassifier((5,), max_iter=5, random_state=0), {"class_weight": [None, "balanced"]}
    kwargs = dict(cv=3, scoring="neg_log_loss", return_train_score=True)
    ours = _quiet(lambda: MLPSearchCV(est, grid, **kwargs).fit(X, y, sample_weight=w))
    theirs = _quiet(lambda: GridSearchCV(est, grid, **kwargs).fit(X, y, sample_weight=w))
    assert ours.cv_results_.keys() == theirs.cv_results_.keys()
    for key in (k for k in theirs.cv_results_ if k.startswith(("split", "mean_t", "std_t"))):
        np.testing.assert_array_equal(ours.cv_results_[key], theirs.cv_results_[key], err_msg=key)
    assert list(ours.feature_names_in_) == list("abcd")
