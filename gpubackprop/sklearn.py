"""scikit-learn estimators on the gpubackprop engine: MLPClassifier and MLPRegressor.

They take scikit-learn's MLP parameters where the meaning is the same, plus
``device`` ("cpu", "cuda", "auto") and ``dtype``, and follow scikit-learn's
conventions (parameters untouched by fit, fitted attributes ending in "_",
``validate_data``), so they pass ``parametrize_with_checks`` and work in
Pipeline, GridSearchCV and clone, and pickle (a fitted model is stored as its
parameters, so it unpickles on any machine).

Fitted attributes are scikit-learn's: ``coefs_[i]`` (n_in, n_out) and
``intercepts_[i]`` (n_out,) in its layout (copies of the parameters ``model_``
holds: writing to them does not change the model), ``n_layers_``,
``n_outputs_``, ``out_activation_``, ``n_iter_`` (the epochs, or lbfgs
iterations, of the last fit or partial_fit call), ``t_`` (the samples the
stochastic solvers have seen since the model was made; lbfgs leaves it),
``loss_`` (the last epoch's, or lbfgs's final loss); and for sgd / adam only, as
scikit-learn, ``loss_curve_``, ``best_loss_`` (the least epoch loss; None with
early_stopping), ``validation_scores_`` and ``best_validation_score_``.

X may be a scipy.sparse matrix, as scikit-learn's MLP takes it. The engine
trains on dense arrays, so fit densifies X whole, refusing (with the way out) an
X whose dense copy would pass SPARSE_FIT_MAX_BYTES; partial_fit densifies only
the chunk it is given, and predict one block of rows at a time.

Weights, losses and the penalty are scikit-learn's: ``sample_weight`` in fit,
partial_fit and score (the loss a weighted mean: a weight of 0 leaves a row out);
a 2-D multilabel indicator y trains a sigmoid per label (binary cross entropy);
MLPRegressor's ``loss`` is "squared_error" or "poisson"; alpha is an L2 penalty on
the weights alone, alpha / (2 B) ||W||^2 for a batch of weight B. The engine's
losses average over the outputs where scikit-learn's sum (``_loss_scale``): the
estimators scale the penalty, sgd's rate and the reported loss to match, so that
loss_, loss_curve_ and tol mean what they mean in scikit-learn (for a regressor
of C > 1 outputs, C / 2 times the mean squared error, as scikit-learn's gradient
has it, where its reported loss_ is half the mean).

Where the engine differs from scikit-learn's MLP, on purpose:

    class_weight  MLPClassifier takes one ("balanced" or a dict), as scikit-learn's
              LogisticRegression does; scikit-learn's MLP has none
    dtype     None: float32 data trains in float32, other data in float64, as
              scikit-learn's MLP; "float32" / "float64" fix it
    binary    two softmax outputs rather than one logistic unit (predict and
              predict_proba as scikit-learn's, (n, 2) probabilities), so
              n_outputs_ is 2, out_activation_ "softmax" and coefs_[-1] has two
              columns where scikit-learn has 1, "logistic" and one
    alpha     the penalty's B is a mini-batch's row count times the mean weight
              of the first fit's training rows (the optimizer is made once),
              where scikit-learn takes each batch's own weights
    loss_curve_  the mean loss of each epoch's batches, without the penalty term
              (poisson's with its constant, so that it is scikit-learn's)
    partial_fit  absent (hasattr is False) with solver="lbfgs", as scikit-learn's
              MLPClassifier, and with early_stopping=True, where scikit-learn's
              is there and raises; est.partial_fit(...) raises scikit-learn's
              ValueError either way (an AttributeError too)

    import gpubackprop.sklearn as gbs
    clf = gbs.MLPClassifier(hidden_layer_sizes=(128,), max_iter=50, device="auto").fit(X, y)
    clf.score(X_test, y_test)

Beyond scikit-learn's MLP, built on gpubackprop.nn.pack.MLPPack:

    n_ensemble, bootstrap  n_ensemble=K > 1 fits a deep ensemble: K members (the
              estimator with n_ensemble=1 and its own random_state, drawn from
              random_state; with bootstrap=True each on its own resample of the
              rows, drawn from the same generator) trained as one MLPPack, each
              equal to its lone fit; ``estimators_`` holds them, predict_proba and
              the regressor's predict are their mean, MLPRegressor.predict_std their
              spread (ddof 0). The default, 1, is the single model.
    MLPSearchCV  GridSearchCV whose fits run as MLPPack members, each the
              estimator's own fit on its fold's rows (see its docstring)
"""

import collections
import functools
import inspect
import math
import os
import time
import types
import warnings

import numpy as np
import scipy.sparse as sp

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
except ImportError:
    raise ImportError("gpubackprop.sklearn needs scikit-learn >= 1.6: pip install 'gpubackprop[sklearn]'") from None
from sklearn.base import clone, is_classifier
from sklearn.exceptions import ConvergenceWarning, FitFailedWarning
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import GridSearchCV, ParameterGrid, check_cv, train_test_split
from sklearn.utils import check_random_state, indexable
from scipy.special import xlogy
from sklearn.utils.class_weight import compute_sample_weight
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from . import export, optim, validation
from .backend import get_backend
from .optim.lbfgs import minimize_lbfgs
from .nn import losses
from .nn.activations import ACTIVATIONS as OURS
from .nn.mlp import MLP
from .nn.pack import MLPPack
from .nn.network import EVAL_BATCH

ACTIVATIONS = {"logistic": "sigmoid", **{name: name for name in OURS}}  # scikit-learn's names, and ours
OUT_ACTIVATIONS = {"softmax": "softmax", "sigmoid": "logistic", "identity": "identity", "exp": "exp"}  # scikit-learn's
REGRESSION_LOSSES = {"squared_error": "mse", "poisson": "poisson"}  # MLPRegressor's loss -> the engine's
_TARGET_KINDS = {"cross_entropy": "classes (one label per row)", "binary_cross_entropy": "a multilabel indicator",
                 "mse": "values", "poisson": "counts"}

# The engine trains on dense arrays, so fit densifies a sparse X whole; one whose
# dense copy would pass this many bytes is refused (ValueError) rather than left to
# exhaust the machine. None: a quarter of the physical memory, since training needs
# about as much again (the early-stopping split, shuffled batches, the device copy);
# 4 GiB where the system does not say (os.sysconf is POSIX's). partial_fit applies
# it to each chunk it is given.
SPARSE_FIT_MAX_BYTES = None
# predict / predict_proba / score densify a sparse X this many bytes of rows at a time.
SPARSE_PREDICT_CHUNK_BYTES = 64 * 2**20
CPU = get_backend("cpu")  # where sample weights are checked, on the host


class _Ensemble:
    """Deep ensembles for the estimators (n_ensemble, bootstrap): the members' fit as one
    MLPPack, and their predictions."""

    def _fit_ensemble(self, X, y, sample_weight):
        """A deep ensemble: n_ensemble members, each this estimator with n_ensemble=1 and
        its own random_state (drawn from random_state), fitted on all rows or, with
        bootstrap, on its own resample of n rows drawn with replacement (from the same
        generator), as one MLPPack (each member as its lone fit, bit for bit); they
        are ``estimators_``. Predictions are the members' mean (_outputs)."""
        if self.warm_start:
            raise ValueError("warm_start=True continues one model; an ensemble (n_ensemble > 1 or bootstrap=True) "
                             "is fitted from scratch: set warm_start=False")
        X_checked, _, _ = self._begin_fit(X, y, False, sample_weight=sample_weight)  # the checks, classes_
        n, rng = len(X_checked), check_random_state(self.random_state)
        X, y = indexable(X, y)
        sample_weight = _sample_weight(sample_weight, n)
        fits = []
        for _ in range(self.n_ensemble):
            member = clone(self).set_params(n_ensemble=1, bootstrap=False, random_state=int(rng.randint(2**31)))
            fits.append(_Fit(member, rng.randint(n, size=n) if self.bootstrap else np.arange(n), None))
        packs = _Packs(X, y, sample_weight, raise_errors=True)
        for fit in fits:
            packs.add(fit)
        packs.train()
        self.estimators_ = [fit.est for fit in fits]
        lead = self.estimators_[0]
        self.model_ = lead.model_  # the kind of model, its dtype and outputs; the members predict
        self.n_iter_ = max(est.n_iter_ for est in self.estimators_)
        self.loss_ = float(np.mean([est.loss_ for est in self.estimators_]))
        self.n_layers_, self.out_activation_ = lead.n_layers_, lead.out_activation_
        self.n_outputs_ = max(est.n_outputs_ for est in self.estimators_)  # a member may have missed a class
        return self

    def _members_outputs(self, X):
        """Each ensemble member's _outputs for X, stacked: (members, n, outputs)."""
        check_is_fitted(self)
        validate_data(self, X, reset=False, dtype=self._dtype(first=False), accept_sparse="csr")  # the names, the width
        return np.stack([self._in_my_columns(est, est._outputs(X)) for est in self.estimators_])

    def _in_my_columns(self, member, outputs):
        """A member's outputs in this ensemble's columns (the classifier's may miss classes)."""
        return outputs


class _BaseMLP(_Ensemble, BaseEstimator):
    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam", alpha=0.0001,
                 batch_size="auto", learning_rate="constant", learning_rate_init=0.001, power_t=0.5, max_iter=200,
                 shuffle=True, random_state=None,
                 tol=1e-4, verbose=False, warm_start=False, momentum=0.9, nesterovs_momentum=True,
                 early_stopping=False, validation_fraction=0.1, beta_1=0.9, beta_2=0.999, epsilon=1e-8,
                 n_iter_no_change=10, max_fun=15000, device="cpu", dtype=None, n_ensemble=1, bootstrap=False):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun
        self.device = device
        self.dtype = dtype
        self.n_ensemble = n_ensemble
        self.bootstrap = bootstrap

    # ---- fitting ----------------------------------------------------------------------
    def fit(self, X, y, sample_weight=None):
        """Train from scratch (or on from the last fit, with warm_start) for up to max_iter
        epochs; ``sample_weight`` weighs the rows as scikit-learn's (a weight of 0 leaves
        a row out; the loss is the weighted mean of the rows' losses)."""
        if self.n_ensemble != 1 or self.bootstrap:
            return self._fit_ensemble(X, y, sample_weight)
        return self._fit(X, y, incremental=False, sample_weight=sample_weight)

    def _fit(self, X, y, incremental, classes=None, sample_weight=None):
        X, targets, weights = self._begin_fit(X, y, incremental, classes, sample_weight)
        if self.solver == "lbfgs":
            return self._fit_lbfgs(X, targets, weights)
        run = self._start_stochastic(X, targets, weights, incremental)
        self.model_.fit(_take(X, run.rows), _take(targets, run.rows), epochs=run.epochs, batch_size=run.batch,
                        optimizer=self._optimizer, shuffle=self.shuffle, progress=False, callbacks=[run.stop],
                        sample_weight=_take(weights, run.rows))
        return self._finish_stochastic(run, incremental)

    def _begin_fit(self, X, y, incremental, classes=None, sample_weight=None):
        """The first part of every fit: the parameters and data checked, the targets
        encoded, the rows' weights, and a new model where the fit starts from scratch;
        (X, targets, weights) as the solvers take them."""
        self._check_params()
        if incremental:
            _check_partial_fit(self)
        first = not (incremental or self.warm_start) or not hasattr(self, "model_")
        X, y = validate_data(self, X, y, reset=first, dtype=self._dtype(first), multi_output=True,
                             y_numeric=self._regresses, accept_sparse=["csr", "csc"])
        X = _densified(X, incremental)
        targets, loss = self._encode_targets(y, first, classes)
        weights = self._row_weights(y, _sample_weight(sample_weight, len(X)))
        if first:
            self._initialize(X, targets, loss)
        elif loss != self.model_.loss:
            raise ValueError(f"y is {_TARGET_KINDS[loss]} but this {type(self).__name__} was fitted to "
                             f"{_TARGET_KINDS[self.model_.loss]}; refit from scratch (warm_start=False)")
        return X, targets, weights

    _regresses = False

    def _row_weights(self, y, sample_weight):
        """The rows' weights: sample_weight (None: unweighted), times class_weight where the estimator has one."""
        return sample_weight

    def _initialize(self, X, targets, loss):
        sizes = [X.shape[1], *self._hidden(), targets.shape[1]]
        seed = check_random_state(self.random_state).randint(2**31)
        self.model_ = MLP(sizes, activation=ACTIVATIONS[self.activation], loss=loss,
                          device=self.device, dtype=X.dtype.name, seed=int(seed))
        self._optimizer = None
        self.n_iter_, self.t_ = 0, 0
        # a refit's: an ensemble's members and the last model's weights (an ensemble has none of its own);
        # lbfgs has no stochastic attributes, and sgd / adam start them anew
        for name in ("estimators_", "coefs_", "intercepts_", *_STOCHASTIC_ATTRIBUTES):
            self.__dict__.pop(name, None)

    def _start_stochastic(self, X, targets, weights, incremental):
        """Everything sgd / adam's epochs need, as scikit-learn's _fit_stochastic sets it
        up (a _Run): the batch size, the optimizer (made once per model), the rows to
        train on (early stopping holds the rest out for its score) and the stop rule.
        The epochs themselves are the model's fit on those rows (or one member of an
        MLPPack's, in MLPSearchCV); then _finish_stochastic."""
        if not hasattr(self, "loss_curve_"):  # a new model, or a warm start after lbfgs
            self.loss_curve_, self.best_loss_ = [], np.inf
            self.validation_scores_ = self.best_validation_score_ = None
        if self.early_stopping:
            self.best_loss_ = None  # the validation score measures instead, as in scikit-learn
            if self.validation_scores_ is None:
                self.validation_scores_ = []
        batch = min(200, len(X)) if self.batch_size == "auto" else min(self.batch_size, len(X))
        if self._optimizer is None:  # alpha / the batch's weight, as scikit-learn's alpha / sum of the batch's weights
            self._optimizer = self._make_optimizer(batch * (1.0 if weights is None else float(np.mean(weights))))
        rows, validation = None, None
        if self.early_stopping:
            held_out = math.ceil(self.validation_fraction * len(X))  # as train_test_split rounds it
            if held_out < 2:  # scikit-learn's error: no score to stop on from one row
                raise ValueError(f"The validation set is too small: {held_out} row of n_samples = {len(X)}. Increase "
                                 "'validation_fraction' or the size of your dataset, or set early_stopping=False")
            stratify = targets if self.model_.loss == "cross_entropy" and _can_stratify(targets, held_out) else None
            rows, held = train_test_split(np.arange(len(X)), test_size=self.validation_fraction,
                                          random_state=self.random_state, stratify=stratify)
            validation = (X[held], targets[held], _take(weights, held))
        stop = _StopRule(self, validation, len(X) if rows is None else len(rows),
                         self._loss_offset(_take(targets, rows), _take(weights, rows)))
        self.n_iter_ = 0
        return _Run(rows, batch, 1 if incremental else self.max_iter, stop)

    def _finish_stochastic(self, run, incremental):
        """After sgd / adam's epochs: t_, the best epoch's parameters where early stopping
        kept them, scikit-learn's warning where max_iter ended the fit, the fitted
        attributes. n_iter_ counts this call's epochs, t_ every sample seen since the
        model was made."""
        stop = run.stop
        self.t_ += stop.rows * stop.epochs
        if stop.best_state is not None:
            self.model_.load_state_dict(stop.best_state)
        if not incremental and not stop.stopped:  # as scikit-learn: every fit that max_iter ends, never partial_fit
            # scikit-learn's words first: a filter on them (filterwarnings matches the start) catches ours too
            warnings.warn(f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached and the "
                          f"optimization hasn't converged yet. {type(self).__name__} stopped before its loss "
                          "settled: raise max_iter (or tol)", ConvergenceWarning)
        self._export()
        return self

    def _fit_lbfgs(self, X, targets, weights):
        """Full-batch L-BFGS-B (gpubackprop.optim.lbfgs), as scikit-learn's solver='lbfgs':
        n_iter_ its iterations in this call; t_ untouched (it counts the stochastic
        solvers' samples), and no loss_curve_ or best_loss_."""
        scale = self._loss_scale()
        result = minimize_lbfgs(self.model_, X, targets, self.alpha / scale, self.max_iter, self.max_fun,
                                self.tol / scale, sample_weight=weights)
        self.n_iter_ = int(result.nit)
        self.loss_ = float(result.fun) * scale + self._loss_offset(targets, weights)
        if not result.success:
            warnings.warn(f"{type(self).__name__}: lbfgs did not converge within max_iter={self.max_iter} "
                          f"iterations or max_fun={self.max_fun} evaluations ({result.message}); raise them, "
                          "or scale the data", ConvergenceWarning)
        self._export()
        return self

    def _dtype(self, first):
        """What validate_data makes X: the fitted model's dtype; for a new model,
        ``dtype``, or where it is None, X's own float32 or float64 (anything else
        becomes float64), as scikit-learn's MLP keeps float32 data float32."""
        if not first:
            return np.dtype(self.model_.dtype)
        return [np.float64, np.float32] if self.dtype is None else np.dtype(self.dtype)

    def _check_params(self):
        problems = []
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.learning_rate not in ("constant", "invscaling", "adaptive"):
            problems.append(f"learning_rate must be 'constant', 'invscaling' or 'adaptive', got {self.learning_rate!r}")
        if self.solver not in ("sgd", "adam", "lbfgs"):
            problems.append(f"solver must be 'sgd', 'adam' or 'lbfgs', got {self.solver!r}")
        if not (isinstance(self.max_fun, (int, np.integer)) and self.max_fun >= 1):
            problems.append(f"max_fun must be an integer >= 1, got {self.max_fun!r}")
        if not (isinstance(self.max_iter, (int, np.integer)) and self.max_iter >= 1):
            problems.append(f"max_iter must be an integer >= 1, got {self.max_iter!r}")
        if not (self.batch_size == "auto" or (isinstance(self.batch_size, (int, np.integer)) and self.batch_size >= 1)):
            problems.append(f"batch_size must be 'auto' or an integer >= 1, got {self.batch_size!r}")
        if not 0 < self.validation_fraction < 1:
            problems.append(f"validation_fraction must be in (0, 1), got {self.validation_fraction!r}")
        if not (isinstance(self.n_iter_no_change, (int, np.integer)) and self.n_iter_no_change >= 1
                or self.n_iter_no_change == np.inf):
            problems.append(f"n_iter_no_change must be an integer >= 1 or np.inf (never stop on a plateau), "
                            f"got {self.n_iter_no_change!r}")
        if self.alpha < 0 or self.tol < 0:
            problems.append("alpha and tol must be >= 0")
        if not (isinstance(self.n_ensemble, (int, np.integer)) and self.n_ensemble >= 1):
            problems.append(f"n_ensemble must be an integer >= 1 (a deep ensemble's members), got {self.n_ensemble!r}")
        if not isinstance(self.bootstrap, (bool, np.bool_)):
            problems.append(f"bootstrap must be True or False, got {self.bootstrap!r}")
        self._hidden()  # raises for bad sizes
        if problems:
            raise ValueError("; ".join(problems))

    def _hidden(self):
        sizes = self.hidden_layer_sizes
        sizes = [sizes] if np.isscalar(sizes) else list(sizes)
        if not all(isinstance(s, (int, np.integer)) and s >= 1 for s in sizes):
            raise ValueError(f"hidden_layer_sizes must be positive integers, got {self.hidden_layer_sizes!r}")
        return [int(s) for s in sizes]

    def _loss_scale(self):
        """scikit-learn's objective over the engine's loss, s: its multilabel log loss and
        poisson loss sum over the outputs where the engine's average, and its squared
        error is half the sum over outputs (in its gradient; it reports half the mean).
        The estimator trains on L + alpha / (2 s B) ||W||^2 (B the batch's weight),
        with sgd's rate times s, reports s L and stops on it, so that it follows
        scikit-learn's MLP: the same loss_curve_, and the same steps for sgd and adam."""
        loss, outputs = self.model_.loss, self.model_.sizes[-1]
        return {"cross_entropy": 1.0, "binary_cross_entropy": outputs, "mse": outputs / 2, "poisson": outputs}[loss]

    def _loss_offset(self, targets, weights):
        """What scikit-learn's loss adds to s L where the engine's drops a constant: 0 but for poisson."""
        return 0.0

    def _learning_rate(self, rate):
        """The engine's rate for scikit-learn's ``rate``: times s for sgd (adam is blind to the scale)."""
        return rate * self._loss_scale() if self.solver == "sgd" else rate

    def _make_optimizer(self, batch_weight):
        decay = self.alpha / (batch_weight * self._loss_scale())  # the biases spared, as scikit-learn spares them
        if self.solver == "sgd":
            return optim.SGD(self._learning_rate(self.learning_rate_init), momentum=self.momentum, weight_decay=decay,
                             nesterov=self.nesterovs_momentum and self.momentum > 0, decay_biases=False)
        return optim.Adam(self.learning_rate_init, betas=(self.beta_1, self.beta_2), eps=self.epsilon, weight_decay=decay,
                          decay_biases=False)

    def _export(self):
        """coefs_ (n_in, n_out) and intercepts_, as scikit-learn lays them out."""
        state = self.model_.state_dict()
        n = len(self.model_.sizes) - 1
        self.coefs_ = [state[f"layers.{i}.weight"].T.copy() for i in range(n)]
        self.intercepts_ = [state[f"layers.{i}.bias"].copy() for i in range(n)]
        self.n_layers_ = n + 1
        self.n_outputs_ = self.model_.sizes[-1]
        self.out_activation_ = OUT_ACTIVATIONS[self.model_.criterion.output]

    def to_onnx(self, path=None, opset=None):
        """The fitted estimator as an ONNX graph (gpubackprop.export): input ``X`` in
        the model's dtype, outputs ``label`` and ``probabilities`` for a
        classifier (as skl2onnx names them with zipmap=False), ``variable`` for a
        regressor."""
        check_is_fitted(self)
        if hasattr(self, "estimators_"):
            raise NotImplementedError("to_onnx exports one network; this is an ensemble of "
                                      f"{len(self.estimators_)}: export each of estimators_")
        return export.to_onnx(self.model_, path, opset, getattr(self, "classes_", None))

    def _forward(self, X):
        """The network's outputs for X; a sparse X densified a chunk of rows at a time."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=self._dtype(first=False), accept_sparse="csr")
        if not sp.issparse(X):
            return self.model_.forward(X)
        rows = _chunk_rows(X)
        return np.concatenate([self.model_.forward(X[i:i + rows].toarray()) for i in range(0, X.shape[0], rows)])

    def _outputs(self, X):
        """What the model's loss makes of the network's outputs for X (gpubackprop.nn.losses.output):
        softmax or sigmoid probabilities, e^z, or z itself; for an ensemble, the members' mean."""
        if hasattr(self, "estimators_"):
            return np.mean(self._members_outputs(X), axis=0)
        z = self._forward(X)
        out = np.empty_like(z)
        losses.output(np, self.model_.criterion, z, out, np.empty(z.shape[0], z.dtype))
        return out

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags

    # ---- pickling: the parameters, not the device buffers ---------------------------------
    def __getstate__(self):
        state = dict(self.__dict__)
        model = state.pop("model_", None)
        if model is not None:
            state["_model_state"] = (model.config(), model.state_dict())
        opt = state.pop("_optimizer", None)
        state["_optimizer_state"] = None if opt is None else opt.state_dict()
        return state

    def __setstate__(self, state):
        saved, opt = state.pop("_model_state", None), state.pop("_optimizer_state", None)
        self.__dict__.update(state)
        if saved is not None:
            config, params = saved
            self.model_ = MLP(**config, device=self.device)
            self.model_.load_state_dict(params)
        self._optimizer = None if opt is None else optim.from_state_dict(opt)


class _StopRule:
    """scikit-learn's stopping: no improvement by tol for n_iter_no_change epochs,
    in the training loss, or with early_stopping in the validation score (and then
    the best epoch's parameters are restored). Records loss_curve_ and n_iter_.

    And, for solver="sgd", scikit-learn's learning_rate after each epoch:
    "invscaling" sets lr = learning_rate_init / (t + 1)^power_t, t the samples seen
    so far; "adaptive" divides lr by 5 where the epochs would stop training, and
    stops only once lr is at most 1e-6."""

    def __init__(self, est, validation, rows, offset=0.0):
        self.est, self.validation, self.rows, self.offset = est, validation, rows, offset
        self.best = np.inf if validation is None else -np.inf
        self.bad_epochs, self.epochs, self.stopped, self.best_state = 0, 0, False, None

    def on_epoch_end(self, model, epoch, logs):
        est = self.est
        self.epochs += 1
        est.n_iter_ += 1
        loss = logs["loss"] * est._loss_scale() + self.offset  # on scikit-learn's scale
        est.loss_curve_.append(loss)
        if self.validation is None:
            improved = loss < self.best - est.tol
            self.best = min(self.best, loss)
        else:
            score = est._validation_score(*self.validation)
            est.validation_scores_.append(score)
            improved = score > self.best + est.tol
            if score > self.best:
                self.best, self.best_state = score, model.state_dict()
                est.best_validation_score_ = score
        self.bad_epochs = 0 if improved else self.bad_epochs + 1
        est.loss_ = loss
        if self.validation is None:  # since the model was made, across warm starts and partial_fit, as scikit-learn
            est.best_loss_ = min(np.inf if est.best_loss_ is None else est.best_loss_, loss)
        if est.verbose:  # scikit-learn's lines
            print(f"Iteration {est.n_iter_}, loss = {loss:.8f}")
            if self.validation is not None:
                print(f"Validation score: {est.validation_scores_[-1]:f}")
        schedule = est.learning_rate if est.solver == "sgd" else "constant"
        optimizer = model.optimizer
        if schedule == "invscaling":
            optimizer.lr = est._learning_rate(est.learning_rate_init / (est.t_ + self.rows * self.epochs + 1) ** est.power_t)
        if self.bad_epochs >= est.n_iter_no_change:
            if schedule == "adaptive" and optimizer.lr > est._learning_rate(1e-6):
                optimizer.lr, self.bad_epochs = optimizer.lr / 5.0, 0
            else:
                self.stopped = model.stop_training = True


class _Run(collections.namedtuple("_Run", "rows batch epochs stop")):
    """One stochastic fit's plan (_start_stochastic): the rows of X it trains on (None:
    all), its batch size, epochs and stop rule (a callback, which records the epochs)."""


def _take(a, rows):
    """a's ``rows`` (None: all of a, itself); None stays None."""
    return a if a is None or rows is None else a[rows]


_STOCHASTIC_ATTRIBUTES = ("loss_curve_", "best_loss_", "validation_scores_", "best_validation_score_")


def _fit_limit():
    """SPARSE_FIT_MAX_BYTES, or where it is None a quarter of the physical memory."""
    if SPARSE_FIT_MAX_BYTES is not None:
        return SPARSE_FIT_MAX_BYTES
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (AttributeError, ValueError, OSError):
        return 4 * 2**30


def _densified(X, incremental):
    """X for the engine, which trains on dense arrays: a sparse X as its dense copy,
    where that fits within _fit_limit()."""
    if not sp.issparse(X):
        return X
    need, limit = X.shape[0] * X.shape[1] * X.dtype.itemsize, _fit_limit()
    if need > limit:
        where = "smaller row chunks to partial_fit" if incremental else "its rows to partial_fit in chunks"
        raise ValueError(f"X is sparse ({X.shape[0]} x {X.shape[1]}, {X.dtype}) and the engine trains on dense "
                         f"arrays: its dense copy would take {_size(need)}, over the {_size(limit)} that "
                         "gpubackprop.sklearn.SPARSE_FIT_MAX_BYTES allows (None: a quarter of this machine's "
                         f"memory). Reduce the features (feature selection, TruncatedSVD), pass {where} (each "
                         "call densifies only its own), or raise SPARSE_FIT_MAX_BYTES where the memory is there")
    return X.toarray()


def _size(n):
    """n bytes in the largest binary unit that keeps it at least 1."""
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _chunk_rows(X):
    """Rows of a sparse X to densify at a time for predict: SPARSE_PREDICT_CHUNK_BYTES'
    worth, rounded down to a multiple of the engine's own inference chunk (EVAL_BATCH)
    where that is at least one, so that the engine forwards the same row blocks as for
    the whole dense X and the predictions agree bit for bit."""
    rows = max(1, SPARSE_PREDICT_CHUNK_BYTES // (X.shape[1] * X.dtype.itemsize))
    return rows - rows % EVAL_BATCH if rows >= EVAL_BATCH else rows


class _PartialFitIf:
    """partial_fit, there only where it can run, as scikit-learn's available_if makes
    it: hasattr(est, "partial_fit") is False for solver='lbfgs' (as scikit-learn's),
    for early_stopping=True (scikit-learn's has it and raises) and for
    class_weight='balanced' (scikit-learn's SGDClassifier raises), since
    meta-estimators and scikit-learn's own checks look before they call."""

    def __init__(self, method):
        self.method = method
        functools.update_wrapper(self, method)

    def __get__(self, est, owner=None):
        if est is None:  # the class's: its docstring; a call still meets _check_partial_fit in _fit
            return self.method
        _check_partial_fit(est)
        return types.MethodType(self.method, est)


class _NoPartialFit(AttributeError, ValueError):
    """AttributeError, so that hasattr reads the refusal as scikit-learn's available_if
    does; ValueError, as scikit-learn raises for early_stopping and as the bad
    parameter setting it is."""


def _check_partial_fit(est):
    if est.solver == "lbfgs":
        raise _NoPartialFit(f"partial_fit is only available for stochastic optimizers. {est.solver} is not "
                            "stochastic: use fit, or solver='sgd' or 'adam' to train in chunks")
    if isinstance(getattr(est, "class_weight", None), str) and est.class_weight == "balanced":
        # as scikit-learn's SGDClassifier refuses it: each chunk would be balanced by its own counts
        raise _NoPartialFit("class_weight 'balanced' is not supported for partial_fit: each chunk would be "
                            "balanced by its own class counts. Compute the weights once, "
                            "compute_class_weight('balanced', classes=classes, y=y) over enough of the whole "
                            "target, and pass them as class_weight={class: weight}")
    if est.n_ensemble != 1 or est.bootstrap:
        raise _NoPartialFit("partial_fit trains one model; an ensemble (n_ensemble > 1 or bootstrap=True) is "
                            "fitted whole: use fit")
    if est.early_stopping:
        raise _NoPartialFit("partial_fit does not support early_stopping=True, as scikit-learn's MLP: a call "
                            "trains one epoch on the rows it is given, with none held out; set "
                            "early_stopping=False, or train with fit")


def _sample_weight(sample_weight, n):
    """sample_weight as n float64 weights (a number: every row's), or None; checked as
    the engine checks them (one per row, finite, >= 0, not all 0)."""
    if sample_weight is None:
        return None
    w = np.asarray(sample_weight, dtype=np.float64)
    return validation.check_sample_weight(np.full(n, float(w)) if w.ndim == 0 else w, n, np.float64, CPU)


def _init_signature(first=(), last=()):
    """_BaseMLP.__init__'s signature with parameters ``first`` before its own and ``last``
    after them: scikit-learn reads an estimator's parameters from its __init__'s
    signature, and a subclass adds one (the regressor's loss, the classifier's
    class_weight) without spelling out the rest again."""
    self, *own = inspect.signature(_BaseMLP.__init__).parameters.values()
    return inspect.Signature([self, *first, *own, *last])


def _can_stratify(targets, held_out):
    """Whether train_test_split can stratify the early-stopping split: every class
    twice at least, and no fewer rows than classes on either side (else it raises,
    and the split is left plain)."""
    counts = np.bincount(targets.argmax(1))
    counts = counts[counts > 0]
    return counts.min() >= 2 and min(held_out, len(targets) - held_out) >= len(counts)


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """Multilayer perceptron classifier on gpubackprop: softmax cross entropy over the
    classes of a 1-D y; for a 2-D multilabel indicator y (as scikit-learn's takes it),
    a sigmoid per label with binary cross entropy, predict giving the indicator
    matrix and predict_proba each label's probability.

    Binary problems get a softmax over two outputs, not scikit-learn's one
    logistic unit: the predictions are alike, but n_outputs_ is 2 and
    out_activation_ "softmax" (coefs_[-1] has a column per class, as coefs_ is in
    scikit-learn's (n_in, n_out) layout).

    ``class_weight`` (not in scikit-learn's MLP; as in its LogisticRegression):
    "balanced" or a dict {class: weight} multiplies each row's sample weight by
    its class's (scikit-learn's compute_sample_weight; for a multilabel y, the
    product over its labels, each a 0 / 1 output: "balanced" or a list of dicts)."""

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, class_weight=None, **params):
        super().__init__(hidden_layer_sizes, activation, **params)
        self.class_weight = class_weight

    @_PartialFitIf
    def partial_fit(self, X, y, sample_weight=None, classes=None):
        """One epoch over (X, y); the first call needs ``classes``, every label there
        may be, and later calls may repeat it but not change it (as scikit-learn)."""
        if not hasattr(self, "model_"):
            if classes is None:
                raise ValueError("classes must be passed on the first call to partial_fit: every label the "
                                 "data may hold, e.g. np.unique(y_all)")
        elif classes is not None and not np.array_equal(self.classes_, np.unique(classes)):
            raise ValueError(f"`classes={classes!r}` is not the same as on last call to partial_fit, was: "
                             f"{self.classes_!r}. The classes are fixed by the first fit or partial_fit; "
                             "refit from scratch to change them")
        return self._fit(X, y, incremental=True, classes=classes, sample_weight=sample_weight)

    def _encode_targets(self, y, first, classes=None):
        """(targets, the engine's loss): one-hot rows and cross entropy, or for a
        multilabel indicator y its rows and binary cross entropy."""
        if type_of_target(y) == "multilabel-indicator":
            if first:
                self.classes_ = np.arange(y.shape[1])
            elif y.shape[1] != len(self.classes_):
                raise ValueError(f"y has {y.shape[1]} labels but this classifier was fitted to {len(self.classes_)}")
            return np.asarray(y, np.float64), "binary_cross_entropy"
        y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        if first:
            self.classes_ = np.unique(y if classes is None else classes)
            if len(self.classes_) < 2:
                raise ValueError(f"{type(self).__name__} needs samples of at least 2 classes in the data, "
                                 f"but the data contains only one class: {self.classes_[0]!r}")
        index = np.searchsorted(self.classes_, y)
        if np.any(index >= len(self.classes_)) or np.any(self.classes_[np.minimum(index, len(self.classes_) - 1)] != y):
            raise ValueError(f"`y` has classes not in `self.classes_`. `self.classes_` has {self.classes_}. 'y' has "
                             f"{np.unique(y)}. The classes are fixed by the first fit, or by classes= on the first "
                             "partial_fit: pass every label there, or refit from scratch (warm_start=False)")
        return np.eye(len(self.classes_))[index], "cross_entropy"

    def _row_weights(self, y, sample_weight):
        if self.class_weight is None:
            return sample_weight
        # a multilabel y: each label a 0 / 1 output, the row's weight the product of its labels' (a list of dicts)
        by_class = compute_sample_weight(self.class_weight, y if np.ndim(y) == 2 else column_or_1d(y))
        return by_class if sample_weight is None else by_class * sample_weight

    def _validation_score(self, X, targets, weights):
        """Accuracy (of whole rows, for multilabel), weighted as the training rows."""
        if self.model_.loss == "binary_cross_entropy":
            return accuracy_score(targets.astype(np.int64), self.model_.predict(X), sample_weight=weights)
        return accuracy_score(targets.argmax(1), self.model_.predict(X), sample_weight=weights)

    def predict(self, X):
        """The most probable class (for multilabel, each label whose probability is over
        1/2); for an ensemble, by the members' mean probabilities."""
        if hasattr(self, "estimators_"):
            p = self._outputs(X)
            multilabel = self.model_.loss == "binary_cross_entropy"
            return (p > 0.5).astype(np.int64) if multilabel else self.classes_[p.argmax(1)]
        z = self._forward(X)
        if self.model_.loss == "binary_cross_entropy":
            return (z > 0).astype(np.int64)
        return self.classes_[z.argmax(1)]

    def _in_my_columns(self, member, outputs):
        """A member's probabilities in this ensemble's columns: a member whose bootstrap
        resample missed a class gives it probability 0."""
        if self.model_.loss == "binary_cross_entropy" or len(member.classes_) == len(self.classes_):
            return outputs
        aligned = np.zeros((len(outputs), len(self.classes_)), outputs.dtype)
        aligned[:, np.searchsorted(self.classes_, member.classes_)] = outputs
        return aligned

    def predict_proba(self, X):
        """Class probabilities (softmax), or for multilabel each label's (sigmoid)."""
        return self._outputs(X)

    def predict_log_proba(self, X):
        return np.log(self.predict_proba(X))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags


class MLPRegressor(RegressorMixin, _BaseMLP):
    """Multilayer perceptron regressor on gpubackprop: ``loss`` "squared_error" (the
    engine's mse: the mean of squares, twice scikit-learn's half squared error) or
    "poisson" (counts y >= 0; the output is the log of the mean count, predict the
    mean e^z), as scikit-learn 1.9's, whose first parameter it is too. coefs_ and
    intercepts_ in scikit-learn's layout, (n_in, n_out) and (n_out,)."""

    _regresses = True

    def __init__(self, loss="squared_error", hidden_layer_sizes=(100,), activation="relu", **params):
        super().__init__(hidden_layer_sizes, activation, **params)
        self.loss = loss

    def _check_params(self):
        if not (isinstance(self.loss, str) and self.loss in REGRESSION_LOSSES):
            raise ValueError(f"loss must be one of {sorted(REGRESSION_LOSSES)}, got {self.loss!r} (loss is "
                             "MLPRegressor's first parameter, as in scikit-learn 1.9: pass hidden_layer_sizes by name)")
        super()._check_params()

    @_PartialFitIf
    def partial_fit(self, X, y, sample_weight=None):
        """One epoch over (X, y), continuing from the current parameters."""
        return self._fit(X, y, incremental=True, sample_weight=sample_weight)

    def _encode_targets(self, y, first, classes=None):
        y = np.asarray(y, np.float64)
        if first:
            self._y_1d = y.ndim == 1
        return y.reshape(len(y), -1), REGRESSION_LOSSES[self.loss]

    def _validation_score(self, X, targets, weights):
        return r2_score(targets, self.model_.predict(X), sample_weight=weights)

    def _loss_offset(self, targets, weights):
        """scikit-learn's poisson loss is the deviance's half, sum_c [y log(y / p) - y + p]: the
        engine's e^z - y z summed over the outputs, plus sum_c [y log y - y], here averaged
        over the rows (weighted) so that loss_ is scikit-learn's."""
        if self.model_.loss != "poisson":
            return 0.0
        return float(np.average((xlogy(targets, targets) - targets).sum(axis=1), weights=weights))

    def predict(self, X):
        """The predicted values (for poisson, the mean counts e^z); for an ensemble, the members' mean."""
        out = self._outputs(X)  # e^z for poisson: the mean count
        return out.ravel() if self._y_1d else out

    def predict_std(self, X):
        """The ensemble members' standard deviation of their predictions (ddof 0), shaped
        as predict's: a measure of the ensemble's uncertainty, larger where the members
        disagree (away from the training data); zeros for a single model."""
        if not hasattr(self, "estimators_"):
            return np.zeros_like(self.predict(X))
        std = self._members_outputs(X).std(axis=0)
        return std.ravel() if self._y_1d else std

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags


MLPClassifier.__init__.__signature__ = _init_signature(
    last=[inspect.Parameter("class_weight", inspect.Parameter.KEYWORD_ONLY, default=None)])
MLPRegressor.__init__.__signature__ = _init_signature(
    first=[inspect.Parameter("loss", inspect.Parameter.POSITIONAL_OR_KEYWORD, default="squared_error")])


class MLPSearchCV(GridSearchCV):
    """GridSearchCV over an MLPClassifier or MLPRegressor of this module, training the
    (configuration x fold) fits as members of MLPPacks (gpubackprop.nn.pack).

    Its parameters, and its results (``cv_results_`` with the same keys and scores,
    ``best_params_``, ``best_score_``, ``best_index_``, ``best_estimator_`` refitted on
    all of X, ``n_splits_``, ``scorer_``, ``refit_time_``, predict / score / ... of the
    best estimator), are scikit-learn's GridSearchCV's: the fit of configuration c on
    fold f is the estimator's own fit, ``clone(estimator).set_params(**c).fit(X[train],
    y[train])``, up to its epochs: the estimator prepares it (_begin_fit: checks,
    targets, weights, the model seeded from random_state; _start_stochastic: batch
    size, optimizer, early stopping's split, stop rule), the epochs run as one member
    of a pack on exactly the fold's training rows (its own shuffle, optimizer and stop
    rule: a member that stops, stops alone), and the estimator finishes it
    (_finish_stochastic), so that each member's parameters, loss_curve_ and score
    are its lone fit's, bit for bit on the CPU.

    The fits whose models are of one kind (layer sizes, activation, loss, device,
    dtype), with the same shuffle, classes and weighting, share one pack; every other
    setting (learning_rate_init, alpha, solver "sgd" / "adam", momentum, beta_1,
    beta_2, epsilon, batch_size, max_iter, random_state, tol, n_iter_no_change,
    early_stopping, ...) may differ inside it. solver="lbfgs" fits, and ensembles
    (n_ensemble > 1 or bootstrap: each trains as a pack of its own), run one by one,
    as GridSearchCV runs them. Where the fits are not all in one pack, one warning
    says how many packs, and how many fits run alone and why.

    Where it differs from GridSearchCV: every fit runs in this process (n_jobs and
    pre_dispatch are taken and ignored); a pack's fit time is shared equally by its
    members in ``mean_fit_time``; scoring is one metric (a name, a callable or None:
    several metrics raise NotImplementedError, use GridSearchCV); fit takes
    ``groups`` and ``sample_weight`` alone (split with the folds, for fit and for
    the scorer where it takes weights, as GridSearchCV without metadata routing;
    nothing else is routed); and a member whose gradients go non-finite is a failed
    fit (error_score), where the lone fit raises FloatingPointError.
    """

    def fit(self, X, y=None, *, groups=None, sample_weight=None):
        """Every configuration of param_grid fitted on every fold of cv (``groups`` to its
        split) and scored, as GridSearchCV's fit; then the best refitted on all of X."""
        if not isinstance(self.estimator, _BaseMLP):
            raise TypeError(f"MLPSearchCV searches gpubackprop.sklearn's MLPClassifier or MLPRegressor, got "
                            f"{type(self.estimator).__name__}: use scikit-learn's GridSearchCV for other estimators")
        if not (self.scoring is None or isinstance(self.scoring, str) or callable(self.scoring)):
            raise NotImplementedError("MLPSearchCV scores one metric (scoring=None, a name or a callable); for "
                                      "several, use scikit-learn's GridSearchCV with this estimator")
        candidates = list(ParameterGrid(self.param_grid))
        _check_grid_keys(self.estimator, candidates)
        scorer, refit_metric = self._get_scorers()
        X, y, sample_weight = indexable(X, y, sample_weight)
        cv = check_cv(self.cv, y, classifier=is_classifier(self.estimator))
        splits = list(cv.split(X, y, groups))
        self.n_splits_ = len(splits)
        # as GridSearchCV (without metadata routing): the weights go to the scorer too where it takes them
        weigh_scores = sample_weight is not None and self._check_scorers_accept_sample_weight()
        out = _PackedSearch(self, X, y, sample_weight, scorer, weigh_scores).run(candidates, splits)
        results = self._format_results(candidates, self.n_splits_, out)
        self.multimetric_ = False
        self.best_index_ = self._select_best_index(self.refit, refit_metric, results)
        if not callable(self.refit):
            self.best_score_ = results[f"mean_test_{refit_metric}"][self.best_index_]
        self.best_params_ = results["params"][self.best_index_]
        if self.refit:
            self.best_estimator_ = clone(self.estimator).set_params(**clone(self.best_params_, safe=False))
            start = time.perf_counter()
            self.best_estimator_.fit(X, y, sample_weight=sample_weight)
            self.refit_time_ = time.perf_counter() - start
            if hasattr(self.best_estimator_, "feature_names_in_"):
                self.feature_names_in_ = self.best_estimator_.feature_names_in_
        self.scorer_, self.cv_results_ = scorer, results
        return self


def _check_grid_keys(estimator, candidates):
    """Every parameter the grid sets is one of the estimator's, else a ValueError naming the valid ones."""
    valid = estimator.get_params(deep=True)
    unknown = sorted({key for c in candidates for key in c} - set(valid))
    if unknown:
        raise ValueError(f"param_grid sets {unknown}, which {'is' if len(unknown) == 1 else 'are'} not "
                         f"parameter(s) of {type(estimator).__name__}; its parameters are {sorted(valid)}")


def _rows_of(a, rows):
    """The rows of an array, a DataFrame (by position) or a sparse matrix, as GridSearchCV splits them; None stays."""
    if a is None:
        return None
    return a.iloc[rows] if hasattr(a, "iloc") else a[rows] if sp.issparse(a) else np.asarray(a)[rows]


class _Fit:
    """One (configuration, fold) fit of a search: its estimator, its stochastic run,
    and the rows of the whole X it trains on; the seconds spent on it; an error."""

    def __init__(self, est, train, test):
        self.est, self.train, self.test = est, train, test
        self.run, self.seconds, self.error = None, 0.0, None


class _Packs:
    """Fits (_Fit) on rows of one (X, y, sample_weight): each prepared by its estimator
    (_begin_fit, _start_stochastic), its epochs run as a member of as few MLPPacks as
    hold them (one per kind of model: _Group), and finished by its estimator; lbfgs
    fits (full batch: no epochs to share) and ensembles (packs themselves) are fitted
    alone. A fit that raises keeps
    its error (fit.error), or with ``raise_errors`` raises it."""

    def __init__(self, X, y, sample_weight, raise_errors):
        self.X, self.y, self.sample_weight, self.raise_errors = X, y, sample_weight, raise_errors
        self.groups, self.alone = {}, []

    def add(self, fit):
        if _alone_why(fit.est):
            self.alone.append(fit)
            return

        def prepare(f):
            X, targets, weights = f.est._begin_fit(_rows_of(self.X, f.train), _rows_of(self.y, f.train), False,
                                                   sample_weight=_rows_of(self.sample_weight, f.train))
            f.run = f.est._start_stochastic(X, targets, weights, incremental=False)
            model = f.est.model_
            key = (tuple(model.sizes), model.activation, model.loss, model.device, model.dtype, f.est.shuffle,
                   weights is None, tuple(getattr(f.est, "classes_", ())))
            if key not in self.groups:
                self.groups[key] = _Group(len(self.y), X, targets)
            self.groups[key].add(f, X, targets, weights)

        self.guarded(fit, prepare)

    def train(self):
        for group in self.groups.values():
            group.train(self)
        for fit in self.alone:
            self.guarded(fit, lambda f: f.est.fit(_rows_of(self.X, f.train), _rows_of(self.y, f.train),
                                                  sample_weight=_rows_of(self.sample_weight, f.train)))

    def guarded(self, fit, step):
        """step(fit), timed into fit.seconds; an exception kept as the fit's error, or raised."""
        start = time.perf_counter()
        try:
            if fit.error is None:
                step(fit)
        except Exception as e:
            if self.raise_errors:
                raise
            fit.error = f"{type(e).__name__}: {e}"
        finally:
            fit.seconds += time.perf_counter() - start


class _PackedSearch:
    """MLPSearchCV's fits, trained by _Packs, and scored as GridSearchCV scores them."""

    def __init__(self, search, X, y, sample_weight, scorer, weigh_scores):
        self.search, self.X, self.y, self.sample_weight, self.scorer = search, X, y, sample_weight, scorer
        self.weigh_scores = weigh_scores

    def run(self, candidates, splits):
        """GridSearchCV's per-fit results (fit_time, score_time, test_scores, ...), candidate by candidate,
        fold by fold within each."""
        fits = [_Fit(clone(self.search.estimator).set_params(**clone(c, safe=False)), train, test)
                for c in candidates for train, test in splits]
        packs = _Packs(self.X, self.y, self.sample_weight, raise_errors=self.search.error_score == "raise")
        for fit in fits:
            packs.add(fit)
        alone, groups = len(packs.alone), len(packs.groups)
        if alone or groups > 1:  # one line for whatever is not one pack
            said = [f"{len(fits) - alone} of {len(fits)} fits run in {groups} packs, one per kind of model (layer "
                    "sizes, activation, loss, dtype, shuffle, weighting, classes)"] if groups > 1 else []
            if alone:
                why = " or ".join(sorted({_alone_why(fit.est) for fit in packs.alone}))
                said.append(f"{alone} of {len(fits)} fits ({why}) cannot be pack members and run one by one")
            warnings.warn("MLPSearchCV: " + "; ".join(said), UserWarning, stacklevel=3)
        if self.search.verbose > 0:
            print(f"Fitting {len(splits)} folds for each of {len(candidates)} candidates, totalling {len(fits)} "
                  f"fits: {len(fits) - alone} in {groups} pack(s), {alone} one by one")
        packs.train()
        out = [self._score(fit) for fit in fits]
        _warn_or_raise_about_failures(out, self.search.error_score)
        return out

    def _score(self, fit):
        """The fit's result as GridSearchCV's _fit_and_score gives it (error_score where it failed)."""
        result = {"fit_time": fit.seconds, "fit_error": fit.error, "n_test_samples": len(fit.test)}
        error_score = self.search.error_score
        start = time.perf_counter()
        result["test_scores"] = error_score if fit.error else self._scored(fit.est, fit.test)
        result["score_time"] = time.perf_counter() - start if fit.error is None else 0.0
        if self.search.return_train_score:
            result["train_scores"] = error_score if fit.error else self._scored(fit.est, fit.train)
        return result

    def _scored(self, est, rows):
        weights = {"sample_weight": _rows_of(self.sample_weight, rows)} if self.weigh_scores else {}
        score = self.scorer(est, _rows_of(self.X, rows), _rows_of(self.y, rows), **weights)
        if isinstance(score, dict):
            raise NotImplementedError("MLPSearchCV scores one metric; this scoring callable gave several: use "
                                      "scikit-learn's GridSearchCV for several")
        return score


class _Group:
    """The fits of one kind of model, trained as one MLPPack: the whole data's rows
    (each fit's training rows filled in from its own prepared X and targets: every
    fit of a group encodes a row alike) and each fit's weights over them."""

    def __init__(self, n, X, targets):
        self.X = np.zeros((n, X.shape[1]), X.dtype)
        self.T = np.repeat(targets[:1], n, axis=0)  # rows no member trains on: a valid target, never read
        self.fits, self.weights = [], []

    def add(self, fit, X, targets, weights):
        self.X[fit.train], self.T[fit.train] = X, targets
        if weights is not None:
            w = np.zeros(len(self.X))
            w[fit.train] = weights
            self.weights.append(w)
        self.fits.append(fit)

    def train(self, packs):
        """Every fit's epochs as a member of one pack, then its estimator's _finish_stochastic
        (guarded by ``packs``). The pack's time is shared equally by its fits."""
        fits = self.fits
        pack = MLPPack.of([f.est.model_ for f in fits])
        start = time.perf_counter()
        pack.fit(self.X, self.T, epochs=[f.run.epochs for f in fits], batch_size=[f.run.batch for f in fits],
                 optimizer=[f.est._optimizer for f in fits], sample_weight=np.array(self.weights) if self.weights
                 else None, rows=[f.train if f.run.rows is None else f.train[f.run.rows] for f in fits],
                 callbacks=[[f.run.stop] for f in fits], shuffle=fits[0].est.shuffle)
        share = (time.perf_counter() - start) / len(fits)
        for k, fit in enumerate(fits):
            fit.seconds += share
            packs.guarded(fit, functools.partial(_finish, stopped=pack.stopped[k]))


def _alone_why(est):
    """Why ``est``'s fit cannot be a pack member, or None where it can."""
    if est.solver == "lbfgs":
        return "solver='lbfgs', full batch"
    if est.n_ensemble != 1 or est.bootstrap:
        return "ensembles, each a pack of its own"
    return None


def _finish(fit, stopped):
    """A pack member's end: its estimator's _finish_stochastic, or where its gradients went
    non-finite (the pack stopped it alone) the FloatingPointError its lone fit raises."""
    if stopped is not None:
        raise FloatingPointError(f"the gradients went non-finite at step {stopped}; the step was skipped and the "
                                 "parameters are the last finite ones (lower the learning rate, or scale the data)")
    fit.est._finish_stochastic(fit.run, incremental=False)


def _warn_or_raise_about_failures(out, error_score):
    """As GridSearchCV: a ValueError where every fit failed, else a FitFailedWarning counting the failures."""
    errors = collections.Counter(r["fit_error"] for r in out if r["fit_error"] is not None)
    if not errors:
        return
    details = "\n".join(f"{n} fits failed with the following error:\n{e}" for e, n in errors.items())
    failed = sum(errors.values())
    if failed == len(out):
        raise ValueError(f"All the {len(out)} fits failed. It is very likely that your model is misconfigured. You "
                         f"can try to debug the error by setting error_score='raise'.\n{details}")
    warnings.warn(f"{failed} fits failed out of a total of {len(out)}. The score on these train-test partitions for "
                  f"these parameters will be set to {error_score}. If these failures are not expected, you can try "
                  f"to debug them by setting error_score='raise'.\n{details}", FitFailedWarning)
