"""MLPPack: K MLPs of the same layer sizes trained together, one step for all of them.

Every array gains a member axis k in front. The parameters are one (K, P) buffer
whose row k is laid out as one MLP's flat buffer (gpubackprop.nn.parameters), so
``member(k)`` is an MLP holding exactly that row; activations are (K, B, n_l). For
member k and its own batch of B rows:

    z_l = a_{l-1} W_l^T + b_l,   a_l = g(z_l)            one batched GEMM for all K
    L_k = sum_i s_ki l_ki                                 the loss table's row losses
                                                          (s_ki = 1/B, or w_ki / sum_i w_ki)
    dL_k/dW_l = delta_l^T a_{l-1},  dL_k/db_l = sum over the batch of delta_l
    delta_{l-1} = (delta_l W_l) * g'(z_{l-1})

and each member's own gpubackprop.optim optimizer over its row of the buffers (the
lone model's fused update, with the member's own hyperparameters). Member k trains
as ``MLP(sizes, seed=seeds[k])`` trained alone with ``fit`` on the same data and
settings: the same initial values, its own shuffle of the rows each epoch, the
same batches, the same update. The elementwise work and the reductions run as
NumPy calls over all members rather than the lone model's fused loops, so the two
agree to rounding (tests/nn/test_pack.py holds them to it), not bit for bit.

A member whose loss or gradients go non-finite is stopped alone: its optimizer
steps no more, so its parameters stay at the last finite step's; the others train
on, and ``stopped[k]`` names the step. This version runs on the CPU backend (NumPy); the members' rows are the
lone model's layout, so a CUDA path (batched GEMMs, the kernels with a member
axis) can take the same buffers.
"""

import json
import warnings

import numpy as np

from .. import optim, state, validation
from ..backend import get_backend
from . import losses
from .activations import get_activation
from .losses import HUBER_DELTA, get_loss
from .mlp import MLP
from .network import DTYPES, seed_streams
from .parameters import initial_values, layout

FORMAT, VERSION = "gpubackprop.mlppack", "1"
CPU = get_backend("cpu")  # where a pack computes in this version


class MLPPack:
    """K = ``members`` MLPs of layer sizes ``sizes``, member k seeded ``seed + k`` (or
    ``seeds[k]``); activation, loss, dtype and huber_delta as MLP's. Why a class of its
    own rather than ``MLP(..., members=K)``: every result gains a member axis (predict
    gives (K, n) labels, fit K histories), so no MLP method would keep its meaning."""

    def __init__(self, sizes, members=None, activation="relu", loss="cross_entropy", dtype="float32", seed=0,
                 seeds=None, huber_delta=HUBER_DELTA):
        self.sizes = validation.check_sizes(sizes)
        if seeds is None:
            members = validation.check_positive_int("members", members)
            seeds = [validation.check_positive_int("seed", seed, minimum=0) + k for k in range(members)]
        self.seeds = [validation.check_positive_int("seeds[k]", s, minimum=0) for s in seeds]
        if members is not None and members != len(self.seeds):
            raise ValueError(f"members={members} but {len(self.seeds)} seeds were given")
        if not self.seeds:
            raise ValueError("a pack needs at least one member")
        self.activation, self.loss = activation, loss
        self.act, self.criterion = get_activation(activation), get_loss(loss, huber_delta)
        if np.dtype(dtype).name not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.dtype = np.dtype(dtype)
        streams = [seed_streams(s) for s in self.seeds]
        self.shuffle_rngs = [rng for _, rng, _ in streams]
        self.params = np.stack([initial_values(self.sizes, self.act, init) for init, _, _ in streams]).astype(self.dtype)
        self.grads = np.zeros_like(self.params)
        self.stopped = [None] * len(self.seeds)  # the step at which each member was stopped, or None
        self._kept = None  # ((optimizer, settings), the members' optimizers) of the last fit

    @property
    def members(self):
        return len(self.seeds)

    def layers(self, flat):
        """Per layer, (W (K, out, in), b (K, out)): views into the (K, P) buffer ``flat``."""
        K = self.members
        return [(flat[:, w].reshape(K, n_out, n_in), flat[:, b]) for w, b, n_out, n_in in layout(self.sizes)]

    # ---- the passes ---------------------------------------------------------------------
    def forward(self, X):
        """The activations a_0..a_L of every member, a_0 = X: (K, B, n_0) rows of each
        member's own batch, or (B, n_0) rows shared by all."""
        a = [X]
        L = len(self.sizes) - 1
        for l, (W, b) in enumerate(self.layers(self.params), start=1):
            z = np.matmul(_output(a[-1]), W.transpose(0, 2, 1))
            z += b[:, None, :]
            if l < L:
                out = np.empty_like(z) if self.act.needs_z else z
                self.act.forward(np, z, out, tuple(np.empty_like(z) for _ in range(self.act.n_scratch)))
                a.append((z, out) if self.act.needs_z else out)
            else:
                a.append(z)
        return a

    def backward(self, a, delta):
        """The gradients into ``grads`` from delta_L = dL_k/dz_L (K, B, n_L), back through ``a``."""
        L = len(self.sizes) - 1
        grads, params = self.layers(self.grads), self.layers(self.params)
        for l in range(L, 0, -1):
            dW, db = grads[l - 1]
            prev = _output(a[l - 1])
            np.matmul(delta.transpose(0, 2, 1), prev if prev.ndim == 3 else prev[None], out=dW)
            np.sum(delta, axis=1, out=db)
            if l > 1:
                grad = np.matmul(delta, params[l - 1][0])
                z, out = a[l - 1] if self.act.needs_z else (None, a[l - 1])
                if self.act.backward is not None:
                    self.act.backward(np, grad, out, z, tuple(np.empty_like(grad) for _ in range(self.act.n_scratch)))
                delta = grad

    def loss_and_delta(self, z, T, W=None):
        """(L_k (K,), hits_k (K,), delta_L): the loss table's row losses of logits z
        (K, B, C) against targets T, each member's batch mean (weighted by W (K, B))."""
        K, B, C = z.shape
        delta, row = np.empty((K * B, C), z.dtype), np.empty(K * B, z.dtype)
        z2, T2 = z.reshape(K * B, C), T.reshape(K * B, C)
        self.criterion.numpy(np, z2, T2, delta, row, self.criterion.delta)
        if W is None:
            s = np.full((K, B), 1.0 / B, z.dtype)
        else:
            total = W.sum(axis=1, keepdims=True)
            s = np.divide(W, total, out=np.zeros_like(W), where=total > 0).astype(z.dtype)
        cols = C if self.criterion.elementwise else 1
        s = s / z.dtype.type(cols)
        delta = delta.reshape(K, B, C) * s[..., None]
        value = (row.reshape(K, B) * s).sum(axis=1)
        hits = losses.hits(np, self.criterion, z2, T2)
        hits = None if hits is None else hits.reshape(K, B).astype(np.float64)
        return value, (None if hits is None else hits if W is None else hits * W), delta

    # ---- training -------------------------------------------------------------------
    def fit(self, X, y, epochs=10, batch_size=32, optimizer="adam", sample_weight=None, shuffle=True,
            **hyperparams):
        """Train every member ``epochs`` times over (X, y) in batches of ``batch_size``
        rows, each member shuffling the rows by its own seed; returns K histories as
        MLP.fit's ({"loss": [...], and the loss's metric}).

        optimizer     "sgd" or "adam": gpubackprop.optim's SGD or Adam, one per member
                      (its state continues across fit calls while the optimizer and
                      its settings stay), whose hyperparameters (lr, weight_decay,
                      momentum, nesterov, betas, eps, decay_biases, ...) are each one
                      value for every member, or a list of K (a tuple is one value:
                      betas=(0.9, 0.99) is every member's)
        sample_weight  (n,) for every member, or (K, n): a member's own weights (a
                      weight of 0 leaves a row out of its loss)
        """
        Xd, T = self._data(X, y)
        n, K = Xd.shape[0], self.members
        W = None if sample_weight is None else np.broadcast_to(self._weights(sample_weight, n), (K, n))  # (K, n)
        epochs = validation.check_positive_int("epochs", epochs, minimum=0)
        batch = min(validation.check_positive_int("batch_size", batch_size), n)
        optimizers = self._optimizers(optimizer, hyperparams)
        histories = [{} for _ in range(K)]
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # a stopped member's warning speaks
            for _ in range(epochs):
                self._epoch(Xd, T, W, batch, shuffle, optimizers, histories)
        return histories

    def _epoch(self, Xd, T, W, batch, shuffle, optimizers, histories):
        """One epoch of every member over its own shuffle of the rows; its metrics into ``histories``."""
        n, K = Xd.shape[0], self.members
        orders = np.stack([rng.permutation(n) if shuffle else np.arange(n) for rng in self.shuffle_rngs])
        running = np.zeros((2, K))
        for start in range(0, n, batch):
            rows = orders[:, start:start + batch]
            Wb = None if W is None else np.take_along_axis(W, rows, axis=1).astype(self.dtype)
            running += self._step(Xd[rows], T[rows], Wb, optimizers)
        totals = np.full(K, n, np.float64) if W is None else W.sum(axis=1)
        for k in range(K):
            for name, value in losses.metrics(self.criterion, running[:, k], totals[k], self.sizes[-1]).items():
                histories[k].setdefault(name, []).append(value)

    def _step(self, Xb, Tb, Wb, optimizers):
        """One step of every member on its batch; returns [loss * count, hits] per member."""
        a = self.forward(Xb)
        value, hits, delta = self.loss_and_delta(a[-1], Tb, Wb)
        self.backward(a, delta)
        self._stop_nonfinite(value, max(o.steps for o in optimizers) + 1)
        for optimizer, stopped in zip(optimizers, self.stopped):
            if stopped is None:  # a stopped member keeps its last finite parameters
                optimizer.step()
        count = Xb.shape[1] if Wb is None else Wb.sum(axis=1)
        return np.stack([value * count, np.zeros_like(value) if hits is None else hits.sum(axis=1)])

    def _stop_nonfinite(self, value, step):
        """Members whose loss or gradients are not finite stop now (a warning names them)."""
        finite = np.isfinite(value) & np.isfinite(np.einsum("kp,kp->k", self.grads, self.grads))
        for k in np.flatnonzero(~finite):
            if self.stopped[k] is None:
                self.stopped[k] = step
                warnings.warn(f"pack member {k} (seed {self.seeds[k]}) went non-finite at step {step} and is stopped; "
                              "the others train on", RuntimeWarning, stacklevel=5)

    def _optimizers(self, name, hyperparams):
        """One gpubackprop.optim optimizer per member, bound to its rows of the buffers
        (its own fused update on the CPU backend, as a lone MLP's): kept from the last fit
        where the optimizer and its settings are the same, so that its state continues."""
        rules = {"sgd": optim.SGD, "adam": optim.Adam}
        if name not in rules:
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}")
        K = self.members
        for key, value in hyperparams.items():
            if isinstance(value, (list, np.ndarray)) and len(value) != K:
                raise ValueError(f"{key} must be one value for every member or a list of {K} (one per member), "
                                 f"got {len(value)}")
        settings = [{key: value[k] if isinstance(value, (list, np.ndarray)) else value
                     for key, value in hyperparams.items()} for k in range(K)]
        if self._kept is not None and self._kept[0] == (name, repr(settings)):
            return self._kept[1]
        slices = layout(self.sizes)
        optimizers = [rules[name](**s, params=optim.Flat(CPU, self.params[k], self.grads[k],
                                                         tuple(w for w, _, _, _ in slices)))
                      for k, s in enumerate(settings)]
        self._kept = ((name, repr(settings)), optimizers)
        return optimizers

    def _data(self, X, y):
        """X (n, n_0) and the dense targets T (n, n_L) on the host, in the pack's dtype."""
        Xd = validation.check_X(X, self.sizes[0], self.dtype, CPU)
        return Xd, validation.check_targets(y, Xd.shape[0], self.criterion, self.sizes[-1], self.dtype, CPU)

    def _weights(self, sample_weight, n):
        w = np.asarray(sample_weight, np.float64)
        rows = w.reshape(-1, n) if w.ndim == 2 else w.reshape(1, -1)
        if rows.shape[0] not in (1, self.members):
            raise ValueError(f"sample_weight must be (n,) or (members, n) = ({self.members}, {n}), got {w.shape}")
        return np.stack([validation.check_sample_weight(r, n, np.float64, CPU) for r in rows])

    # ---- the members -----------------------------------------------------------------------
    def member(self, k):
        """Member k as an MLP of its own (a copy), seeded as the member was."""
        model = MLP(self.sizes, activation=self.activation, loss=self.loss, dtype=self.dtype.name,
                    seed=self.seeds[k], huber_delta=self.criterion.delta)
        model.parameters.assign(self.params[k])
        return model

    def predict(self, X, ensemble=False):
        """Every member's predictions, (K, n) labels or (K, n, outputs) values; with
        ``ensemble``, the members' mean: of probabilities (then their argmax) for a
        classifier, of the outputs for a regressor."""
        Xd = validation.check_X(X, self.sizes[0], self.dtype, CPU)
        z = _output(self.forward(Xd)[-1])
        out = np.empty_like(z)
        losses.output(np, self.criterion, z.reshape(-1, z.shape[-1]), out.reshape(-1, z.shape[-1]),
                      np.empty(z.shape[0] * z.shape[1], z.dtype))
        if not self.criterion.classifies:
            return out.mean(axis=0) if ensemble else out
        proba = out.mean(axis=0) if ensemble else out
        if self.criterion.output == "sigmoid":
            return (proba > 0.5).astype(np.int64) if ensemble else (z > 0).astype(np.int64)
        return proba.argmax(axis=-1)

    def save(self, path):
        """One safetensors file: the (K, P) parameters, the sizes, seeds and settings."""
        config = {"sizes": self.sizes, "seeds": self.seeds, "activation": self.activation, "loss": self.loss,
                  "dtype": self.dtype.name, "huber_delta": self.criterion.delta}
        state.save(path, {"params": np.ascontiguousarray(self.params)}, {"config": json.dumps(config)}, FORMAT, VERSION)

    @classmethod
    def load(cls, path):
        tensors, meta = state.load(path, FORMAT, VERSION)
        pack = cls(**json.loads(meta["config"]))
        if tensors["params"].shape != pack.params.shape:
            raise ValueError(f"{path}: parameters of shape {tensors['params'].shape}, its config needs "
                             f"{pack.params.shape}")
        pack.params[...] = tensors["params"]
        return pack


def _output(a):
    """A layer's output from forward's list: a_l itself, or (z_l, a_l) where g' needs z."""
    return a[1] if isinstance(a, tuple) else a
