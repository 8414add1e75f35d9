"""The Backend interface, the structs its primitives take, and the device errors.

Every primitive writes into buffers it is given and allocates nothing, so a train
step after the first of its batch size allocates nothing either.
"""

import contextlib
import functools
from typing import NamedTuple

from ..optim.base import Update


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


class Dense(NamedTuple):
    """One layer's parameters and their gradients: views into the flat buffers."""

    W: object  # (n_l, n_{l-1})
    b: object  # (n_l,)
    dW: object
    db: object  # in the compute type of the layer's dtype (float32 for 16-bit layers)
    act: object  # a gpubackprop.nn.activations.Activation


class DenseBuffers(NamedTuple):
    """One layer's buffers in one step's workspace (B rows)."""

    input: object  # a_{l-1}, or its dropped copy in training
    out: object  # a_l
    z: object  # z_l where g' needs it (act.needs_z), else None: out doubles as z
    grad: object  # dL/da_l on entry to the backward pass, delta_l after it
    grad_prev: object  # receives dL/da_{l-1}; None for the first layer
    scratch: tuple  # the activation's temporaries (where elementwise_scratch)
    ones: object  # (B,) ones: db = delta^T ones
    matmul: object = None  # matmul(a, b, out): the library chosen for the model's shapes (Backend.matmul_for)


class LossBuffers(NamedTuple):
    """The output layer's buffers for the loss."""

    z: object  # (B, C) logits
    target: object  # (B, C) targets
    delta: object  # receives dL/dz
    out: object  # 0-d: the batch's mean loss
    row: object  # (B,) scratch in z's dtype
    weight: object = None  # (B,) sample weights in the compute type (gpubackprop.nn.losses); None: unweighted
    weight_sum: object = None  # 0-d: their sum


class MemberUpdate(NamedTuple):
    """A pack's optimizer update over its flat buffers, laid out by tensor, then member
    (gpubackprop.nn.packed): member k's part of each of ``blocks`` (each with ``start``
    and ``size``) is ``size`` values from ``start + k size``."""

    p: object
    g: object
    state: tuple  # the optimizer's state buffers, like p
    scratch: tuple  # like p, where the backend's update needs temporaries
    blocks: tuple
    steps: object  # (K,) uint32: each member's steps done; its update reads and advances its own
    skip: object  # (K,) uint32: set: the member's update is skipped, count included
    params_flag: object  # (K,) uint32: set where a member's parameters after its update hold Inf or NaN
    scratch_steps: object  # (1,) like steps: a block's count, for member-by-member updates


class MemberSettings(NamedTuple):
    """Members' hyperparameters as Backend.prepare_members made them for the update."""

    settings: list  # settings[k][j]: member k's for block j
    arguments: object  # what the backend's own update loop takes for them, or None


class Backend:
    """One device's array module and primitives. Subclasses fill in the primitives."""

    name = "?"
    xp = None
    note = ""
    supports_graphs = False
    supports_mixed_precision = False  # float16 / bfloat16 compute: cast_parameters, unscale_and_check, ...
    supports_members = False  # whether Backend's member-axis primitives (the dense passes, the guard, the update) run here
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

    def sum(self, x, out):
        """out (0-d) = the sum of x: a batch's sample weights, for the loss."""
        self.xp.sum(x, out=out)

    def context(self):
        """A context manager that makes this device current while it is open."""
        raise NotImplementedError

    def precision(self, mode):
        """A context manager setting the float32 GEMM precision: "float32", or "tf32"
        where the device has it (elsewhere float32 is computed exactly)."""
        return contextlib.nullcontext()

    def precision_unavailable(self, mode):
        """Why precision ``mode`` (gpubackprop.optim.precision) cannot run here, with the fix,
        or None when it can."""
        if mode in ("bf16", "fp16") and not self.supports_mixed_precision:
            return (f"precision={mode!r} needs the CUDA backend's 16-bit kernels; {self.name} computes in "
                    "float32: use precision='float32' there")
        return None

    def free_bytes(self):
        """Bytes this device can still allocate, or None where that is not known."""
        return None

    # ---- the fused primitives ----------------------------------------------
    def dense_forward(self, layer, buf, dropout=None):
        """buf.out = g(buf.input W^T + b) for ``layer`` (a Dense); buf.z receives the
        pre-activation where the activation needs it. With ``dropout`` (a
        gpubackprop.nn.dropout.Dropout), dropout.dropped = out * mask / (1 - p) as well."""
        raise NotImplementedError

    def dense_backward(self, layer, buf, dropout=None):
        """Turn buf.grad = dL/da into delta = grad * g'(a) in place (with ``dropout``, grad
        is dL/d dropped and passes mask / (1 - p) first), then db = delta^T 1,
        dW = delta^T a_prev and, unless buf.grad_prev is None (first layer),
        grad_prev = delta W."""
        raise NotImplementedError

    def loss(self, loss, buf, running=None, loss_scale=None):
        """``loss`` (a gpubackprop.nn.losses.Loss) of logits buf.z against buf.target, the
        batch's (weighted) mean, into the 0-d buf.out; buf.delta = dL/dz. Unless None,
        the float64 ``running`` pair gains [loss * rows (or * the weights' sum), hits
        (losses.hits, each times its row's weight)]. ``loss_scale`` (mixed precision
        only): delta is multiplied by loss_scale[0]."""
        raise NotImplementedError

    def optimizer_update(self, rule, update, h):
        """One update of optimizer class ``rule`` (gpubackprop.optim: it holds the maths,
        the NumPy form and its kernel's arguments) over ``update`` (an optim.Update),
        with hyperparameters ``h``. It reads the step count t from ``update.steps``
        (steps done so far) and stores t there, so that a replayed graph counts too;
        with ``update.found_inf`` set (fp16 overflow, or the divergence guard) it
        skips the step, count included. Given ``update.params_flag``, it sets it where
        the parameters then hold Inf or NaN (skipped or not)."""
        raise NotImplementedError

    def matmul_for(self, sizes, act, batch, dtype, dropout):
        """The ``matmul(a, b, out)`` every workspace of a model (layer sizes ``sizes``,
        hidden activation ``act``, ``dropout`` or not) hands its layers, chosen when its
        first workspace (``batch`` rows) is made; None: the backend's own products."""
        return None

    def add_scaled(self, out, y, x, a):
        """out = y + a x over flat buffers' views: a gradient with the L2 term of the weights alone."""
        raise NotImplementedError

    def update_scratch(self, rule, dtype):
        """How many parameter-sized temporaries ``optimizer_update`` of ``rule`` needs
        for parameters of ``dtype``: the rule's own count where the update is NumPy's
        out= chain (elementwise_scratch), none for a fused update."""
        return rule.n_scratch if self.elementwise_scratch else 0

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

    # ---- a pack's member axis (gpubackprop.nn.packed) -------------------------------------
    # Member by member through the primitives above, on views: each member's arithmetic
    # is its lone network's. A backend that can runs them (``supports_members``); the
    # fused CPU backend has its own loops over the members instead.
    def dense_forward_members(self, layer, buf):
        """dense_forward of every member of a pack at once: ``layer`` a Dense whose W is
        (K, n_l, n_{l-1}) and b (K, n_l), ``buf`` DenseBuffers of (K, B, n) stacks."""
        for k in range(layer.W.shape[0]):
            self.dense_forward(member(layer, k), member(buf, k))

    def dense_backward_members(self, layer, buf):
        """dense_backward of every member of a pack at once (as dense_forward_members's)."""
        for k in range(layer.W.shape[0]):
            self.dense_backward(member(layer, k), member(buf, k))

    def flag_nonfinite_members(self, g, blocks, flags):
        """flags[k] = 1 where member k's part of g (a pack's flat buffer, laid out as
        MemberUpdate's) holds Inf or NaN, else 0."""
        flags.fill(0)
        for k in range(flags.shape[0]):
            for blk in blocks:
                self.flag_nonfinite(member_part(g, blk, k), flags[k:k + 1])

    def prepare_members(self, rule, blocks, settings, dtype):
        """What ``optimizer_update_members`` takes for members' hyperparameters ``settings``
        (settings[k][j]: member k's for block j) of optimizer class ``rule``, made once
        while they stay: here the settings themselves; a backend may add its arguments."""
        return MemberSettings(settings, None)

    def optimizer_update_members(self, rule, update, prepared):
        """Each member's ``optimizer_update`` of ``rule`` over its part of ``update`` (a
        MemberUpdate), with its hyperparameters (``prepare_members``) for each block: block
        by block, each counting from the member's steps, which advance once, after them."""
        steps = update.scratch_steps
        for k, member_settings in enumerate(prepared.settings):
            for blk, h in zip(update.blocks, member_settings):
                self.xp.copyto(steps, update.steps[k:k + 1])
                part = functools.partial(member_part, blk=blk, k=k)
                self.optimizer_update(rule, Update(part(update.p), part(update.g), tuple(map(part, update.state)),
                                                   tuple(map(part, update.scratch)), steps, update.skip[k:k + 1],
                                                   update.params_flag[k:k + 1]), h)
            self.xp.copyto(update.steps[k:k + 1], steps)

    def capture(self, fn):
        """fn's work recorded once; the result's ``launch()`` replays it."""
        raise NotImplementedError(f"{self.name} does not capture graphs")

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"


def member(stack, k):
    """Member k's Dense or DenseBuffers from a pack's stacked one (what is shared stays)."""
    shared = ("ones", "matmul", "act")
    return type(stack)(*(x if name in shared or x is None else tuple(s[k] for s in x) if isinstance(x, tuple)
                         else x[k] for name, x in zip(stack._fields, stack)))


def member_part(flat, blk, k):
    """Member k's part of block ``blk`` of a pack's flat buffer."""
    start = blk.start + k * blk.size
    return flat[start:start + blk.size]


def gemm_layout(x):
    """How a BLAS takes the 2-D x: (False, leading dimension) for rows of unit stride (a
    C-contiguous array, or columns of a wider one: a pack's members), (True, leading
    dimension) for the transpose of such, None for anything else."""
    rows, cols = x.shape
    step = x.itemsize
    if x.flags.c_contiguous:
        return False, max(cols, 1)
    if x.flags.f_contiguous:  # a transposed view: W.T, delta.T
        return True, max(rows, 1)
    if x.strides[1] == step and x.strides[0] % step == 0 and x.strides[0] >= cols * step:
        return False, x.strides[0] // step
    if x.strides[0] == step and x.strides[1] % step == 0 and x.strides[1] >= rows * step:
        return True, x.strides[1] // step
    return None
