"""MLPPack: K MLPs of the same layer sizes trained together, epoch by epoch.

Member k is ``MLP(sizes, seed=seeds[k])``. Two ways to train them:

batches="own"     each member on its own shuffle of the rows, with its own steps
                  (gpubackprop.train.Trainer: forward, loss, backward, the divergence
                  guard, its optimizer's update, a captured CUDA graph where the
                  backend captures), member after member each epoch: member k equals
                  that MLP trained alone with ``fit`` on the same data and settings,
                  bit for bit. What this saves over K fits is the per-fit work (checks,
                  the data's copies, the loop's bookkeeping), not arithmetic.
batches="shared"  every member on the same batches (member 0's shuffle), all members'
                  step at once (gpubackprop.train.pack_trainer.SharedBatches over
                  gpubackprop.nn.packed): the first layers of all members are one wide
                  GEMM, and the step's other work is paid once per group of members
                  instead of once per member. Member k equals its MLP trained alone on
                  that order of the rows, to the rounding of the GEMMs' sums (the same
                  bits where the pack's BLAS calls sum as the lone model's do).

Either way each member has its own hyperparameters, optimizer state and row
weights, and the data go to the device once for all members. A member whose
gradients go non-finite is stopped alone (its flagged step was skipped, so its
parameters are the last finite ones); the others train on, and ``stopped[k]``
names the step.
"""

import json
import warnings

import numpy as np

from .. import state, validation
from ..optim import SGD, Adam
from ..train.loop import SYNC_EVERY, validation_set, weight_total
from ..train.callbacks import call
from ..train.pack_trainer import SharedBatches, check_one_rule
from ..train.trainer import Trainer, check_clip_norm, check_optimizer
from .losses import HUBER_DELTA
from .mlp import MLP

FORMAT, VERSION = "gpubackprop.mlppack", "1"
OPTIMIZERS = {"sgd": SGD, "adam": Adam}
BATCHES = ("own", "shared")


class MLPPack:
    """K = ``members`` MLPs of layer sizes ``sizes``, member k seeded ``seed + k`` (or
    ``seeds[k]``); activation, loss, device, dtype and huber_delta as MLP's; ``dropout``
    a rate for every member or a list of K (each member's masks its own). A class of
    its own rather than ``MLP(..., members=K)``: every result gains a member axis
    (predict gives (K, n) labels, fit K histories), so no MLP method would keep its
    meaning."""

    def __init__(self, sizes, members=None, activation="relu", loss="cross_entropy", device="cpu", dtype="float32",
                 seed=0, seeds=None, huber_delta=HUBER_DELTA, dropout=0.0):
        if seeds is None:
            members = validation.check_positive_int("members", members)
            seeds = [validation.check_positive_int("seed", seed, minimum=0) + k for k in range(members)]
        seeds = [validation.check_positive_int("seeds[k]", s, minimum=0) for s in seeds]
        if members is not None and members != len(seeds):
            raise ValueError(f"members={members} but {len(seeds)} seeds were given")
        if not seeds:
            raise ValueError("a pack needs at least one member")
        self.models = [MLP(sizes, activation=activation, loss=loss, device=device, dtype=dtype, seed=s,
                           huber_delta=huber_delta, dropout=rate)
                       for s, rate in zip(seeds, _per_member("dropout", dropout, len(seeds)))]
        self.seeds = seeds
        self.stopped = [None] * len(seeds)  # the step at which each member was stopped, or None
        self._optimizers = None  # (their key, the members' optimizers) of the last fit
        self._trainers = None  # (their key, the members' trainers of those optimizers)

    @classmethod
    def of(cls, models):
        """A pack of MLPs that exist already (trained in place, as members): of one layer
        sizes, activation, loss, huber delta, device and dtype, as a pack's members are;
        each keeps its own seed, parameters and shuffle generator (their seeds are
        ``seeds``, None where a model has none). gpubackprop.sklearn.MLPSearchCV packs the
        models its estimators made."""
        models = list(models)
        if not models:
            raise ValueError("a pack needs at least one member")
        lead = models[0]
        for k, model in enumerate(models):
            if not isinstance(model, MLP):
                raise TypeError(f"models[{k}] is {type(model).__name__}, not a gpubackprop MLP")
            mine, theirs = _kind(model), _kind(lead)
            if mine != theirs:
                differ = ", ".join(f"{name} {a!r} vs {b!r}" for name, a, b in zip(KIND, mine, theirs) if a != b)
                raise ValueError(f"models[{k}] is not of models[0]'s kind ({differ}): a pack's members share "
                                 "their layer sizes, activation, loss, device and dtype")
        pack = cls.__new__(cls)
        pack.models, pack.seeds = models, [m.seed for m in models]
        pack.stopped, pack._optimizers, pack._trainers = [None] * len(models), None, None
        return pack

    @property
    def members(self):
        return len(self.models)

    @property
    def sizes(self):
        return self.models[0].sizes

    @property
    def params(self):
        """The members' flat parameter buffers as one (K, P) host array (a copy)."""
        return np.stack([m.backend.to_host(m.params) for m in self.models])

    def member(self, k):
        """Member k: the MLP itself (training or loading it changes the pack)."""
        return self.models[k]

    # ---- training -------------------------------------------------------------------
    def fit(self, X, y, epochs=10, batch_size=32, optimizer="adam", sample_weight=None, validation_data=None,
            shuffle=True, graphs=True, rows=None, callbacks=None, clip_norm=None, batches="own", **hyperparams):
        """Train every member ``epochs`` times over (X, y) in batches of ``batch_size``
        rows; returns K histories, each as MLP.fit's (a member's ends with the epoch in
        which it was stopped).

        batches       "own" (each member its own shuffle and lone steps) or "shared"
                      (member 0's batches for all, one step for all: see the module's
                      docstring); shared takes no per-member rows, epochs or batch sizes

        optimizer     "sgd" or "adam": gpubackprop.optim's SGD or Adam, one per member
                      (its state continues across fit calls while the optimizer and its
                      settings stay), whose hyperparameters (lr, weight_decay, momentum,
                      nesterov, betas, eps, decay_biases, ...) are each one value for
                      every member, or a list of K (a tuple is one value: betas=(0.9,
                      0.99) is every member's); or a list of K optimizer objects, one
                      per member (then no hyperparameters: they hold their own)
        epochs, batch_size  one number, or a list of K: each member's own
        sample_weight  (n,) for every member, or (K, n): each member's own weights (a
                      weight of 0 leaves a row out of its loss: a member's own subset)
        rows          None (every member trains on all of X), or a list of K arrays of
                      row indices: member k trains on X[rows[k]] (rows may repeat: a
                      bootstrap) exactly as a lone fit on X[rows[k]] does: its epochs
                      shuffle those rows with its own generator, its batches are
                      min(batch_size, len(rows[k])) rows, its metrics divide by their
                      count (or their weights' sum)
        callbacks     None, or a list of K lists: member k's callbacks, called as fit
                      calls them (on_train_begin, on_epoch_begin, on_batch_end with
                      {"batch_size"} only, on_epoch_end, on_train_end); a callback that
                      sets ``model.stop_training`` stops that member alone after its epoch
        validation_data  (X_val, y_val) or (X_val, y_val, sample_weight_val), as MLP.fit's:
                      every member's "val_" metrics after each of its epochs
        clip_norm, graphs  as MLP.fit's ("own" batches); clip_norm one or a list of K
        """
        lead = self.models[0]
        clip_norms = check_batches(batches, self.models, rows, epochs, batch_size, clip_norm)
        with lead.context():
            Xd, T = lead.prepare(X, y)  # once, shared by every member (one device, one dtype)
            W = self._weights(sample_weight, Xd.shape[0])
            val = validation_set(lead, validation_data)
        plans = member_plans(self.models, Xd.shape[0], W, epochs, batch_size, rows, callbacks)
        optimizers = self._optimizers_for(optimizer, hyperparams, batches)
        histories = [{} for _ in self.models]
        for model, plan in zip(self.models, plans):
            model.stop_training = False
            call(plan.callbacks, "on_train_begin", model)
        with lead.context(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # the guard speaks
            if batches == "own":
                trainers = self._trainers_for(optimizers, clip_norms, graphs)
                for epoch in range(max((plan.epochs for plan in plans), default=0)):
                    self._epoch(Xd, T, W, shuffle, trainers, histories, val, plans, epoch)
            else:
                self._fit_shared(Xd, T, W, shuffle, optimizers, histories, val, plans)
        for model, plan in zip(self.models, plans):
            call(plan.callbacks, "on_train_end", model)
        return histories

    def _epoch(self, Xd, T, W, shuffle, trainers, histories, val, plans, epoch):
        """One epoch of every member still training, over its own order of its rows; its
        metrics into ``histories``. Member after member: the members are independent,
        and one member's workspace stays in the caches for its whole epoch (step by step
        across the members measured 1.8x slower on the narrow net at K = 16)."""
        be = self.models[0].backend
        for k, (model, trainer, plan) in enumerate(zip(self.models, trainers, plans)):
            if epoch >= plan.epochs or plan.stopped or self.stopped[k] is not None:
                continue
            call(plan.callbacks, "on_epoch_begin", model, epoch)
            n = plan.n
            order = model.shuffle_rng.permutation(n) if shuffle else np.arange(n)
            order = be.asarray(order if plan.rows is None else plan.rows[order])
            running = be.zeros((2,), np.float64)
            for s, start in enumerate(range(0, n, plan.batch)):
                if self.stopped[k] is not None:
                    break
                ws = model.workspace(min(plan.batch, n - start))
                ws.first_row = 0
                be.xp.copyto(ws.index, order[start:start + ws.batch])
                trainer.step(ws, running, X=Xd, T=T, W=None if W is None else W[k])
                if s % SYNC_EVERY == SYNC_EVERY - 1 or start + plan.batch >= n:
                    self._stop_if_nonfinite(k, trainer)
                call(plan.callbacks, "on_batch_end", model, s, {"batch_size": ws.batch})
            trainer.optimizer.sync_steps()
            end_epoch(model, be.to_host(running), val, histories[k], plan, epoch)

    def _fit_shared(self, Xd, T, W, shuffle, optimizers, histories, val, plans):
        """The epochs of batches="shared" (SharedBatches), members stopped before frozen."""
        shared = SharedBatches(self.models, optimizers, plans[0].batch, [s is not None for s in self.stopped])
        try:
            for epoch in range(plans[0].epochs):
                self._shared_epoch(Xd, T, W, shuffle, shared, histories, val, plans, epoch)
        except BaseException:  # the members as far as they went: parameters and optimizers agree
            shared.sync()
            raise

    def _shared_epoch(self, Xd, T, W, shuffle, shared, histories, val, plans, epoch):
        """One epoch of every member still training on the same batches, member 0's order
        of the rows (SharedBatches: each step all members'); then their parameters and
        optimizers back in the members, their metrics, and their callbacks (whose changes
        to a learning rate the next step takes)."""
        n, be, K = Xd.shape[0], self.models[0].backend, self.members
        active = [k for k in range(K) if not plans[k].stopped and self.stopped[k] is None]
        if not active:
            return
        called = any(plans[k].callbacks for k in active)
        for k in active:
            call(plans[k].callbacks, "on_epoch_begin", self.models[k], epoch)
        order = be.asarray(self.models[0].shuffle_rng.permutation(n) if shuffle else np.arange(n))
        running, batch, last = be.zeros((K, 2), np.float64), plans[0].batch, {}
        for s, start in enumerate(range(0, n, batch)):
            if called:
                shared.refresh()
            shared.step(order[start:start + batch], running, Xd, T, W)
            for k, step, overflowed in shared.flagged():  # its metrics: of its steps before, as its own epoch's
                self.stopped[k], last[k] = step, np.array(be.to_host(running[k]))
                self._warn_stopped(k, overflowed, stacklevel=5)
            for k in active:
                if self.stopped[k] is None:
                    call(plans[k].callbacks, "on_batch_end", self.models[k], s, {"batch_size": min(batch, n - start)})
        shared.sync()
        running = be.to_host(running)
        for k in active:
            end_epoch(self.models[k], last.get(k, running[k]), val, histories[k], plans[k], epoch)
            if plans[k].stopped:
                shared.freeze(k)

    def _stop_if_nonfinite(self, k, trainer):
        """Member k stops where its guard flagged a step, a warning naming it (its flagged
        steps were skipped: the parameters are the last finite ones)."""
        if trainer.guard is None:
            return
        (flagged, first), (overflowed, first_overflow) = trainer.guard.poll()
        if flagged or overflowed:
            self.stopped[k] = first + 1 if flagged else first_overflow
            self._warn_stopped(k, overflowed and not flagged, stacklevel=5)

    def _warn_stopped(self, k, overflowed, stacklevel):
        how = "its update overflowed the parameters" if overflowed else \
            "its gradients went non-finite (the step was skipped)"
        warnings.warn(f"pack member {k} (seed {self.seeds[k]}) is stopped at step {self.stopped[k]}: {how}; "
                      "the others train on", RuntimeWarning, stacklevel=stacklevel)  # at the fit's caller

    def _optimizers_for(self, name, hyperparams, batches):
        """An optimizer per member: the members' own objects (a list of K), or "sgd" /
        "adam" with ``hyperparams``, kept from the last fit where the optimizer and its
        settings are the same, so that their state continues."""
        K = self.members
        if isinstance(name, (list, tuple)):
            if hyperparams:
                raise ValueError(f"optimizer is a list of optimizer objects, which hold their own settings: pass "
                                 f"{sorted(hyperparams)} to them, not to fit")
            if len(name) != K:
                raise ValueError(f"optimizer must be 'sgd', 'adam' or a list of {K} optimizers (one per member), "
                                 f"got a list of {len(name)}")
            optimizers = [check_optimizer(o) for o in name]
            if len({id(o) for o in optimizers}) != K:
                raise ValueError("each member needs an optimizer object of its own: one shared would mix their states")
            key = ("objects", tuple(id(o) for o in optimizers))
        elif name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be 'sgd' or 'adam' (or a list of {K} optimizer objects, one per "
                             f"member), got {name!r}")
        else:
            for key, value in hyperparams.items():
                if isinstance(value, (list, np.ndarray)):
                    _per_member(key, value, K)  # its length checked
            settings = [{key: value[k] if isinstance(value, (list, np.ndarray)) else value
                         for key, value in hyperparams.items()} for k in range(K)]
            key = (name, repr(settings))
            optimizers = None
        if self._optimizers is None or self._optimizers[0] != key:
            self._optimizers = key, optimizers or [OPTIMIZERS[name](**s) for s in settings]  # all checked first
        if batches == "shared":
            check_one_rule(self._optimizers[1])
        for model, optimizer in zip(self.models, self._optimizers[1]):
            model.optimizer = optimizer  # as fit leaves it
        return self._optimizers[1]

    def _trainers_for(self, optimizers, clip_norms, graphs):
        """Each member's Trainer of its optimizer and clip_norm, kept while they and ``graphs`` stay."""
        key = (tuple(id(o) for o in optimizers), tuple(clip_norms), graphs)  # the trainers hold the optimizers
        if self._trainers is None or self._trainers[0] != key:
            self._trainers = key, [Trainer(m, o, clip_norm=c, graphs=graphs)
                                   for m, o, c in zip(self.models, optimizers, clip_norms)]
        return self._trainers[1]

    def _weights(self, sample_weight, n):
        """None, or each member's weights on the device: (K, n)."""
        if sample_weight is None:
            return None
        w = np.asarray(sample_weight, np.float64)
        if w.ndim == 1:
            w = np.broadcast_to(w, (self.members, w.shape[0]))
        if w.ndim != 2 or w.shape[0] != self.members:
            raise ValueError(f"sample_weight must be (n,) or (members, n) = ({self.members}, {n}), got {w.shape}")
        return [self.models[0].prepare_weights(row, n) for row in w]

    # ---- the members' predictions, and files -------------------------------------------
    def predict(self, X, ensemble=False):
        """Every member's predictions stacked, (K, n) labels or (K, n, outputs) values;
        with ``ensemble``, the members' mean: of probabilities (then their argmax, or
        > 1/2 per output for binary cross entropy) for a classifier, of the outputs
        for a regressor."""
        if not ensemble:
            return np.stack([np.asarray(m.backend.to_host(m.predict(X))) for m in self.models])
        lead = self.models[0]
        if not lead.criterion.classifies:
            return np.mean([np.asarray(m.backend.to_host(m.predict(X))) for m in self.models], axis=0)
        proba = np.mean([np.asarray(m.backend.to_host(m.predict_proba(X))) for m in self.models], axis=0)
        return (proba > 0.5).astype(np.int64) if lead.criterion.output == "sigmoid" else proba.argmax(axis=1)

    def save(self, path):
        """One safetensors file: the (K, P) parameters, the sizes, seeds and settings."""
        lead = self.models[0]
        config = {"sizes": list(lead.sizes), "seeds": self.seeds, "activation": lead.activation, "loss": lead.loss,
                  "dtype": lead.dtype, "huber_delta": lead.criterion.delta, "dropout": [m.dropout for m in self.models]}
        state.save(path, {"params": np.ascontiguousarray(self.params)}, {"config": json.dumps(config)}, FORMAT, VERSION)

    @classmethod
    def load(cls, path, device="cpu"):
        tensors, meta = state.load(path, FORMAT, VERSION)
        pack = cls(**json.loads(meta["config"]), device=device)
        params = tensors["params"]
        if params.shape != (pack.members, pack.models[0].n_params):
            raise ValueError(f"{path}: parameters of shape {params.shape}, its config needs "
                             f"{(pack.members, pack.models[0].n_params)}")
        for model, row in zip(pack.models, params):
            model.parameters.assign(row)
        return pack


def end_epoch(model, running, val, history, plan, epoch):
    """A member's metrics of the epoch (MLP.fit's) into its ``history``, then its
    callbacks' on_epoch_end, which may stop it (``model.stop_training``)."""
    logs = model.metrics(running, plan.count)
    if val is not None:  # as fit's validation: the metrics of all of (X_val, y_val)
        logs.update({f"val_{name}": value for name, value in model.evaluation(*val).items()})
    for name, value in logs.items():
        history.setdefault(name, []).append(value)
    call(plan.callbacks, "on_epoch_end", model, epoch, logs)
    plan.stopped = bool(model.stop_training)


def member_plans(models, n, W, epochs, batch_size, rows, callbacks):
    """Each member's _Plan for a fit: its rows, epochs, batch size and callbacks."""
    K = len(models)
    epochs = [validation.check_positive_int("epochs", e, minimum=0) for e in _per_member("epochs", epochs, K)]
    batches = [validation.check_positive_int("batch_size", b) for b in _per_member("batch_size", batch_size, K)]
    if rows is None:
        rows = [None] * K
    elif len(rows) != K:
        raise ValueError(f"rows must be a list of {K} index arrays (one per member), got {len(rows)}")
    if callbacks is None:
        callbacks = [[] for _ in range(K)]
    elif len(callbacks) != K or not all(isinstance(c, (list, tuple)) for c in callbacks):
        raise ValueError(f"callbacks must be a list of {K} lists (each member's own callbacks)")
    be = models[0].backend
    plans = []
    for k in range(K):
        mine = None if rows[k] is None else _check_rows(k, rows[k], n)
        count = n if mine is None else len(mine)
        if W is not None:  # as fit: what the epoch's sums divide by, from the weights of its rows
            host = np.asarray(be.to_host(W[k]), np.float64)
            count = weight_total(host if mine is None else host[mine])
        plans.append(_Plan(mine, n if mine is None else len(mine), epochs[k], batches[k], count,
                           list(callbacks[k])))
    return plans


KIND = ("sizes", "activation", "loss", "huber_delta", "device", "dtype")


def _kind(model):
    """What a pack's members share (KIND's order)."""
    return (list(model.sizes), model.activation, model.loss, model.criterion.delta, model.device, model.dtype)


class _Plan:
    """One member's part of a fit: its rows (None: all n), epochs, batch size, what its
    epoch's sums divide by (``count``), callbacks, and whether they stopped it."""

    def __init__(self, rows, n, epochs, batch, count, callbacks):
        self.rows, self.n, self.epochs, self.count, self.callbacks = rows, n, epochs, count, callbacks
        self.batch = min(batch, n)  # as fit: no batch larger than the rows
        self.stopped = False


def _per_member(name, value, K):
    """One value for every member, or a list of K."""
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != K:
            raise ValueError(f"{name} must be one value for every member or a list of {K} (one per member), "
                             f"got {len(value)}")
        return list(value)
    return [value] * K


def _check_rows(k, rows, n):
    """Member k's row indices as an int64 host array: 1-D, not empty, in [0, n)."""
    arr = np.asarray(rows)
    if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu":
        raise ValueError(f"rows[{k}] must be a non-empty 1-D array of integer row indices, got {arr.dtype} of "
                         f"shape {arr.shape}")
    if arr.min() < 0 or arr.max() >= n:
        raise ValueError(f"rows[{k}] holds indices outside [0, {n}): X has {n} rows")
    return arr.astype(np.int64)


def check_batches(batches, models, rows, epochs, batch_size, clip_norm):
    """batches="own" or "shared", and what shared batches cannot take, refused before
    anything is done; returns each member's clip_norm."""
    if batches not in BATCHES:
        raise ValueError(f"batches must be one of {BATCHES}, got {batches!r}")
    clip_norms = [check_clip_norm(c) for c in _per_member("clip_norm", clip_norm, len(models))]
    if batches == "own":
        return clip_norms
    backend = models[0].backend
    if not backend.supports_members:
        raise NotImplementedError(f"batches='shared' needs the member-axis primitives, which {backend.name} "
                                  "does not have yet; use batches='own' there (each member its own steps)")
    for name, value in (("rows", rows), ("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, (list, tuple, np.ndarray)) and (name == "rows" or len(set(np.ravel(value))) > 1):
            raise ValueError(f"batches='shared' trains every member on the same batches: per-member {name} need "
                             "batches='own'")
    if any(c is not None for c in clip_norms) or any(m.dropout for m in models):
        raise ValueError("batches='shared' has no dropout or clip_norm yet: train members with them with "
                         "batches='own'")
    if any(m.precision != "float32" for m in models):
        raise ValueError(f"batches='shared' computes in the members' dtype; precision={models[0].precision!r} "
                         "needs batches='own'")
    return clip_norms
