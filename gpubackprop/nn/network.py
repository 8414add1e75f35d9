"""The network: parameters, forward, loss and backward on a workspace, inference.

For layers l = 1..L with weights W_l (n_l, n_{l-1}) and biases b_l (n_l,), a batch
of B samples flows as rows:

    a_0 = X,   z_l = a_{l-1} W_l^T + b_l,   a_l = g(z_l) (hidden),   a_L = z_L (logits)
    delta_L = dL/dz_L                       from the loss (gpubackprop.nn.losses)
    dL/dW_l = delta_l^T a_{l-1},   dL/db_l = sum over the batch of delta_l
    delta_{l-1} = (delta_l W_l) * g'(z_{l-1})

This is the engine's public API, the one the trainer, the tools (trace,
gradcheck), the benchmarks and the tests use, as tiny-cuda-nn's Network
``forward_impl`` / ``backward_impl`` with a context:

    ws = net.load_batch(X, y)           # checked, copied to the device, in a Workspace
                                        # (sample_weight=w: the loss is their weighted mean)
    net.forward_pass(ws)                # ws.a[l] (and ws.z[l] where g' needs z)
    net.compute_loss(ws)                # ws.loss, and ws.delta[L] = dL/dz_L
    net.backward_pass(ws)               # net.grads: dL/dW_l, dL/db_l; ws.delta[l] = delta_l

inside ``with net.context():`` (the device current, the GEMM precision set).
Training (the optimizer, clipping, the guard) is gpubackprop.train's.
"""

import contextlib

import numpy as np

from .. import interop, validation
from ..backend import get_backend
from ..optim import precision as precision_modes
from . import inputs
from .activations import get_activation
from .dropout import Dropout
from .losses import HUBER_DELTA, get_loss, metrics, output
from .parameters import Parameters, initial_values, layout, parameter_count
from .workspace import Workspaces

DTYPES = ("float32", "float64")
REFERENCE_DTYPE = "longdouble"  # on the CPU only: gradcheck's side of finite differences
EVAL_BATCH = 2048


class Network:
    """A multilayer perceptron's parameters and passes (see the module docstring;
    gpubackprop.MLP adds training and files). Arguments as MLP's."""

    def __init__(self, sizes, activation="relu", loss="cross_entropy", device="cpu", dtype="float32", seed=None,
                 precision="float32", dropout=0.0, huber_delta=HUBER_DELTA):
        self.sizes = validation.check_sizes(sizes)
        self.act = get_activation(activation)
        self.activation = activation
        self.criterion = get_loss(loss, huber_delta)  # the Loss: its maths, outputs, metric and targets
        self.loss = loss
        self.backend = get_backend(device)
        self.dtype = _check_dtype(dtype, self.backend)
        self.precision = precision
        if seed is not None:
            seed = validation.check_positive_int("seed", seed, minimum=0)
        self.seed = seed
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be a rate in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        init_rng, self.shuffle_rng, self.dropout_seed = seed_streams(seed)
        precision_modes.check(precision, self.dtype, self.backend)
        self.compute_dtype = precision_modes.compute_dtype(precision, self.dtype)
        self._build(initial_values(self.sizes, self.act, init_rng))

    def _build(self, flat_host):
        """Parameters, the loss scaler of fp16 and the workspaces on the current backend."""
        self.parameters = Parameters(self.backend, self.sizes, self.act, self.dtype, self.compute_dtype, flat_host)
        self.scaler = precision_modes.LossScaler(self.backend) if self.precision == "fp16" else None
        self.workspaces = Workspaces(self.backend, self.sizes, self.act, self.compute_dtype, self.dropout > 0)

    # ---- parameters -------------------------------------------------------------
    @property
    def device(self):
        return self.backend.name

    @property
    def n_params(self):
        return parameter_count(self.sizes)

    @property
    def params(self):
        """The flat parameter buffer (on the device)."""
        return self.parameters.flat

    @property
    def weight_slices(self):
        """Where each W_l lies in the flat buffers (the biases lie between them)."""
        return tuple(w for w, _, _, _ in layout(self.sizes))

    @property
    def grads(self):
        """The flat gradient buffer: dL/dW_l, dL/db_l of the latest backward pass."""
        return self.parameters.grads

    @property
    def layers(self):
        """Per layer, a backend.Dense of views: W, b (16-bit in mixed precision), dW, db, g."""
        return self.parameters.layers

    def buffers(self):
        """What a captured train step of this network reads and writes, beside the workspace's."""
        return (*self.parameters.buffers(), self.scaler)

    def state_dict(self):
        """Host NumPy copies: layers.{i}.weight (out, in) and layers.{i}.bias (out,)."""
        return self.parameters.named(self.params)

    def grad_dict(self):
        """The latest gradients, as state_dict names them (host copies)."""
        return self.parameters.named(self.grads)

    def load_state_dict(self, state):
        """Copy parameters in; names, shapes, dtypes and values are all checked first."""
        self.parameters.load(state)

    def to(self, device):
        """Move the network to ``device`` (in place; returns it)."""
        backend = get_backend(device)
        precision_modes.check(self.precision, self.dtype, backend)
        if backend is not self.backend:
            host = self.backend.to_host(self.params)
            self.backend = backend
            self._build(host)
        return self

    # ---- the passes -------------------------------------------------------------
    def context(self):
        """The device current, and the network's GEMM precision set on it."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.backend.context())
        stack.enter_context(self.backend.precision(self.precision))
        return stack

    def workspace(self, batch):
        """The Workspace for ``batch`` rows (made on first use, then kept)."""
        return self.workspaces.get(batch)

    def prepare(self, X, y):
        """X and the target rows T checked and copied to the device, in the compute dtype."""
        return inputs.prepare(self, X, y)

    def prepare_weights(self, sample_weight, n):
        """Sample weights for n rows checked and copied to the device (None for None)."""
        return inputs.weights(self, sample_weight, n)

    def load_batch(self, X, y, sample_weight=None):
        """A workspace holding the batch (X, y), and its rows' weights, checked and copied to the device."""
        X, T = self.prepare(X, y)
        W = self.prepare_weights(sample_weight, X.shape[0])
        ws = self.workspace(X.shape[0])
        ws.first_row = 0
        self.backend.xp.copyto(ws.a[0], X)
        self.backend.xp.copyto(ws.target, T)
        ws.set_weights(self.backend, W)
        return ws

    def dropout_for(self, ws, l, steps):
        """Layer l's Dropout in a train step (steps: the optimizer's device step count), else None."""
        if steps is None or not self.dropout or l in (0, len(self.sizes) - 1):
            return None
        return Dropout(self.dropout, self.dropout_seed, steps, l, ws.dropped[l], ws.first_row * self.sizes[l])

    def forward_pass(self, ws, steps=None):
        """a_l = g(a_{l-1} W_l^T + b_l) for every layer; ``steps`` given means training
        (dropout on, its masks drawn from that device step count)."""
        for l, layer in enumerate(self.layers, start=1):
            self.backend.dense_forward(layer, ws.layer(l, steps is not None), self.dropout_for(ws, l, steps))

    def compute_loss(self, ws, running=None):
        """ws.loss (a device scalar, returned) and ws.delta[L] = dL/dz_L (times the loss
        scale in fp16); ``running`` gains [loss * batch (or * its weights' sum), hits]."""
        scale = None if self.scaler is None else self.scaler.scale
        self.backend.loss(self.criterion, ws.loss_buffers(), running, loss_scale=scale)
        return ws.loss

    def backward_pass(self, ws, steps=None):
        """The gradients into ``grads``, from ws.delta[L] back to the first layer."""
        for l in range(len(self.layers), 0, -1):
            self.backend.dense_backward(self.layers[l - 1], ws.layer(l, steps is not None),
                                        self.dropout_for(ws, l, steps))

    # ---- inference ----------------------------------------------------------------
    def _chunks(self, X, T=None, W=None):
        """Forward passes over X in chunks (with targets T and weights W where given,
        for the loss); yields (workspace, rows)."""
        for start in range(0, X.shape[0], EVAL_BATCH):
            rows = slice(start, start + EVAL_BATCH)
            ws = self.workspace(X[rows].shape[0])
            self.backend.xp.copyto(ws.a[0], X[rows])
            if T is not None:
                self.backend.xp.copyto(ws.target, T[rows])
            ws.set_weights(self.backend, None if W is None else W[rows])
            self.forward_pass(ws)
            yield ws, rows

    def _outputs(self, X, kind):
        """Run X forward and collect "logits", "outputs" (the loss's output of them:
        probabilities, e^z) or "labels" (argmax; for sigmoid outputs z > 0, per column) on the device."""
        be, xp = self.backend, self.backend.xp
        Xd = inputs.to_compute(self, validation.check_X(X, self.sizes[0], self.dtype, be), "X")
        argmax = kind == "labels" and self.criterion.output == "softmax"
        out = be.empty((Xd.shape[0],) if argmax else (Xd.shape[0], self.sizes[-1]),
                       np.int64 if kind == "labels" else self.dtype)
        row = be.empty((min(Xd.shape[0], EVAL_BATCH),), self.dtype) if kind == "outputs" else None
        for ws, rows in self._chunks(Xd):
            if argmax:
                xp.argmax(ws.a[-1], axis=1, out=ws.pred)
                out[rows] = ws.pred
            elif kind == "labels":
                out[rows] = ws.a[-1] > 0
            else:  # in the model's dtype, from the logits
                out[rows] = ws.a[-1]
                if kind == "outputs":
                    output(xp, self.criterion, out[rows], out[rows], row[:ws.batch])
        return interop.like(X, out, be)

    def forward(self, X):
        """The network's raw outputs z_L: logits for the classification losses, the log
        of the mean count for poisson; no softmax, sigmoid or exp."""
        with self.context():
            return self._outputs(X, "logits")

    def predict(self, X):
        """Class labels (cross_entropy), 0/1 per output (binary_cross_entropy), the mean
        count e^z (poisson) or the outputs (mse, huber, mae) for the rows of X."""
        with self.context():
            return self._outputs(X, "labels" if self.criterion.classifies else "outputs")

    def predict_proba(self, X):
        """Class probabilities, (n, classes): softmax (cross_entropy) or, per output,
        sigmoid (binary_cross_entropy)."""
        if not self.criterion.classifies:
            raise ValueError(f"predict_proba needs a classification loss (cross_entropy, binary_cross_entropy); "
                             f"this model's is {self.loss}: use predict")
        with self.context():
            return self._outputs(X, "outputs")

    def totals(self, X, T, W=None):
        """[loss sum, hits] over prepared rows (X, T), weighted by W where given, on the device (float64)."""
        running = self.backend.zeros((2,), np.float64)
        for ws, _ in self._chunks(X, T, W):
            self.compute_loss(ws, running)
        return running

    def evaluation(self, X, T, W=None):
        """The metrics (``metrics``) over all of the prepared rows (X, T), weighted by W where given."""
        return self.metrics(self.backend.to_host(self.totals(X, T, W)), row_count(X, W))

    def metrics(self, totals, count):
        """The metrics from the host's [loss sum, hits] over ``count`` rows (or, weighted,
        the rows' weights' sum): losses.metrics."""
        return metrics(self.criterion, totals, count, self.sizes[-1])

    def config(self):
        return {"sizes": list(self.sizes), "activation": self.activation, "loss": self.loss, "dtype": self.dtype,
                "precision": self.precision, "dropout": self.dropout, "huber_delta": self.criterion.delta}

    def __repr__(self):
        return (f"{type(self).__name__}({self.sizes}, activation={self.activation!r}, loss={self.loss!r}, "
                f"device={self.device!r}, dtype={self.dtype!r}, precision={self.precision!r}"
                + (f", huber_delta={self.criterion.delta:g}" if self.loss == "huber" else "")
                + (f", dropout={self.dropout})" if self.dropout else ")"))


def row_count(X, W=None):
    """What the totals over the rows of X divide by: their number, or their weights' sum."""
    return X.shape[0] if W is None else float(W.sum())


def seed_streams(seed):
    """What a seed gives a network (an MLP, or a member of a pack): the generator of its
    initial values, its shuffle generator and its dropout seed, each a stream of its own."""
    init_seq, shuffle_seq, dropout_seq = np.random.SeedSequence(seed).spawn(3)
    return np.random.default_rng(init_seq), np.random.default_rng(shuffle_seq), int(dropout_seq.generate_state(1)[0])


def _check_dtype(dtype, backend):
    """The dtype's name: float32 or float64, or longdouble on the CPU (gradcheck's reference side)."""
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name in DTYPES or (name == np.dtype(REFERENCE_DTYPE).name and backend.name == "cpu"):
        return name
    raise ValueError(f"dtype must be one of {DTYPES} (or {REFERENCE_DTYPE!r} on the CPU, for reference "
                     f"computations), got {dtype!r}")
