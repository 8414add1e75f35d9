"""The multilayer perceptron: parameters in one flat buffer, forward, backward, fit.

For layers l = 1..L with weights W_l (n_l, n_{l-1}) and biases b_l (n_l,), a batch
of B samples flows as rows:

    a_0 = X,   z_l = a_{l-1} W_l^T + b_l,   a_l = g(z_l) (hidden),   a_L = z_L (logits)
    delta_L = dL/dz_L                       from the loss (gpubackprop.losses)
    dL/dW_l = delta_l^T a_{l-1},   dL/db_l = sum over the batch of delta_l
    delta_{l-1} = (delta_l W_l) * g'(z_{l-1})

Every W_l and b_l is a view into one flat parameter buffer, and every gradient a
view into one flat gradient buffer of the same layout, so an optimizer updates all
parameters in one pass. All per-step buffers live in a workspace made once per
batch size; a step allocates nothing after the first of its size.
"""

import collections
import contextlib
import functools
import os
import warnings

import numpy as np

from . import checkpoint, distributed, interop
from . import precision as precision_modes
from . import validation
from .activations import ACTIVATIONS, get_activation
from .backend import OutOfMemoryError, get_backend
from .losses import LOSSES
from .optim import Adam, Optimizer
from .callbacks import ProgressBar, call
from .dropout import Dropout
from .guard import POLICIES, Guard, describe

_IDENTITY = ACTIVATIONS["identity"]
DTYPES = ("float32", "float64")
_EVAL_BATCH = 2048
_WORKSPACES_KEPT = 4  # the training batch, its last partial batch, and evaluation's
_LOW_ALIGN = 8  # elements: 16 bytes of a 16-bit type
_GRAPHS_KEPT = 4  # captured steps of one fit: the full batch and the partial last one, and spares
_ONE_PROCESS = distributed.SingleProcess()


class _Workspace:
    """The buffers of one train step at batch size B (index l: layer l, 0 = input).

    a[l] activations, z[l] pre-activations (only where g' needs z), g[l] dL/da_l
    turned into delta_l in place, scratch[l] the activation's temporaries; index
    the rows of the data set this batch is gathered from, loss the batch's loss;
    d[l] the dropped activations fed to layer l + 1 (hidden layers, with dropout);
    first_row where the batch starts in the global batch (data parallel: a rank's
    shard; dropout masks are drawn by position in the global batch).
    """

    def __init__(self, backend, sizes, act, batch, dtype, dropout=False):
        L = len(sizes) - 1
        empty = backend.empty
        self.batch = batch
        self.first_row = 0
        self.a = [empty((batch, n), dtype) for n in sizes]
        self.g = [None] + [empty((batch, n), dtype) for n in sizes[1:]]
        self.z = [None] * (L + 1)
        self.scratch = [()] * (L + 1)
        for l in range(1, L):
            if act.needs_z:
                self.z[l] = empty((batch, sizes[l]), dtype)
            if backend.elementwise_scratch:
                self.scratch[l] = tuple(empty((batch, sizes[l]), dtype) for _ in range(act.n_scratch))
        self.target = empty((batch, sizes[-1]), dtype)
        self.row = empty((batch,), dtype)
        self.ones = backend.xp.ones((batch,), dtype)
        self.pred = empty((batch,), np.int64)
        self.label = empty((batch,), np.int64)
        self.hit = empty((batch,), np.bool_)
        self.index = empty((batch,), np.int64)
        self.loss = empty((), dtype)
        self.d = [None] * (L + 1)
        if dropout:
            for l in range(1, L):
                self.d[l] = empty((batch, sizes[l]), dtype)

    @staticmethod
    def nbytes(sizes, act, batch, itemsize, dropout=False, scratch=True):
        """The bytes __init__ allocates (``scratch``: the backend's elementwise_scratch;
        a test holds the two together)."""
        hidden = sum(sizes[1:-1])
        per_hidden = act.needs_z + act.n_scratch * bool(scratch) + bool(dropout)
        floats = batch * (sum(sizes) + sum(sizes[1:]) + hidden * per_hidden + sizes[-1] + 2) + 1
        return floats * itemsize + batch * (8 + 8 + 1 + 8)


class MLP:
    """A multilayer perceptron trained by backpropagation.

    sizes       layer widths, input first: [784, 256, 256, 10]
    activation  hidden activation: relu, leaky_relu, tanh, sigmoid, gelu, identity
                (the output layer is linear)
    loss        "cross_entropy" (softmax + mean negative log-likelihood) or
                "mse" (mean over all elements of (y_hat - y)^2)
    device      "cpu", "cuda", "cuda:N" or "auto"
    dtype       "float32" or "float64"
    precision   "float32" (exact), "tf32" (float32 GEMMs on tensor cores), or mixed
                precision "bf16" / "fp16" (16-bit activations and GEMMs, float32
                master weights; fp16 with dynamic loss scaling): see ``precision``
    seed        makes initialisation, shuffling and dropout reproducible
    dropout     the rate p at which hidden activations are dropped in training
                (inverted dropout; see gpubackprop.dropout)

    Weights start He-normal (std sqrt(2 / n_in)) for the ReLU family and
    Glorot-uniform (limit sqrt(6 / (n_in + n_out))) otherwise; biases at zero.
    """

    def __init__(self, sizes, activation="relu", loss="cross_entropy", device="cpu", dtype="float32", seed=None,
                 precision="float32", dropout=0.0):
        self.sizes = validation.check_sizes(sizes)
        self._act = get_activation(activation)
        self.activation = activation
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {list(LOSSES)}")
        self.loss = loss
        self.dtype = _check_dtype(dtype)
        self.precision = precision
        if seed is not None:
            seed = validation.check_positive_int("seed", seed, minimum=0)
        self.seed = seed
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be a rate in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        init_seq, shuffle_seq, dropout_seq = np.random.SeedSequence(seed).spawn(3)
        self._dropout_seed = int(dropout_seq.generate_state(1)[0])
        self._shuffle_rng = np.random.default_rng(shuffle_seq)
        self.backend = get_backend(device)
        precision_modes.check(precision, self.dtype, self.backend)
        self._compute_dtype = precision_modes.compute_dtype(precision, self.dtype)
        self.stop_training = False
        self.optimizer = None  # the last fit's
        self._clip_norm = self._guard = None  # during fit only
        self._comm = _ONE_PROCESS  # the fit's communicator while it runs
        self._graphs = None  # the fit's captured steps while it runs (see _fit_step)
        self._set_params(self._initial_params(np.random.default_rng(init_seq)))

    # ---- parameters -------------------------------------------------------------
    @property
    def device(self):
        return self.backend.name

    @property
    def n_params(self):
        return parameter_count(self.sizes)

    def _layout(self):
        """(weight slice, bias slice, out, in) of each layer in the flat buffer."""
        start = 0
        for n_in, n_out in zip(self.sizes[:-1], self.sizes[1:]):
            w_end = start + n_out * n_in
            yield slice(start, w_end), slice(w_end, w_end + n_out), n_out, n_in
            start = w_end + n_out

    def _initial_params(self, rng):
        # Drawn in float64 whatever the dtype, so float32 and float64 models of one
        # seed start from the same weights up to rounding.
        flat = np.zeros(self.n_params)
        for w, _, n_out, n_in in self._layout():
            if self._act.he_init:
                flat[w] = rng.normal(0.0, np.sqrt(2.0 / n_in), n_out * n_in)
            else:
                limit = np.sqrt(6.0 / (n_in + n_out))
                flat[w] = rng.uniform(-limit, limit, n_out * n_in)
        return flat

    def _set_params(self, flat_host):
        """Parameters (and in mixed precision their 16-bit copy: the GEMMs' weights
        ``_W``, ``_b``), gradients, and the loss scaler of fp16."""
        b = self.backend
        mixed = self._compute_dtype != np.dtype(self.dtype)
        starts, shifts, low_size = self._low_layout()
        with b.context():
            self._params = b.asarray(flat_host, dtype=self.dtype)
            self._grads = b.zeros(self._params.shape, self.dtype)
            self._low = b.empty((low_size,), self._compute_dtype) if mixed else None
            self._low_segments = (b.asarray(np.array(starts, np.int64)), b.asarray(np.array(shifts, np.int64))) \
                if mixed else None
            self._scaler = precision_modes.LossScaler(b) if self.precision == "fp16" else None
        weights, shift = (self._params, [0] * len(shifts)) if self._low is None else (self._low, shifts)
        self._W, self._b, self._dW, self._db = [], [], [], []
        for l, (w, bias, n_out, n_in) in enumerate(self._layout()):
            sw, sb = shift[2 * l], shift[2 * l + 1]
            self._W.append(weights[w.start + sw:w.stop + sw].reshape(n_out, n_in))
            self._b.append(weights[bias.start + sb:bias.stop + sb])
            self._dW.append(self._grads[w].reshape(n_out, n_in))
            self._db.append(self._grads[bias])
        self._workspaces = collections.OrderedDict()
        self._params_changed()

    def _low_layout(self):
        """Where each tensor (W_1, b_1, W_2, ...) sits in the 16-bit copy of mixed
        precision (see ``aligned_layout``): each starts at a multiple of 8 elements
        (16 bytes), as cuBLAS's tensor-core kernels need of a matrix's start; the
        flat buffer stays packed. (Its rows are n_{l-1} apart: aligned too when that
        width is a multiple of 8.)"""
        return aligned_layout([n for w, b, _, _ in self._layout() for n in (w.stop - w.start, b.stop - b.start)])

    def _params_changed(self):
        """Refresh the 16-bit copy of the parameters (mixed precision) after they changed."""
        if self._low is not None:
            with self.backend.context():
                self._cast_parameters()

    def _cast_parameters(self):
        self.backend.cast_parameters(self._params, self._low, *self._low_segments)

    def _names(self):
        for i in range(len(self.sizes) - 1):
            yield i, f"layers.{i}.weight", f"layers.{i}.bias"

    def _named(self, flat):
        """A host copy of a flat buffer (parameters or gradients), split under state_dict's names."""
        host = self.backend.to_host(flat).copy()
        d = {}
        for (_, wn, bn), (w, b, n_out, n_in) in zip(self._names(), self._layout()):
            d[wn], d[bn] = host[w].reshape(n_out, n_in), host[b]
        return d

    def state_dict(self):
        """Host NumPy copies: layers.{i}.weight (out, in) and layers.{i}.bias (out,)."""
        return self._named(self._params)

    def load_state_dict(self, state):
        """Copy parameters in; names, shapes, dtypes and values are all checked first."""
        if not hasattr(state, "keys"):
            raise TypeError(f"state_dict must be a mapping of names to arrays, got {type(state).__name__}")
        expected = {n for _, wn, bn in self._names() for n in (wn, bn)}
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise KeyError(f"state_dict does not match {self.sizes}: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        flat = np.empty(self.n_params, dtype=self.dtype)
        for (_, wn, bn), (w, b, n_out, n_in) in zip(self._names(), self._layout()):
            for name, sl, shape in ((wn, w, (n_out, n_in)), (bn, b, (n_out,))):
                arr = np.asarray(self.backend.to_host(state[name]))
                if arr.shape != shape:
                    raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")
                if arr.dtype.kind != "f":
                    raise TypeError(f"{name} has dtype {arr.dtype}, expected a float dtype")
                if not np.isfinite(arr).all():
                    raise ValueError(f"{name} contains NaN or Inf")
                flat[sl] = arr.ravel()
        with self.backend.context():
            self.backend.xp.copyto(self._params, self.backend.asarray(flat))
        self._params_changed()

    def to(self, device):
        """Move the model to ``device`` (in place; returns the model)."""
        backend = get_backend(device)
        precision_modes.check(self.precision, self.dtype, backend)
        if backend is not self.backend:
            host = self.backend.to_host(self._params)
            self.backend = backend
            self._set_params(host)
        return self

    # ---- one step -----------------------------------------------------------------
    def _context(self):
        """The device current, and the model's GEMM precision set on it."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.backend.context())
        stack.enter_context(self.backend.precision(self.precision))
        return stack

    def _workspace(self, batch):
        ws = self._workspaces.pop(batch, None)
        if ws is None:
            need = _Workspace.nbytes(self.sizes, self._act, batch, self._compute_dtype.itemsize, self.dropout > 0,
                                     self.backend.elementwise_scratch)
            free = self.backend.free_bytes()
            try:
                if free is not None and need > free:  # say so before trying, not after a failed allocation
                    raise MemoryError
                with self.backend.context():
                    ws = _Workspace(self.backend, self.sizes, self._act, batch, self._compute_dtype, self.dropout > 0)
            except MemoryError:
                raise self._out_of_memory(f"the buffers of a batch of {batch} rows", need, "use a smaller batch_size") from None
            while len(self._workspaces) >= _WORKSPACES_KEPT:
                _, evicted = self._workspaces.popitem(last=False)
                if self._graphs:  # a captured step on it would keep its memory alive, unaccounted
                    for key in [k for k, entry in self._graphs.items() if _holds(entry, evicted)]:
                        del self._graphs[key]
        self._workspaces[batch] = ws
        return ws

    def _dropout(self, ws, l, steps):
        """Layer l's Dropout in a train step (steps: the optimizer's device step count), else None."""
        if steps is None or not self.dropout or l in (0, len(self._W)):
            return None
        return Dropout(self.dropout, self._dropout_seed, steps, l, ws.d[l], ws.first_row * self.sizes[l])

    def _input(self, ws, l, steps):
        """What layer l + 1 reads: a_l, or its dropped copy in training."""
        return ws.a[l] if self._dropout(ws, l, steps) is None else ws.d[l]

    def _forward(self, ws, steps=None):
        """Forward pass; ``steps`` given means training (dropout on)."""
        L = len(self._W)
        for l in range(1, L + 1):
            act = self._act if l < L else _IDENTITY
            self.backend.dense_forward(self._input(ws, l - 1, steps), self._W[l - 1], self._b[l - 1], act, ws.a[l],
                                       ws.z[l], ws.scratch[l], dropout=self._dropout(ws, l, steps))

    def _loss(self, ws, running=None):
        scale = None if self._scaler is None else self._scaler.scale
        self.backend.loss(self.loss, ws.a[-1], ws.target, ws.g[-1], ws.loss, running,
                          (ws.row, ws.pred, ws.label, ws.hit), loss_scale=scale)
        return ws.loss

    def _backward(self, ws, steps=None):
        L = len(self._W)
        for l in range(L, 0, -1):
            act = self._act if l < L else _IDENTITY
            self.backend.dense_backward(
                ws.g[l], ws.a[l], ws.z[l], self._input(ws, l - 1, steps), self._W[l - 1], act, ws.scratch[l],
                self._dW[l - 1], self._db[l - 1], ws.g[l - 1] if l > 1 else None, ws.ones,
                dropout=self._dropout(ws, l, steps),
            )

    def _load_batch(self, X, T):
        ws = self._workspace(X.shape[0])
        ws.first_row = 0
        xp = self.backend.xp
        xp.copyto(ws.a[0], X)
        xp.copyto(ws.target, T)
        return ws

    def _prepare(self, X, y):
        """X and the target rows T, checked and copied to the device (once per call),
        in the compute dtype (16-bit in mixed precision)."""
        try:
            X = validation.check_X(X, self.sizes[0], self.dtype, self.backend)
            T = validation.check_targets(y, X.shape[0], self.loss, self.sizes[-1], self.dtype, self.backend)
            X, T = self._to_compute(X, "X"), self._to_compute(T, "the targets")
        except MemoryError:
            rows = len(X)
            need = rows * (self.sizes[0] + self.sizes[-1]) * np.dtype(self.dtype).itemsize
            raise self._out_of_memory(f"a copy of {rows} rows of data", need,
                                      "pass fewer rows at a time (fit on a subset, or call train_step per batch)") from None
        return X, T

    def _prepare_streamed(self, X, y):
        """A memory-mapped X checked without being read whole, and the targets on the device."""
        X = validation.check_X_on_disk(X, self.sizes[0])
        T = validation.check_targets(y, X.shape[0], self.loss, self.sizes[-1], self.dtype, self.backend)
        return X, self._to_compute(T, "the targets")

    def _to_compute(self, A, name):
        if A.dtype == self._compute_dtype:
            return A
        if self.precision == "fp16" and float(abs(A).max()) > precision_modes.FLOAT16_MAX:
            raise ValueError(f"{name} holds values beyond float16's range (65504); scale the data, "
                             "or use precision='bf16'")
        return A.astype(self._compute_dtype)

    def _out_of_memory(self, what, need, fix):
        free = self.backend.free_bytes()
        free = "" if free is None else f", {_megabytes(free)} free"
        return OutOfMemoryError(f"{self.device} ran out of memory allocating {what}: "
                                f"{_megabytes(need)} needed{free}; {fix}. The model is unchanged.")

    def loss_and_grad(self, X, y):
        """(loss, gradients under state_dict's names): one forward and backward pass, no update."""
        with self._context():
            ws = self._load_batch(*self._prepare(X, y))
            self._forward(ws)
            loss = float(self._loss(ws))
            self._backward(ws)
            if self._scaler is not None:  # fp16: the gradients of the loss, not of S times it
                self._scaler.unscale_and_check(self._grads)
                self._scaler.found_inf.fill(0)
            return loss, self._named(self._grads)

    def train_step(self, X, y, optimizer):
        """One forward, backward and optimizer update on the batch (X, y); returns the loss."""
        _check_optimizer(optimizer)
        with self._context():
            ws = self._load_batch(*self._prepare(X, y))
            optimizer._bind(self)
            loss = float(self._step(ws, optimizer))
            optimizer._sync_steps()  # fp16 may have skipped the step
            return loss

    def _step(self, ws, optimizer, running=None, reduce=None):
        """Forward, loss, backward and update; the loss (a device scalar). Data
        parallel: ``reduce`` turns this rank's gradients into the global batch's, and
        ``ws`` None means this rank's share of the batch is empty (gradients zero)."""
        steps = optimizer._steps_on_device
        loss = None
        if ws is None:
            self._grads.fill(0)
        else:
            self._forward(ws, steps)
            loss = self._loss(ws, running)
            self._backward(ws, steps)
        if reduce is not None:
            reduce(self._grads)
        found_inf = None
        if self._scaler is not None:  # fp16: unscale, and skip the update if the gradients overflowed
            self._scaler.unscale_and_check(self._grads)
            found_inf = self._scaler.found_inf
        elif self._guard is not None:  # skip a step with Inf / NaN gradients (see guard.py)
            self._guard.check(self._grads)
            found_inf = self._guard.flag
        if self._clip_norm is not None:
            self.backend.clip_by_global_norm(self._grads, self._clip_norm)
        optimizer._apply(self.backend, self._params, self._grads, found_inf=found_inf)
        if self._scaler is not None:
            self._scaler.update()
        elif self._guard is not None:
            self._guard.after_update(self._params, optimizer._steps_on_device)
        if self._low is not None:
            self._cast_parameters()
        return loss

    # ---- training -------------------------------------------------------------------
    def fit(self, X, y, epochs=10, batch_size=32, optimizer=None, shuffle=True,
            validation_data=None, progress=True, callbacks=None, graphs=True, clip_norm=None,
            checkpoint_dir=None, checkpoint_every=None, keep_checkpoints=3, resume=False,
            on_nonfinite="raise", comm=None):
        """Mini-batch training, reshuffled every epoch; returns the history.

        The history is a dict of per-epoch lists: "loss" and "accuracy" (cross
        entropy) or "mse", averaged over the epoch's batches as they were trained,
        and "val_loss", "val_accuracy" / "val_mse" when ``validation_data=(X, y)``.
        The optimizer defaults to Adam(lr=1e-3) and stays as ``model.optimizer``.
        ``callbacks`` are gpubackprop.callbacks objects (or any with some of their
        hooks); ``progress`` adds a ProgressBar. ``clip_norm`` rescales the
        gradients whenever their global L2 norm exceeds it (torch's clip_grad_norm_).

        ``checkpoint_dir`` with ``checkpoint_every=N`` saves a checkpoint every N
        steps (keeping the newest ``keep_checkpoints``); ``resume=True`` continues
        from the newest sound one there, to the same result, bit for bit on the
        CPU, as a run never interrupted (see gpubackprop.checkpoint).

        A step whose gradients hold Inf or NaN is skipped on the device; then
        ``on_nonfinite`` "raise" (FloatingPointError naming the step and tensors),
        "skip" (warn and go on) or "restore" (the newest checkpoint, half the
        learning rate): see gpubackprop.guard. The model never holds NaN.

        Where the backend captures graphs (CUDA), the second step on the same
        buffers (a batch size's workspace, the optimizer's state, the data) is
        captured whole (gathering the batch, forward, loss, backward, update) and
        every later one is a graph launch; new buffers (a workspace made again
        after others pushed it out) are captured anew. ``graphs=False`` runs every
        step op by op instead (for debugging: the numbers are the same).

        ``comm`` (from ``gpubackprop.distributed.init()``) trains data parallel: each
        of its ranks passes the whole data set, trains on its shard of every global
        batch of ``batch_size`` rows, and the model ends equal on all ranks and to
        one process's (see gpubackprop.distributed). Rank 0 alone shows progress
        and writes checkpoints; an error on any rank aborts the job.
        """
        comm = _ONE_PROCESS if comm is None else _check_comm(comm, self.backend)
        try:  # on every rank, checks and data included: a failure anywhere aborts the job
            epochs = validation.check_positive_int("epochs", epochs, minimum=0)
            batch_size = validation.check_positive_int("batch_size", batch_size)
            optimizer = Adam() if optimizer is None else _check_optimizer(optimizer)
            if clip_norm is not None and not (isinstance(clip_norm, (int, float)) and clip_norm > 0):
                raise ValueError(f"clip_norm must be a positive number or None, got {clip_norm!r}")
            callbacks = list(callbacks or ())
            if (checkpoint_every is not None or resume or on_nonfinite == "restore") and checkpoint_dir is None:
                raise ValueError("checkpoint_every, resume and on_nonfinite='restore' need checkpoint_dir")
            if on_nonfinite not in POLICIES:
                raise ValueError(f"on_nonfinite must be one of {POLICIES}, got {on_nonfinite!r}")
            if checkpoint_every is not None:
                checkpoint_every = validation.check_positive_int("checkpoint_every", checkpoint_every)
            keep_checkpoints = validation.check_positive_int("keep_checkpoints", keep_checkpoints)
            with self._context():
                # The data set goes to the device once and batches are gathered there; a
                # memory-mapped X stays on disk and each batch's rows are read as needed.
                if isinstance(X, np.memmap):
                    X_disk, T = self._prepare_streamed(X, y)
                    X = X_disk
                else:
                    X_disk = None
                    X, T = self._prepare(X, y)
                val = self._prepare(*validation_data) if validation_data is not None else None
                self._comm = comm
                return self._train(X, X_disk, T, val, epochs, batch_size, optimizer, shuffle, progress, callbacks,
                                   graphs, clip_norm, checkpoint_dir, checkpoint_every, keep_checkpoints, resume,
                                   on_nonfinite)
        except BaseException as e:
            if comm.size > 1:  # the other ranks would wait for this one forever
                comm.abort(e)
            raise
        finally:
            self._comm, self._graphs = _ONE_PROCESS, None

    def _train(self, X, X_disk, T, val, epochs, batch_size, optimizer, shuffle, progress, callbacks, graphs,
               clip_norm, checkpoint_dir, checkpoint_every, keep_checkpoints, resume, on_nonfinite):
        """fit's loop, on data already checked and on the device."""
        b, xp, comm = self.backend, self.backend.xp, self._comm
        root = comm.rank == 0
        parallel = comm.parallel
        n = X.shape[0]
        root_n = comm.bcast(n)
        if root_n != n:
            raise ValueError(f"rank {comm.rank} has {n} training rows, rank 0 has {root_n}: "
                             "every rank must pass the whole data set (fit shards it)")
        try:
            optimizer._bind(self)  # its state allocated now, not after a step has begun
        except MemoryError:
            need = self._params.nbytes * (len(optimizer._buffers) + optimizer.scratch_buffers(self.backend))
            raise self._out_of_memory(f"the state of {optimizer!r}", need,
                                      "use SGD without momentum, or a smaller model") from None
        if resume:
            start = self._resume(checkpoint_dir, optimizer)
            if root and os.path.isdir(checkpoint_dir):
                checkpoint.prune(checkpoint_dir, keep_checkpoints)
        else:
            start = None
            if parallel:
                self._adopt_root(optimizer)
        batch_size = min(batch_size, n)
        steps = -(-n // batch_size)
        if progress and root:
            callbacks.append(ProgressBar(epochs, steps))
        history = collections.defaultdict(list, start["history"] if start else {})
        # This rank's share of the epoch's [sum of batch losses * batch sizes, rows
        # predicted right], accumulated on the device: no host sync per step.
        running = b.zeros((2,), np.float64)
        first_epoch, done_steps = (start["epoch"], start["step"]) if start else (0, 0)
        # A step is captured whole; one with a collective in its middle is not (yet).
        graphs = self._graphs = {} if graphs and b.supports_graphs and not parallel else None
        self.stop_training = False
        self.optimizer, self._clip_norm = optimizer, clip_norm
        self._guard = Guard(b) if self._scaler is None else None
        call(callbacks, "on_train_begin", self)
        for epoch in range(first_epoch, epochs):
            call(callbacks, "on_epoch_begin", self, epoch)
            epoch_rng = self._shuffle_rng.bit_generator.state
            # Drawn on the host from the model's seeded generator, so a seed gives
            # the same batches on every device (and every rank); one small copy per epoch.
            order_host = self._shuffle_rng.permutation(n) if shuffle else np.arange(n)
            order = b.asarray(order_host)
            running.fill(0)
            if epoch == first_epoch and start and root:  # the checkpoint holds all ranks' sums
                xp.copyto(running, b.asarray(np.array(start["running"], np.float64)))
            for s, start_row in enumerate(range(0, n, batch_size)):
                if epoch == first_epoch and s < done_steps:
                    continue  # done before the checkpoint this run resumed from
                rows = min(batch_size, n - start_row)
                lo, hi = distributed.shard(rows, comm.rank, comm.size)
                ws = self._workspace(hi - lo) if hi > lo else None  # None: this rank's shard is empty
                if ws is not None:
                    ws.first_row = lo
                    xp.copyto(ws.index, order[start_row + lo:start_row + hi])
                    if X_disk is not None:
                        mine = order_host[start_row + lo:start_row + hi]
                        xp.copyto(ws.a[0], b.asarray(self._to_compute(np.asarray(X_disk[mine], self.dtype), "X")))
                reduce = functools.partial(comm.allreduce_mean, weight=(hi - lo) / rows) if parallel else None
                self._fit_step(ws, None if X_disk is not None else X, T, optimizer, running, graphs, reduce)
                logs = {"batch_size": rows}
                if s % 16 == 15:  # reading the loss is a device sync: not every step
                    logs["loss"] = self._totals(running)[0] / min(n, start_row + rows)
                    self._nonfinite(on_nonfinite, optimizer, checkpoint_dir)
                call(callbacks, "on_batch_end", self, s, logs)
                if checkpoint_every and optimizer.steps % checkpoint_every == 0:
                    optimizer._sync_steps()
                    totals = self._totals(running)
                    if root:
                        checkpoint.write(checkpoint_dir, self, optimizer, {
                            "epoch": epoch, "step": s + 1, "rng": epoch_rng,
                            "running": totals.tolist(), "history": dict(history),
                        }, keep_checkpoints)
            self._nonfinite(on_nonfinite, optimizer, checkpoint_dir)
            optimizer._sync_steps()
            logs = self._logs(self._totals(running), n)
            if val is not None:
                logs.update({f"val_{k}": v for k, v in self._evaluate(*val).items()})
            for k, v in logs.items():
                history[k].append(v)
            call(callbacks, "on_epoch_end", self, epoch, logs)
            self.stop_training = comm.bcast(self.stop_training)  # rank 0's callbacks decide for all
            if self.stop_training:
                break
        self._clip_norm = self._guard = None
        call(callbacks, "on_train_end", self)
        return dict(history)

    def _totals(self, running):
        """The running [loss sum, hits] of all ranks, on the host (a device sync)."""
        totals = self.backend.to_host(running).copy()
        self._comm.allreduce_sum(totals)
        return totals

    def _adopt_root(self, optimizer):
        """Every rank takes rank 0's parameters, optimizer (hyperparameters, step count,
        state), loss scale, shuffle state and dropout seed: data parallel, the ranks
        start equal and stay so."""
        comm, b = self._comm, self.backend
        scaler = self._scaler and [b.to_host(x).copy() for x in (self._scaler.scale, self._scaler.clean_steps)]
        kind, hyperparams, steps, rng, seed, scaler = comm.bcast(
            (type(optimizer).__name__, optimizer.hyperparams, optimizer.steps, self._shuffle_rng.bit_generator.state,
             self._dropout_seed, scaler))
        if comm.rank != 0:
            if kind != type(optimizer).__name__:
                raise ValueError(f"rank {comm.rank} trains with {optimizer!r}, rank 0 with a {kind}: "
                                 "every rank must use the same optimizer")
            optimizer.load_state_dict({"type": kind, "hyperparams": hyperparams, "steps": steps, "state": {}})
            optimizer._bind(self)
            self._shuffle_rng.bit_generator.state, self._dropout_seed = rng, seed
            if scaler is not None:
                for dst, src in zip((self._scaler.scale, self._scaler.clean_steps), scaler):
                    b.xp.copyto(dst, b.asarray(src))
        comm.bcast_params(self._params)
        self._params_changed()
        for name in optimizer._buffers:
            comm.bcast_params(optimizer.state[name])

    def _resume(self, directory, optimizer):
        """Load the newest sound checkpoint in ``directory`` into the model and the
        optimizer, and the shuffle state; its progress (see gpubackprop.checkpoint),
        or None if there is none."""
        progress = self._restore(directory, optimizer)
        if progress is not None:
            self._shuffle_rng.bit_generator.state = progress["rng"]
        return progress

    def _restore(self, directory, optimizer):
        """Parameters and optimizer state from the newest sound checkpoint; its progress,
        or None. Rank 0 reads it and the other ranks take its state."""
        found = checkpoint.latest(directory) if self._comm.rank == 0 else None
        progress = None
        if found is not None:
            path, saved, saved_optimizer, progress = found
            if saved.config() != self.config():
                raise ValueError(f"{path} is a checkpoint of {saved!r}, not of this {self!r}")
            optimizer.load_state_dict(saved_optimizer.state_dict())
            self.load_state_dict(saved.state_dict())
            optimizer._bind(self)
        if self._comm.parallel:
            progress = self._comm.bcast(progress)
            self._adopt_root(optimizer)
        return progress

    def _nonfinite(self, policy, optimizer, checkpoint_dir):
        """Apply ``on_nonfinite`` to the steps the guard skipped since it last looked."""
        if self._guard is None:
            return
        (new, first), (overflowed, first_overflow) = self._guard.poll()
        if overflowed:
            what = (f"the update of step {first_overflow} made parameters non-finite "
                    f"({describe(self.state_dict())}) from finite gradients: the learning rate is too high")
            if policy != "restore":
                raise FloatingPointError(f"{what}. An applied update cannot be skipped; lower the learning rate, "
                                         "or fit(on_nonfinite='restore', checkpoint_dir=...)")
            new, first = max(new, 1), first_overflow - 1
        if not new:
            return
        what = f"{new} step(s) had non-finite gradients or updates, the first at step {first + 1}"
        if policy == "raise":
            raise FloatingPointError(
                f"{what}: {describe(self._named(self._grads))}. Those updates were skipped, so the model holds its "
                "last finite parameters. Lower the learning rate, clip gradients (fit(clip_norm=...)), check the "
                "data, or pass on_nonfinite='skip' or 'restore'")
        if policy == "restore":
            if self._restore(checkpoint_dir, optimizer) is None:
                raise FloatingPointError(f"{what}, and {checkpoint_dir} holds no checkpoint to restore; "
                                         "set checkpoint_every")
            optimizer.lr = optimizer.lr / 2
            what += f"; restored the newest checkpoint and halved the learning rate to {optimizer.lr:g}"
        else:
            what += "; their updates were skipped"
        warnings.warn(what, RuntimeWarning, stacklevel=3)

    def _fit_step(self, ws, X, T, optimizer, running, graphs, reduce=None):
        """One step on the rows ws.index of (X, T), eagerly or as a graph launch."""
        b = self.backend

        def step():
            if X is not None and ws is not None:  # else fit has read the batch from a memory-mapped X already
                b.gather_rows(X, ws.index, ws.a[0])
            if ws is not None:
                b.gather_rows(T, ws.index, ws.target)
            self._step(ws, optimizer, running, reduce)

        optimizer._bind(self)  # a no-op unless a callback swapped its state
        if graphs is None:
            return step()
        buffers, constants = optimizer._captured()
        buffers += (ws, X, T, running, self._params, self._grads, self._low, self._low_segments, self._scaler,
                     self._guard)
        # The buffers' identity, not a batch size: a new workspace of the same size (the
        # old one evicted by other sizes) or new optimizer state is a new step. Ids
        # cannot be reused while a captured step holds the buffers.
        key = tuple(map(id, buffers)) + (constants, self._clip_norm, self.precision)
        captured = graphs.pop(key, None)
        if captured is None:  # the first step of its kind runs eagerly: kernels load, scratch is sized
            graphs[key] = buffers  # held, so that no other buffer takes one of their ids meanwhile
            step()
        elif isinstance(captured, tuple):
            graphs[key] = _CapturedStep(b, step, buffers)  # counts this step on the host, as step() would
            graphs[key].launch()
        else:
            graphs[key] = captured
            optimizer.steps += 1
            captured.launch()
        while len(graphs) > _GRAPHS_KEPT:  # the least recently used goes, with its buffers
            graphs.pop(next(iter(graphs)))

    # ---- inference ----------------------------------------------------------------------
    def _batches(self, X, T=None):
        """Forward passes over X in chunks; yields (workspace, rows)."""
        for start in range(0, X.shape[0], _EVAL_BATCH):
            rows = slice(start, start + _EVAL_BATCH)
            ws = self._workspace(X[rows].shape[0])
            self.backend.xp.copyto(ws.a[0], X[rows])
            if T is not None:
                self.backend.xp.copyto(ws.target, T[rows])
            self._forward(ws)
            yield ws, rows

    def _outputs(self, X, kind):
        """Run X forward and collect "logits", "proba" or "labels" on the device."""
        b, xp = self.backend, self.backend.xp
        Xd = self._to_compute(validation.check_X(X, self.sizes[0], self.dtype, b), "X")
        out = b.empty((Xd.shape[0],) if kind == "labels" else (Xd.shape[0], self.sizes[-1]),
                      np.int64 if kind == "labels" else self.dtype)
        row = b.empty((min(Xd.shape[0], _EVAL_BATCH),), self.dtype) if kind == "proba" else None
        for ws, rows in self._batches(Xd):
            if kind == "labels":
                xp.argmax(ws.a[-1], axis=1, out=ws.pred)
                out[rows] = ws.pred
            elif kind == "proba":  # in the model's dtype, from the logits
                out[rows] = ws.a[-1]
                b.softmax(out[rows], out[rows], row[:ws.batch])
            else:
                out[rows] = ws.a[-1]
        return interop.like(X, out, b)

    def forward(self, X):
        """The network's raw outputs (logits for cross entropy), no softmax."""
        with self._context():
            return self._outputs(X, "logits")

    def predict(self, X):
        """Class labels (cross_entropy) or outputs (mse) for the rows of X."""
        with self._context():
            return self._outputs(X, "labels" if self.loss == "cross_entropy" else "logits")

    def predict_proba(self, X):
        """Softmax class probabilities, (n, classes)."""
        if self.loss != "cross_entropy":
            raise ValueError("predict_proba needs a cross_entropy model; use predict for an mse model")
        with self._context():
            return self._outputs(X, "proba")

    def evaluate(self, X, y):
        """{"loss", "accuracy"} for cross entropy, {"loss", "mse"} for mse, over all of X."""
        with self._context():
            return self._evaluate(*self._prepare(X, y))

    def _evaluate(self, X, T):
        """Loss and metric over (X, T); in a data-parallel fit each rank evaluates its shard of the rows."""
        lo, hi = distributed.shard(X.shape[0], self._comm.rank, self._comm.size)
        running = self.backend.zeros((2,), np.float64)
        for ws, _ in self._batches(X[lo:hi], T[lo:hi]):
            self._loss(ws, running)
        return self._logs(self._totals(running), X.shape[0])

    def _logs(self, totals, n):
        """The metrics from the host's [loss sum, hits] over n samples."""
        total_loss, correct = totals
        logs = {"loss": float(total_loss) / n}
        if self.loss == "cross_entropy":
            logs["accuracy"] = int(correct) / n
        else:
            logs["mse"] = logs["loss"]
        return logs

    # ---- files -----------------------------------------------------------------------
    def save(self, path, optimizer=None, metadata=None):
        """Write a safetensors file (atomically); see gpubackprop.io.save."""
        from . import io

        io.save(self, path, optimizer=optimizer, metadata=metadata)

    @classmethod
    def load(cls, path, device="cpu"):
        from . import io

        return io.load(path, device=device)

    def config(self):
        return {"sizes": list(self.sizes), "activation": self.activation, "loss": self.loss, "dtype": self.dtype,
                "precision": self.precision, "dropout": self.dropout}

    def __repr__(self):
        return (f"MLP({self.sizes}, activation={self.activation!r}, loss={self.loss!r}, "
                f"device={self.device!r}, dtype={self.dtype!r}, precision={self.precision!r}"
                + (f", dropout={self.dropout})" if self.dropout else ")"))


class _CapturedStep:
    """A train step recorded once (``backend.capture``) and replayed by ``launch``.

    A recording holds addresses, not arrays: it holds the model's, the optimizer's
    and the workspace's buffers it reads or writes (``buffers``; the backend's own
    reduction scratch and cuBLAS workspace live as long as the backend), so none of
    them can be freed, and its memory handed to another array, while the step may
    still be replayed.
    """

    def __init__(self, backend, step, buffers):
        self.buffers = buffers
        self._graph = backend.capture(step)

    def launch(self):
        self._graph.launch()


def aligned_layout(lengths, align=_LOW_ALIGN):
    """For tensors of ``lengths`` packed one after another in a flat buffer: (their
    starts there, the shift that moves each to the next start at a multiple of
    ``align`` in a copy, the copy's size)."""
    starts, shifts, packed, end = [], [], 0, 0
    for n in lengths:
        at = -(-end // align) * align
        starts.append(packed)
        shifts.append(at - packed)
        packed, end = packed + n, at + n
    return starts, shifts, end


def _holds(entry, buffer):
    """Whether a fit's graph entry (a _CapturedStep, or the buffers of a step about to
    be captured) holds ``buffer``."""
    buffers = entry.buffers if isinstance(entry, _CapturedStep) else entry
    return any(b is buffer for b in buffers)


def parameter_count(sizes):
    """Weights and biases of an MLP with layer widths ``sizes``: sum of n_l (n_{l-1} + 1)."""
    return sum(o * i + o for i, o in zip(sizes[:-1], sizes[1:]))


def _megabytes(n):
    return f"{n / 2**20:,.1f} MiB"


def _check_dtype(dtype):
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return name


def _check_comm(comm, backend):
    if not isinstance(comm, distributed.Communicator):
        raise TypeError(f"comm must be a gpubackprop.distributed communicator (gb.distributed.init()), got {comm!r}")
    if isinstance(comm, distributed.NCCLCommunicator) and backend.name != comm.device:
        raise ValueError(f"this rank's NCCL communicator is bound to {comm.device} but the model is on "
                         f"{backend.name}; make the model with device=comm.device")
    return comm


def _check_optimizer(optimizer):
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a gpubackprop.optim optimizer such as SGD(lr=0.1), got {optimizer!r}")
    return optimizer

