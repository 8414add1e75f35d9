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
from ..train.pack_trainer import SharedBatches
from ..train.trainer import Trainer
from .losses import HUBER_DELTA
from .mlp import MLP

FORMAT, VERSION = "gpubackprop.mlppack", "1"
OPTIMIZERS = {"sgd": SGD, "adam": Adam}
BATCHES = ("own", "shared")


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
        self._optimizers = None  # ((optimizer, settings), the members' optimizers) of the last fit
        self._trainers = None  # (graphs, the members' trainers of those optimizers)

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
            shuffle=True, graphs=True, batches="own", **hyperparams):
        """Train every member ``epochs`` times over (X, y) in batches of ``batch_size``
        rows; returns K histories, each as MLP.fit's.

        batches       "own": each member draws its own shuffle and runs its own lone
                      steps, so that member k equals ``MLP(seed=seeds[k]).fit`` bit for
                      bit. "shared": every member trains on the same batches, member 0's
                      shuffle (so member k equals a lone fit of its seed on that order
                      of rows, to rounding: see gpubackprop.nn.packed), in one step for
                      all members whose first layer is one wide GEMM; on the CPU.
        optimizer     "sgd" or "adam": gpubackprop.optim's SGD or Adam, one per member
                      (its state continues across fit calls while the optimizer and its
                      settings stay), whose hyperparameters (lr, weight_decay, momentum,
                      nesterov, betas, eps, decay_biases, ...) are each one value for
                      every member, or a list of K (a tuple is one value: betas=(0.9,
                      0.99) is every member's)
        sample_weight  (n,) for every member, or (K, n): each member's own weights (a
                      weight of 0 leaves a row out of its loss: a member's own subset)
        validation_data  (X_val, y_val) or (X_val, y_val, sample_weight_val), as MLP.fit's:
                      every member's "val_" metrics after each of its epochs
        graphs        as MLP.fit's: each member's step captured where the backend can
                      ("own" batches)
        """
        if batches not in BATCHES:
            raise ValueError(f"batches must be one of {BATCHES}, got {batches!r}")
        lead = self.models[0]
        if batches == "shared" and not lead.backend.supports_members:
            raise NotImplementedError(f"batches='shared' needs the member-axis primitives, which {lead.backend.name} "
                                      "does not have yet; use batches='own' there (each member its own steps)")
        with lead.context():
            Xd, T = lead.prepare(X, y)  # once, shared by every member (one device, one dtype)
            W = self._weights(sample_weight, Xd.shape[0])
            val = validation_set(lead, validation_data)
        epochs = validation.check_positive_int("epochs", epochs, minimum=0)
        batch = min(validation.check_positive_int("batch_size", batch_size), Xd.shape[0])
        optimizers = self._optimizers_for(optimizer, hyperparams)
        histories = [{} for _ in self.models]
        with lead.context(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # the guard speaks
            if batches == "own":
                trainers = self._trainers_for(optimizers, graphs)
                for _ in range(epochs):
                    self._epoch(Xd, T, W, batch, shuffle, trainers, histories, val)
            else:
                shared = SharedBatches(self.models, optimizers, batch)
                for _ in range(epochs):
                    self._shared_epoch(Xd, T, W, batch, shuffle, shared, histories, val)
                shared.store_state()
        return histories

    def _epoch(self, Xd, T, W, batch, shuffle, trainers, histories, val=None):
        """One epoch of every member over its own order of the rows; its metrics into
        ``histories``. Member after member: the members are independent, and one
        member's workspace stays in the caches for its whole epoch (step by step across
        the members measured 1.8x slower on the narrow net at K = 16)."""
        n, be = Xd.shape[0], self.models[0].backend
        idle = [s is not None for s in self.stopped]
        for k, (model, trainer) in enumerate(zip(self.models, trainers)):
            order = be.asarray(model.shuffle_rng.permutation(n) if shuffle else np.arange(n))
            running = be.zeros((2,), np.float64)
            for s, start in enumerate(range(0, n, batch)):
                if self.stopped[k] is not None:
                    break
                ws = model.workspace(min(batch, n - start))
                ws.first_row = 0
                be.xp.copyto(ws.index, order[start:start + ws.batch])
                trainer.step(ws, running, X=Xd, T=T, W=None if W is None else W[k])
                if s % SYNC_EVERY == SYNC_EVERY - 1 or start + batch >= n:
                    self._stop_if_nonfinite(k, trainer)
            trainer.optimizer.sync_steps()
            self._log_epoch(k, be.to_host(running), W, n, val, histories[k], idle[k])

    def _shared_epoch(self, Xd, T, W, batch, shuffle, shared, histories, val=None):
        """One epoch of every member on the same batches, member 0's order of the rows
        (SharedBatches: each step all members'); then the parameters back into the members."""
        n, be, K = Xd.shape[0], self.models[0].backend, self.members
        idle = [s is not None for s in self.stopped]
        order = be.asarray(self.models[0].shuffle_rng.permutation(n) if shuffle else np.arange(n))
        running = be.zeros((K, 2), np.float64)
        for start in range(0, n, batch):
            shared.step(order[start:start + batch], running, Xd, T, W)
            for k, step, overflowed in shared.flagged():
                self.stopped[k] = step
                self._warn_stopped(k, overflowed)
        shared.sync()
        running = be.to_host(running)
        for k in range(K):
            self._log_epoch(k, running[k], W, n, val, histories[k], idle[k])

    def _log_epoch(self, k, running, W, n, val, history, idle):
        """Member k's metrics of the epoch (MLP.fit's) into its ``history``: NaN where it
        was stopped before the epoch began (it trained no more)."""
        model, be = self.models[k], self.models[k].backend
        count = n if W is None else weight_total(np.asarray(be.to_host(W[k]), np.float64))
        logs = model.metrics(running, count)
        if val is not None:  # as fit's validation: the metrics of all of (X_val, y_val)
            logs.update({f"val_{name}": value for name, value in model.evaluation(*val).items()})
        for name, value in logs.items():
            history.setdefault(name, []).append(float("nan") if idle else value)

    def _stop_if_nonfinite(self, k, trainer):
        """Member k stops where its guard flagged a step, a warning naming it (its flagged
        steps were skipped: the parameters are the last finite ones)."""
        if trainer.guard is None:
            return
        (flagged, first), (overflowed, first_overflow) = trainer.guard.poll()
        if flagged or overflowed:
            self.stopped[k] = first + 1 if flagged else first_overflow
            self._warn_stopped(k, overflowed and not flagged)

    def _warn_stopped(self, k, overflowed):
        how = "its update overflowed the parameters" if overflowed else \
            "its gradients went non-finite (the step was skipped)"
        warnings.warn(f"pack member {k} (seed {self.seeds[k]}) is stopped at step {self.stopped[k]}: {how}; "
                      "the others train on", RuntimeWarning, stacklevel=5)

    def _optimizers_for(self, name, hyperparams):
        """An optimizer per member, kept from the last fit where the optimizer and its
        settings are the same, so that its state continues."""
        if name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}")
        K = self.members
        for key, value in hyperparams.items():
            if isinstance(value, (list, np.ndarray)) and len(value) != K:
                raise ValueError(f"{key} must be one value for every member or a list of {K} (one per member), "
                                 f"got {len(value)}")
        settings = [{key: value[k] if isinstance(value, (list, np.ndarray)) else value
                     for key, value in hyperparams.items()} for k in range(K)]
        key = (name, repr(settings))
        if self._optimizers is None or self._optimizers[0] != key:
            self._optimizers = key, [OPTIMIZERS[name](**s) for s in settings]  # all checked before any is used
            self._trainers = None
        for model, optimizer in zip(self.models, self._optimizers[1]):
            model.optimizer = optimizer  # as fit leaves it
        return self._optimizers[1]

    def _trainers_for(self, optimizers, graphs):
        """Each member's Trainer of its optimizer, kept while the optimizers and ``graphs`` stay."""
        if self._trainers is None or self._trainers[0] != graphs:
            self._trainers = graphs, [Trainer(m, o, graphs=graphs) for m, o in zip(self.models, optimizers)]
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
