"""The CUDA backend's primitives as launches of our kernels in ``kernels/*.cu``.

KernelBackend holds everything about those launches that is not CUDA itself:
which instantiation of which template, the grid and block shapes, the scalars
the host precomputes, and the scratch buffers of the cross-block reductions.
It runs kernels through a ``module`` with one method,

    module.launch(name_expression, grid, block, args)

and leaves the matrix products to ``_matmul`` (``xp.matmul`` here; cublasGemmEx in
the CUDA backend). The CUDA backend gives it CuPy and the sources compiled by
NVRTC (cuda.RawModules); the tests give it NumPy and the same sources
compiled for the CPU by the host harness (tests/kernels/cuda_host.h), so
CI runs every line here and every kernel's source without a GPU.

Per primitive, with the kernel that does it:

    dense_forward    z = a_prev W^T (GEMM), then bias_act_forward: a = g(z + b)
                     (and the dropped copy, in training with dropout)
    dense_backward   act_backward_bias_grad: delta = g * mask * g'(a), db = sum_rows
                     delta (one launch), then dW = delta^T a_prev, grad_prev = delta W
    loss             softmax_cross_entropy / elementwise_loss: delta_L and the
                     loss, summed on the device, in one launch (which also adds
                     the epoch's running loss and hit count)
    optimizer_update one launch over the flat parameter buffer of the rule's
                     kernel (the step count lives on the device)
    clip_by_global_norm       sum_of_squares, then clip_to_norm
    flag_nonfinite, count_nonfinite   the divergence guard
    cast_parameters, unscale_and_check, update_loss_scale   mixed precision

``capture(fn)`` records fn's launches and GEMMs as a graph to replay: on the GPU
a CUDA graph (cuda.py), here a list of the same calls with the same
buffers and the same scalar arguments. That is a CUDA graph's contract, so the
host harness proves a captured train step right (nothing allocated, nothing
read back, no scalar that should change between steps baked in) without a GPU.
"""

import contextlib
import functools
import importlib.resources
import re

import numpy as np

from ..nn import losses
from ..nn.activations import ACTIVATIONS
from ..optim import OPTIMIZERS
from .base import Backend, gemm_layout

KERNEL_DIR = importlib.resources.files("gpubackprop.kernels")  # kernels/ in a checkout
CTYPES = {"float32": "float", "float64": "double", "float16": "__half", "bfloat16": "__nv_bfloat16"}
LOW_PRECISION = ("float16", "bfloat16")  # storage types whose arithmetic runs in float32


def instance(template, dtype=None, *ints):
    """The name expression of one instantiation, e.g. ``bias_act_forward<float, 1>``
    (just the name for a kernel that is not a template)."""
    if dtype is None:
        return template
    return f"{template}<{', '.join([CTYPES[dtype], *map(str, ints)])}>"


def _per_activation(template, dtypes):
    return [instance(template, t, act.code) for t in dtypes for act in ACTIVATIONS.values()]


# Every instantiation of every source file: NVRTC (backend/nvrtc.py), nvcc (CI)
# and the host harness all compile exactly these.
SOURCES = {
    "bias_activation.cu": _per_activation("bias_act_forward", CTYPES),
    "activation_backward.cu": _per_activation("act_backward_bias_grad", CTYPES),
    "loss.cu": [instance("softmax_cross_entropy", t) for t in CTYPES]
    + [instance("elementwise_loss", t, loss.code) for t in CTYPES for loss in losses.LOSSES.values() if loss.elementwise]
    + [instance("sum_values", t) for t in ("float32", "float64")],
    "optimizers.cu": [instance(k, t) for k in [*dict.fromkeys(r.kernel for r in OPTIMIZERS.values()), "add_scaled"]
                      for t in ("float32", "float64")],
    "nonfinite.cu": [instance("flag_nonfinite", t) for t in ("float32", "float64")] + ["count_nonfinite"],
    "clipping.cu": [instance(k, t) for k in ("sum_of_squares", "clip_to_norm") for t in ("float32", "float64")],
    "mixed_precision.cu": [instance("cast_parameters", t) for t in LOW_PRECISION]
    + ["unscale_and_check", "update_loss_scale"],
}
FILE_OF = {name: filename for filename, names in SOURCES.items() for name in names}


def is_low_precision(name):
    return any(CTYPES[t] in name for t in LOW_PRECISION)


def source(filename):
    """The text of ``kernels/filename`` with its local ``#include "..."`` lines inlined.

    NVRTC gets one string (and the kernel cache keys on it), so a header's text
    must be part of it: an edited header then means a new key and a recompile.
    """
    text = (KERNEL_DIR / filename).read_text()
    return re.sub(r'^#include "([^"]+)"$', lambda m: source(m.group(1)), text, flags=re.M)


class KernelBackend(Backend):
    """The primitives of ``Backend`` through kernels; see the module docstring.

    ``n_sm`` is the device's multiprocessor count: grids are sized to fill it
    (8 blocks of 256 threads per multiprocessor) and loop over the rest. One
    backend serves one stream at a time: its reduction scratch is shared.
    """

    BLOCK = 256
    supports_graphs = True
    supports_mixed_precision = True
    supports_members = True  # Backend's member-by-member primitives: launches on contiguous views, strided GEMMs
    elementwise_scratch = False
    matmul_precision = "float32"

    def __init__(self, xp, module, n_sm, note=""):
        self.note = note
        self.xp = xp
        self._ops_xp = xp  # the module of recorded GEMMs and gathers, never swapped out
        self.module = module
        self.max_blocks = 8 * n_sm
        self._partials = {}  # compute dtype -> buffer of per-block partial sums
        self._counters = None  # arrival counters of the last-block reductions, kept zero by the kernels
        self._retired = []  # outgrown scratch buffers: a captured graph may still point at them
        self._norm_sq = {}  # compute dtype -> (1,) sum of squared gradients, for clipping
        self._recording = None  # the op list while capture() runs

    # ---- arrays (the host harness's: the CUDA backend has its own) -----------------------
    def asarray(self, x, dtype=None):
        return self.xp.ascontiguousarray(self.xp.asarray(x, dtype=dtype))

    def to_host(self, x):
        return np.asarray(x)

    def context(self):
        return contextlib.nullcontext()

    # ---- launches and graphs ----------------------------------------------------------
    def _launch(self, template, dtype, ints, grid, block, args):
        name = instance(template, None if dtype is None else np.dtype(dtype).name, *ints)
        grid, block = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
        self._issue(functools.partial(self.module.launch, name, grid, block, args))

    @contextlib.contextmanager
    def precision(self, mode):
        previous, self.matmul_precision = self.matmul_precision, mode
        try:
            yield
        finally:
            self.matmul_precision = previous

    def _matmul(self, a, b, out):
        if a.dtype.itemsize == 2:
            # The host's model of a 16-bit GEMM: exact products summed in float32,
            # rounded once to out's type (float32 for dW, 16-bit otherwise).
            f32 = np.float32
            self._issue(lambda: out.__setitem__(Ellipsis, self._ops_xp.matmul(a.astype(f32), b.astype(f32))))
        elif self.matmul_precision == "tf32" and out.dtype == np.float32:
            # The host's model of a TF32 GEMM: operands rounded to 10-bit mantissas,
            # products summed in float32.
            self._issue(lambda: self._ops_xp.matmul(round_to_tf32(a), round_to_tf32(b), out=out))
        else:
            self._issue(functools.partial(self._ops_xp.matmul, a, b, out=out))

    def gather_rows(self, src, index, out):
        self._issue(functools.partial(self._ops_xp.take, src, index, axis=0, out=out))

    def sum(self, x, out):
        grid = self._grid_1d(x.size)  # a kernel of ours: CuPy's reductions may allocate, which a capture forbids
        self._launch("sum_values", x.dtype, (), grid, (self.BLOCK,),
                     (x, np.int64(x.size), self._scratch(x.dtype, 2 * grid[0]), self._counter(1), out))

    def _issue(self, op):
        if self._recording is None:
            op()
        else:
            self._recording.append(op)

    def capture(self, fn):
        """A graph of fn's launches, GEMMs and gathers; ``graph.launch()`` replays them.

        fn runs once, recording instead of executing; any other array operation in
        it (an allocation, a read back to the host) raises.
        """
        xp, self._recording = self.xp, []
        self.xp = _NoArrayOps(xp)
        try:
            fn()
            ops = self._recording
        finally:
            self.xp, self._recording = xp, None
        return _Replay(ops)

    @staticmethod
    def _compute(dtype):
        """The scalar type the kernel computes in for storage ``dtype`` (float64 or float32)."""
        return np.float64 if np.dtype(dtype) == np.float64 else np.float32

    def _scratch(self, dtype, n):
        compute = self._compute(dtype)
        buf = self._partials.get(compute)
        if buf is None or buf.size < n:
            self._retired.append(buf)
            buf = self._partials[compute] = self.xp.empty(max(n, 2 * self.max_blocks), compute)
        return buf

    def _counter(self, n):
        if self._counters is None or self._counters.size < n:
            self._retired.append(self._counters)
            self._counters = self.xp.zeros(max(n, 1024), np.uint32)
        return self._counters

    def _grid_1d(self, n):
        return (max(1, min(-(-n // self.BLOCK), self.max_blocks)),)

    # ---- layers --------------------------------------------------------------------
    @staticmethod
    def _dropout_args(spec, dtype):
        """The kernels' dropout arguments (steps None: no dropout)."""
        c = KernelBackend._compute(dtype)
        if spec is None:
            return np.uint32(0), c(1.0), np.uint32(0), None, np.uint32(0), np.uint64(0)
        return (np.uint32(spec.threshold), c(spec.scale), np.uint32(spec.seed), spec.steps, np.uint32(spec.layer),
                np.uint64(spec.offset))

    def dense_forward(self, layer, buf, dropout=None):
        zbuf = buf.out if buf.z is None else buf.z
        self._matmul(buf.input, layer.W.T, zbuf)
        rows, cols = zbuf.shape
        # A warp covers up to 32 columns of one row (all of a narrow layer's), and
        # the block's other threads take the next rows.
        bx = min(32, 1 << (cols - 1).bit_length())
        by = self.BLOCK // bx
        gx = -(-cols // bx)
        gy = max(1, min(-(-rows // by), self.max_blocks // gx, 65535))
        self._launch("bias_act_forward", zbuf.dtype, (layer.act.code,), (gx, gy), (bx, by),
                     (zbuf, layer.b, buf.out, np.int32(rows), np.int32(cols),
                      None if dropout is None else dropout.dropped) + self._dropout_args(dropout, zbuf.dtype))

    def dense_backward(self, layer, buf, dropout=None):
        grad, db = buf.grad, layer.db
        if db.dtype != self._compute(grad.dtype):  # the kernel writes db in the compute type
            raise TypeError(f"db must be {np.dtype(self._compute(grad.dtype))} for {grad.dtype} layers, not {db.dtype}")
        rows, cols = grad.shape
        tiles = -(-cols // 32)
        # Enough row slices to fill the device, each of at least 64 rows.
        slices = max(1, min(-(-rows // 64), -(-self.max_blocks // tiles), 65535))
        rows_per_slice = -(-rows // slices)
        slices = -(-rows // rows_per_slice)
        self._launch(
            "act_backward_bias_grad", grad.dtype, (layer.act.code,), (tiles, slices), (32, 8),
            (grad, buf.out, buf.out if buf.z is None else buf.z, db, self._scratch(grad.dtype, slices * cols),
             self._counter(tiles), np.int32(rows), np.int32(cols), np.int32(rows_per_slice))
            + self._dropout_args(dropout, grad.dtype),
        )
        self._matmul(grad.T, buf.input, layer.dW)
        if buf.grad_prev is not None:
            self._matmul(grad, layer.W, buf.grad_prev)

    def loss(self, loss, buf, running=None, loss_scale=None):
        z = buf.z
        rows, cols = z.shape
        c = self._compute(z.dtype)
        head = (z, buf.target, buf.delta, np.int32(rows), np.int32(cols), c(1.0 / rows))
        if loss.elementwise:
            grid = self._grid_1d(z.size)
            template, ints, args = "elementwise_loss", (loss.code,), head + (c(1.0 / cols), c(loss.delta))
        else:
            warps = self.BLOCK // 32
            grid = (max(1, min(-(-rows // warps), self.max_blocks)),)
            template, ints, args = "softmax_cross_entropy", (), head
        self._launch(template, z.dtype, ints, grid, (self.BLOCK,),
                     args + (buf.weight, buf.weight_sum, self._scratch(z.dtype, 2 * grid[0]), self._counter(1), buf.out,
                             running, loss_scale))

    # ---- optimizers (maths in gpubackprop.optim) -----------------------------------------
    def optimizer_update(self, rule, update, h):
        p = update.p
        self._launch(rule.kernel, p.dtype, (), self._grid_1d(p.size), (self.BLOCK,),
                     rule.kernel_args(update, h, self._compute(p.dtype)) + (update.steps, self._counter(1),
                                                                             update.found_inf))
        if update.params_flag is not None:
            self.flag_nonfinite(p, update.params_flag)

    def clip_by_global_norm(self, g, max_norm):
        compute = self._compute(g.dtype)
        norm_sq = self._norm_sq.get(compute)
        if norm_sq is None:
            norm_sq = self._norm_sq[compute] = self.xp.empty((1,), compute)
        grid = self._grid_1d(g.size)
        self._launch("sum_of_squares", g.dtype, (), grid, (self.BLOCK,),
                     (g, np.int64(g.size), self._scratch(g.dtype, 2 * grid[0]), self._counter(1), norm_sq))
        self._launch("clip_to_norm", g.dtype, (), grid, (self.BLOCK,), (g, np.int64(g.size), norm_sq, compute(max_norm)))

    def add_scaled(self, out, y, x, a):
        self._launch("add_scaled", y.dtype, (), self._grid_1d(y.size), (self.BLOCK,),
                     (out, y, x, np.int64(y.size), self._compute(y.dtype)(a)))

    def flag_nonfinite(self, g, flag):
        self._launch("flag_nonfinite", g.dtype, (), self._grid_1d(g.size), (self.BLOCK,), (g, np.int64(g.size), flag))

    def count_nonfinite(self, flag, count, first_bad, steps):
        self._launch("count_nonfinite", None, (), (1,), (32,), (flag, count, first_bad, steps))

    # ---- mixed precision (kernels/mixed_precision.cu) ---------------------------------------
    def cast_parameters(self, p, low, starts, shifts):
        """low = p (float32) rounded to low's 16-bit type, tensor by tensor: the one
        starting at p[starts[s]] lands shifts[s] further on in low (int64 device
        vectors, starts ascending from 0)."""
        self._launch("cast_parameters", low.dtype, (), self._grid_1d(p.size), (self.BLOCK,),
                     (p, low, np.int64(p.size), starts, shifts, np.int32(starts.size)))

    def unscale_and_check(self, g, loss_scale, found_inf):
        """g /= S; found_inf[0] = 1 if any of g is Inf or NaN."""
        self._launch("unscale_and_check", None, (), self._grid_1d(g.size), (self.BLOCK,),
                     (g, np.int64(g.size), loss_scale, found_inf))

    def update_loss_scale(self, loss_scale, clean_steps, found_inf, *, backoff, growth, interval):
        self._launch("update_loss_scale", None, (), (1,), (32,), (
            loss_scale, clean_steps, found_inf, np.float32(backoff), np.float32(growth), np.uint32(interval)))


def round_to_tf32(x):
    """float32 x rounded to TF32's 10-bit mantissa (to nearest, ties to even)."""
    bits = np.ascontiguousarray(x).view(np.uint32)
    bits = (bits + np.uint32(0xFFF) + ((bits >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
    return bits.view(np.float32).reshape(x.shape)


def column_major_gemm(a, b, out):
    """out = a @ b (row-major, 2-D) as one column-major GEMM call, cuBLAS's layout.

    Row-major out (M x N) is column-major out^T, so the call computes
    out^T = op(b)^T op(a)^T with b first. An operand is rows of unit stride (used
    as stored: OP_N, its leading dimension the row stride: a C-contiguous array, or
    a pack member's columns of a wider one) or the transpose of such (OP_T); out
    is rows of unit stride. Returns (transa, transb, m, n, k, first, ld_first,
    second, ld_second, ldc).
    """
    (M, K), N = a.shape, b.shape[1]
    if b.shape[0] != K or out.shape != (M, N):
        raise ValueError(f"gemm of {a.shape} by {b.shape} into {out.shape}: shapes or layout do not fit")

    def operand(x):
        layout = gemm_layout(x)
        if layout is None:
            raise ValueError("gemm operands must be rows of unit stride (C-contiguous, or columns of a wider array) "
                             "or their transposes")
        return int(layout[0]), layout[1]  # OP_N or OP_T, the leading dimension

    (op_b, ld_b), (op_a, ld_a), (op_out, ldc) = operand(b), operand(a), operand(out)
    if op_out:
        raise ValueError(f"gemm into {out.shape}: out must be rows of unit stride")
    return op_b, op_a, N, M, K, b, ld_b, a, ld_a, ldc


class _Replay:
    """A recorded graph: ``launch()`` issues its operations again, in order."""

    def __init__(self, ops):
        self.ops = ops

    def launch(self):
        for op in self.ops:
            op()


class _NoArrayOps:
    """Stands in for the array module while a graph is recorded: inside a graph
    nothing may be allocated, computed outside the recorded ops, or read back."""

    def __init__(self, xp):
        self._xp = xp

    def __getattr__(self, name):
        raise RuntimeError(f"xp.{name} called while capturing a graph: only kernel launches, "
                           "GEMMs and gathers into buffers made beforehand may run inside one")
