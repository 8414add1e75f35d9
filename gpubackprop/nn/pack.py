"""MLPPack: K MLPs of the same layer sizes trained together, epoch by epoch.

Member k is ``MLP(sizes, seed=seeds[k])`` and trains as that MLP trained alone with
``fit`` on the same data and settings, bit for bit: every step of the pack is each
member's own train step (gpubackprop.train.Trainer: forward, loss, backward, the
divergence guard, its own optimizer's update, a captured CUDA graph where the
backend captures), on its own shuffle of the rows, with its own hyperparameters
and row weights; an epoch runs member after member. The data go to the device once
for all members; each epoch, each member draws its order from its own shuffle
generator, as ``fit`` does.

What a pack saves over K fits one after another is the per-fit work (checks, the
data's copies, the loop's bookkeeping) and the waits between them, not arithmetic:
its steps are the members' own, so it costs about what K fits cost on the CPU
(bench/pack_bench.py measures it), while a batched step over a member axis (one
GEMM for all members, the kernels with a member axis) is not built yet. A member
whose gradients go non-finite is stopped alone (its guard skipped the step, so its
parameters are the last finite ones); the others train on, and ``stopped[k]``
names the step.

Each member may have its own rows of the data (``rows``: a fold, a bootstrap
resample; it trains as a lone fit on X[rows[k]]), callbacks (one that sets
``model.stop_training`` stops its member alone: gpubackprop.sklearn's stop rules),
epochs, batch size and optimizer object; ``MLPPack.of`` packs MLPs made elsewhere
(gpubackprop.sklearn.MLPSearchCV's and the ensembles' estimators' models).
"""

import json
import warnings

import numpy as np

from .. import state, validation
from ..optim import SGD, Adam
from ..train.loop import SYNC_EVERY, validation_set, weight_total
from ..train.callbacks import call
from ..train.trainer import Trainer, check_optimizer
from .losses import HUBER_DELTA
from .mlp import MLP

FORMAT, VERSION = "gpubackprop.mlppack", "1"
OPTIMIZERS = {"sgd": SGD, "adam": Adam}


class MLPPack:
    """K = ``members`` MLPs of layer sizes ``sizes``, member k seeded ``seed + k`` (or
    ``seeds[k]``); activation, loss, device, dtype and huber_delta as MLP's. A class of
    its own rather than ``MLP(..., members=K)``: every result gains a member axis
    (predict gives (K, n) labels, fit K histories), so no MLP method would keep its
    meaning."""

    def __init__(self, sizes, members=None, activation="relu", loss="cross_entropy", device="cpu", dtype="float32",
                 seed=0, seeds=None, huber_delta=HUBER_DELTA):
        if seeds is None:
            members = validation.check_positive_int("members", members)
            seeds = [validation.check_positive_int("seed", seed, minimum=0) + k for k in range(members)]
        seeds = [validation.check_positive_int("seeds[k]", s, minimum=0) for s in seeds]
        if members is not None and members != len(seeds):
            raise ValueError(f"members={members} but {len(seeds)} seeds were given")
        if not seeds:
            raise ValueError("a pack needs at least one member")
        self.models = [MLP(sizes, activation=activation, loss=loss, device=device, dtype=dtype, seed=s,
                           huber_delta=huber_delta) for s in seeds]
        self.seeds = seeds
        self.stopped = [None] * len(seeds)  # the step at which each member was stopped, or None
        self._trainers = None  # ((optimizer, settings, graphs), the members' trainers) of the last fit

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
        pack.stopped, pack._trainers = [None] * len(models), None
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
            shuffle=True, graphs=True, rows=None, callbacks=None, **hyperparams):
        """Train every member ``epochs`` times over (X, y) in batches of ``batch_size``
        rows, each on its own shuffle; returns K histories, each as MLP.fit's.

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
        graphs        as MLP.fit's: each member's step captured where the backend can
        """
        lead = self.models[0]
        with lead.context():
            Xd, T = lead.prepare(X, y)  # once, shared by every member (one device, one dtype)
            W = self._weights(sample_weight, Xd.shape[0])
            val = validation_set(lead, validation_data)
        plans = self._plans(Xd.shape[0], W, epochs, batch_size, rows, callbacks)
        trainers = self._trainers_for(optimizer, hyperparams, graphs)
        histories = [{} for _ in self.models]
        for model, plan in zip(self.models, plans):
            model.stop_training = False
            call(plan.callbacks, "on_train_begin", model)
        with lead.context(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # the guard speaks
            for epoch in range(max((plan.epochs for plan in plans), default=0)):
                self._epoch(Xd, T, W, shuffle, trainers, histories, val, plans, epoch)
        for model, plan in zip(self.models, plans):
            call(plan.callbacks, "on_train_end", model)
        return histories

    def _plans(self, n, W, epochs, batch_size, rows, callbacks):
        """Each member's _Plan for a fit: its rows, epochs, batch size and callbacks."""
        K = self.members
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
        be = self.models[0].backend
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
            logs = model.metrics(be.to_host(running), plan.count)
            if val is not None:  # as fit's validation: the metrics of all of (X_val, y_val)
                logs.update({f"val_{name}": value for name, value in model.evaluation(*val).items()})
            for name, value in logs.items():
                histories[k].setdefault(name, []).append(value)
            call(plan.callbacks, "on_epoch_end", model, epoch, logs)
            plan.stopped = bool(model.stop_training)

    def _stop_if_nonfinite(self, k, trainer):
        """Member k stops where its guard flagged a step, a warning naming it (its flagged
        steps were skipped: the parameters are the last finite ones)."""
        if trainer.guard is None:
            return
        (flagged, first), (overflowed, first_overflow) = trainer.guard.poll()
        if flagged or overflowed:
            self.stopped[k] = first + 1 if flagged else first_overflow
            how = "its update overflowed the parameters" if overflowed and not flagged else \
                "its gradients went non-finite (the step was skipped)"
            warnings.warn(f"pack member {k} (seed {self.seeds[k]}) is stopped at step {self.stopped[k]}: {how}; "
                          "the others train on", RuntimeWarning, stacklevel=5)

    def _trainers_for(self, name, hyperparams, graphs):
        """A Trainer and an optimizer per member, kept from the last fit where the
        optimizer and its settings are the same, so that its state continues."""
        if isinstance(name, (list, tuple)):
            return self._trainers_of(list(name), hyperparams, graphs)
        if name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}")
        K = self.members
        for key, value in hyperparams.items():
            if isinstance(value, (list, np.ndarray)) and len(value) != K:
                raise ValueError(f"{key} must be one value for every member or a list of {K} (one per member), "
                                 f"got {len(value)}")
        settings = [{key: value[k] if isinstance(value, (list, np.ndarray)) else value
                     for key, value in hyperparams.items()} for k in range(K)]
        key = (name, repr(settings), graphs)
        if self._trainers is None or self._trainers[0] != key:
            optimizers = [OPTIMIZERS[name](**s) for s in settings]  # all checked before any is bound
            self._trainers = key, [Trainer(m, o, graphs=graphs) for m, o in zip(self.models, optimizers)]
            for model, optimizer in zip(self.models, optimizers):
                model.optimizer = optimizer  # as fit leaves it
        return self._trainers[1]

    def _trainers_of(self, optimizers, hyperparams, graphs):
        """A Trainer per member for the members' own optimizer objects (kept while they
        are the same objects, as their state is theirs)."""
        K = self.members
        if hyperparams:
            raise ValueError(f"optimizer is a list of optimizer objects, which hold their own settings: pass "
                             f"{sorted(hyperparams)} to them, not to fit")
        if len(optimizers) != K:
            raise ValueError(f"optimizer must be 'sgd', 'adam' or a list of {K} optimizers (one per member), "
                             f"got a list of {len(optimizers)}")
        optimizers = [check_optimizer(o) for o in optimizers]
        if len({id(o) for o in optimizers}) != K:
            raise ValueError("each member needs an optimizer object of its own: one shared would mix their states")
        key = ("objects", tuple(optimizers), graphs)  # optimizers compare by identity
        if self._trainers is None or self._trainers[0] != key:
            self._trainers = key, [Trainer(m, o, graphs=graphs) for m, o in zip(self.models, optimizers)]
            for model, optimizer in zip(self.models, optimizers):
                model.optimizer = optimizer  # as fit leaves it
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
                  "dtype": lead.dtype, "huber_delta": lead.criterion.delta}
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
