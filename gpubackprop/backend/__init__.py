"""Backends: where arrays live and how the fused primitives of a train step run.

A Backend owns an array module (``xp``: NumPy or CuPy) and implements the few
primitives a train step is made of. The model layer calls only these, so a new
device needs a new Backend and nothing else:

    dense_forward    a_l = g(a_{l-1} W_l^T + b_l)                (bias and g fused on the GEMM output)
    dense_backward   delta_l = dL/da_l * g'(a_l)                 (from the stored activation)
                     dL/db_l = sum over the batch of delta_l,
                     dL/dW_l = delta_l^T a_{l-1},  dL/da_{l-1} = delta_l W_l
    loss             cross entropy or MSE: the loss and delta_L in one pass, and the
                     epoch's running loss and hit count
    sgd_update, adam_update   one update over the flat parameter buffer
    capture          (where ``supports_graphs``) a train step recorded once and
                     replayed: a CUDA graph on the GPU

Arrays are row-major with the batch first: a_l is (B, n_l), W_l is (n_l, n_{l-1})
as in PyTorch, so a row of a is a sample and W matches ``torch.nn.Linear.weight``.

``get_backend("cpu" | "cuda" | "cuda:N" | "auto")`` returns one shared Backend
per device.
"""

import contextlib
import functools
import logging
import re

log = logging.getLogger("gpubackprop")


class DeviceUnavailableError(RuntimeError):
    """The requested device cannot be used; the message says why and what to do.

    ``cause`` holds the why alone (used by device="auto" to explain its choice).
    """

    def __init__(self, cause, fix="use device='cpu', or device='auto' to fall back to the CPU"):
        super().__init__(f"{cause}; {fix}.")
        self.cause = cause


class OutOfMemoryError(MemoryError):
    """A device ran out of memory; the message names what was being allocated, the
    bytes it needed and what to change. Raised before the model is changed."""


def get_backend(device="cpu"):
    """The Backend for ``device``: "cpu", "cuda", "cuda:N", "auto", or a Backend.

    "auto" takes the first GPU when CuPy can use it, else the CPU, and logs which
    (logger "gpubackprop", INFO) with the reason; ``backend.note`` keeps it.
    """
    if isinstance(device, Backend):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'cpu', 'cuda:0' or 'auto', not {type(device).__name__}")
    return _backend_for(device.strip().lower())


@functools.lru_cache(maxsize=None)
def _backend_for(name):
    from .numpy_backend import NumpyBackend

    if name == "cpu":
        return NumpyBackend()
    if name == "auto":
        try:
            backend = _cuda_backend(0)
        except DeviceUnavailableError as e:
            backend = NumpyBackend(note=f"device='auto' chose cpu: {e.cause}")
        else:
            backend.note = f"device='auto' chose {backend.name}"
        log.info(backend.note)
        return backend
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match:
        return _cuda_backend(int(match.group(1) or 0))
    raise ValueError(f"unknown device {name!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'")


def _cuda_backend(index):
    from .cupy_backend import CupyBackend

    return CupyBackend(index)


class Backend:
    """One device's array module and primitives. Subclasses fill in the primitives.

    Every primitive writes into buffers it is given and allocates nothing, so a
    train step after the first of its batch size allocates nothing either.
    """

    name = "?"
    xp = None
    note = ""
    supports_graphs = False
    supports_mixed_precision = False  # float16 / bfloat16 compute: cast_parameters, unscale_and_check, ...
    # Whether the primitives use the temporaries the model passes them (``scratch``
    # of the activations and the optimizers, each as large as its operand): NumPy
    # needs them for its out= chains; fused kernels need none, so none is allocated.
    elementwise_scratch = True

    # ---- arrays -------------------------------------------------------------
    def empty(self, shape, dtype):
        return self.xp.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        return self.xp.zeros(shape, dtype=dtype)

    def asarray(self, x, dtype=None):
        """x (host or device array, or nested lists) as a C-contiguous array here."""
        raise NotImplementedError

    def to_host(self, x):
        """A NumPy array with x's values (x itself when already on the host)."""
        raise NotImplementedError

    def is_native(self, x):
        """Whether x is already an array of this backend's module."""
        return isinstance(x, self.xp.ndarray)

    def gather_rows(self, src, index, out):
        """out[i] = src[index[i]]: a batch cut from a data set kept on this device."""
        raise NotImplementedError

    def context(self):
        """A context manager that makes this device current while it is open."""
        raise NotImplementedError

    def precision(self, mode):
        """A context manager setting the float32 GEMM precision: "float32", or "tf32"
        where the device has it (elsewhere float32 is computed exactly)."""
        return contextlib.nullcontext()

    def precision_unavailable(self, mode):
        """Why precision ``mode`` (gpubackprop.precision) cannot run here, with the fix,
        or None when it can."""
        if mode in ("bf16", "fp16") and not self.supports_mixed_precision:
            return (f"precision={mode!r} needs the CUDA backend's 16-bit kernels; {self.name} computes in "
                    "float32: use precision='float32' there")
        return None

    def free_bytes(self):
        """Bytes this device can still allocate, or None where that is not known."""
        return None

    # ---- the fused primitives ----------------------------------------------
    def dense_forward(self, a_prev, W, b, act, out, z, scratch, dropout=None):
        """out = g(a_prev W^T + b). z receives the pre-activation when ``act.needs_z``
        (else None: out doubles as z). With ``dropout`` (a gpubackprop.dropout.Dropout),
        dropout.dropped = out * mask / (1 - p) as well."""
        raise NotImplementedError

    def dense_backward(self, grad, a, z, a_prev, W, act, scratch, dW, db, grad_prev, ones, dropout=None):
        """Turn grad = dL/da into delta = grad * g'(a) in place (with ``dropout``, grad is
        dL/d dropped and passes mask / (1 - p) first), then
        db = delta^T 1 (``ones`` is a (B,) vector of ones), dW = delta^T a_prev and,
        unless ``grad_prev`` is None (first layer), grad_prev = delta W."""
        raise NotImplementedError

    def loss(self, name, z, y, delta, out, running, scratch, loss_scale=None):
        """The loss called ``name`` of logits z against targets y, a batch mean, into
        the 0-d ``out``; delta = dL/dz. Unless None, the float64 ``running`` pair
        gains [loss * batch, rows whose argmax z is argmax y (cross entropy)].
        ``scratch`` is the workspace's (row, pred, label, hit) buffers.
        ``loss_scale`` (mixed precision only): delta is multiplied by loss_scale[0]."""
        raise NotImplementedError

    def softmax(self, z, out, row):
        raise NotImplementedError

    # The optimizers read the step count t from ``steps`` (a (1,) uint32 array on
    # this device: steps done so far) and store t there, so that a replayed graph
    # counts too. ``scratch`` is None (SGD) or () (Adam) where elementwise_scratch
    # is False. With ``found_inf`` set (fp16 overflow, or the divergence guard),
    # they skip the step.
    def sgd_update(self, p, g, buf, scratch, steps, *, lr, momentum, dampening, nesterov, weight_decay,
                   found_inf=None):
        raise NotImplementedError

    def adam_update(self, p, g, m, v, scratch, steps, *, lr, beta1, beta2, eps, weight_decay, decoupled,
                    found_inf=None):
        raise NotImplementedError

    def clip_by_global_norm(self, g, max_norm):
        """g *= min(1, max_norm / (||g||_2 + 1e-6)) over the whole flat gradient buffer
        (torch.nn.utils.clip_grad_norm_)."""
        raise NotImplementedError

    def flag_nonfinite(self, g, flag):
        """flag[0] = 1 if any of g is Inf or NaN (the divergence guard)."""
        raise NotImplementedError

    def count_nonfinite(self, flag, count, first_bad, steps):
        """After the update: if flag[0], count[0] += 1 (first_bad[0] = steps[0] on the first); clear flag."""
        raise NotImplementedError

    def capture(self, fn):
        """fn's work recorded once; the result's ``launch()`` replays it."""
        raise NotImplementedError(f"{self.name} does not capture graphs")

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"
