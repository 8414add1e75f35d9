"""A pack's network on a shared batch: K members of one layer-size list, their
parameters with a member axis, and their passes on the same input rows.

When every member trains on the same batch a_0 (B, n_0), the first layers of all K
members are one layer of K n_1 outputs over that input:

    z_1 = a_0 W_1^T + b_1,   W_1 = [W_1^(1); ...; W_1^(K)]  (K n_1, n_0)  one GEMM
    dL/dW_1 = delta_1^T a_0                                 (K n_1, n_0)  one GEMM
    dL/db_1 = sum over the batch of delta_1                  (K n_1,)

where K lone steps make 2K GEMMs of n_1 rows each: the wide product runs nearer the
BLAS's peak, and the step's other work (gathering the batch, each primitive's call)
is paid once instead of K times. Above it, member k's layers run on its own columns
of a_1, a_1^(k) = a_1[:, k n_1 : (k+1) n_1], and its own activations (K, B, n_l), with
the lone network's primitives, so each member's arithmetic is its lone step's.

Parameters are laid out by layer, then member: W_1 (K, n_1, n_0), b_1 (K, n_1),
W_2 (K, n_2, n_1), ... in one flat buffer, so that the first layer's weights of all
members are one matrix; member k's flat buffer in the lone MLP's layout
(W_1, b_1, W_2, ...) is its row of every block (``blocks``, ``to_members``).
"""

import numpy as np

from ..backend import Dense, DenseBuffers, LossBuffers
from .activations import IDENTITY
from .parameters import layout
from .workspace import weight_dtype

KEPT = 3  # workspaces: the batch, its last partial batch, and one more
ALIGN = 64  # bytes: each block starts on a cache line (MKL's sgemm took 2.2 ms on the wide first layer of
# [784,128,10] x 16 at batch 64 from a 16-byte aligned buffer, 1.15 ms from a 64-byte aligned one; 2-core Xeon)


NOT_CHOSEN = object()  # a network's products before its first workspace chose them (None: the backend's own)


class Block:
    """One tensor of every member in the flat buffer: K rows of ``size`` values from
    ``start``; ``lone`` is where the tensor lies in a lone MLP's flat buffer."""

    def __init__(self, start, size, lone, weight):
        self.start, self.size, self.lone, self.weight = start, size, lone, weight

    def rows(self, flat, members):
        """The block in ``flat`` as (K, size)."""
        return flat[self.start:self.start + members * self.size].reshape(members, self.size)


class PackedNetwork:
    """K members' parameters (``flat``, ``grads``) and their passes on shared batches.
    ``criterion`` is the members' Loss; ``backend`` one whose ``supports_members``."""

    def __init__(self, backend, sizes, act, criterion, dtype, members):
        self.backend, self.sizes, self.act, self.criterion = backend, list(sizes), act, criterion
        self.dtype, self.members = np.dtype(dtype), members
        self.blocks, start, align = [], 0, ALIGN // self.dtype.itemsize
        for w, b, n_out, n_in in layout(self.sizes):
            for lone, weight in ((w, True), (b, False)):
                self.blocks.append(Block(start, lone.stop - lone.start, lone, weight))
                start = -(-(start + members * (lone.stop - lone.start)) // align) * align
        self.flat, self.grads = (aligned_zeros(backend, start, self.dtype) for _ in range(2))
        self.layers = [self._layer(l) for l in range(1, len(self.sizes))]
        self._workspaces = {}
        self._matmul = NOT_CHOSEN

    def _layer(self, l):
        """Layer l's Dense: the first layer's of all members as one (K n_1, n_0) layer;
        above it, the members' stacked: W (K, n_l, n_{l-1}), b (K, n_l)."""
        K, n_out, n_in = self.members, self.sizes[l], self.sizes[l - 1]
        act = self.act if l < len(self.sizes) - 1 else IDENTITY
        w, b = self.blocks[2 * l - 2], self.blocks[2 * l - 1]
        W, bias, dW, db = (blk.rows(buf, K) for buf in (self.flat, self.grads) for blk in (w, b))
        if l == 1:
            return Dense(W.reshape(K * n_out, n_in), bias.reshape(-1), dW.reshape(K * n_out, n_in), db.reshape(-1),
                         act)
        return Dense(W.reshape(K, n_out, n_in), bias, dW.reshape(K, n_out, n_in), db, act)

    @property
    def n_params(self):
        """Parameters per member."""
        return sum(blk.size for blk in self.blocks)

    # ---- the members' parameters -------------------------------------------------------
    def load(self, member_params, flat=None):
        """Every member's flat buffer (K, P), in the lone layout, into the pack's
        parameters (or into ``flat``, a buffer like them: optimizer state alike)."""
        host = np.zeros(self.flat.shape, self.dtype)
        for blk in self.blocks:
            blk.rows(host, self.members)[...] = member_params[:, blk.lone]
        self.backend.xp.copyto(self.flat if flat is None else flat, self.backend.asarray(host))

    def to_members(self, flat=None):
        """``flat`` (the parameters by default; optimizer state alike) as (K, P) in the lone layout, on the host."""
        host = np.asarray(self.backend.to_host(self.flat if flat is None else flat))
        out = np.empty((self.members, self.n_params), self.dtype)
        for blk in self.blocks:
            out[:, blk.lone] = blk.rows(host, self.members)
        return out

    # ---- the passes ---------------------------------------------------------------------
    def workspace(self, batch):
        ws = self._workspaces.get(batch)
        if ws is None:
            if self._matmul is NOT_CHOSEN:  # chosen for the wide first layer, which holds most of the FLOPs
                self._matmul = self.backend.matmul_for(self.sizes[:1] + [self.members * self.sizes[1]], self.act,
                                                       batch, self.dtype, False)
            if len(self._workspaces) >= KEPT:
                self._workspaces.pop(next(iter(self._workspaces)))
            ws = self._workspaces[batch] = PackedWorkspace(self, batch, self._matmul)
        return ws

    def forward_pass(self, ws):
        be = self.backend
        be.dense_forward(self.layers[0], ws.wide)
        for layer, buf in zip(self.layers[1:], ws.above):
            be.dense_forward_members(layer, buf)
        if ws.logits is not None:  # no hidden layer: each member's logits in rows of its own for the loss
            be.xp.copyto(ws.logits[0], by_member(ws.wide.out, self.members))

    def compute_loss(self, ws, running):
        """Each member's loss over the batch into ws.loss[k] and its delta_L; running[k]
        gains [loss * rows (or * its weights' sum), hits], as a lone step's running."""
        for k in range(self.members):
            self.backend.loss(self.criterion, ws.loss_buffers[ws.weighted][k], running[k])

    def backward_pass(self, ws):
        be = self.backend
        for layer, buf in zip(reversed(self.layers[1:]), reversed(ws.above)):
            be.dense_backward_members(layer, buf)
        if ws.logits is not None:
            be.xp.copyto(by_member(ws.wide.grad, self.members), ws.logits[1])
        be.dense_backward(self.layers[0], ws.wide)


def aligned_zeros(backend, shape, dtype, align=ALIGN):
    """Zeros of ``shape`` and ``dtype`` on ``backend`` whose first starts on an ``align``-byte boundary."""
    n, itemsize = int(np.prod(shape)), np.dtype(dtype).itemsize
    buf = backend.zeros((n + align // itemsize,), dtype)
    address = buf.ctypes.data if isinstance(buf, np.ndarray) else buf.data.ptr
    skip = (-address % align) // itemsize
    return buf[skip:skip + n].reshape(shape)


class PackedWorkspace:
    """The buffers of a pack's step at batch size B: the shared rows ``x``, ``target``
    and ``index``; the first layer's activations (B, K n_1) and, above, (K, B, n_l);
    each member's sample weights ``weight`` (K, B), their sums, and its loss."""

    def __init__(self, net, batch, matmul):
        be, K, sizes, dtype, act = net.backend, net.members, net.sizes, net.dtype, net.act
        L = len(sizes) - 1

        def empty(shape, dtype):
            return aligned_zeros(be, shape, dtype)
        self.batch, self.weighted = batch, False
        self.x, self.target = empty((batch, sizes[0]), dtype), empty((batch, sizes[-1]), dtype)
        self.index = empty((batch,), np.int64)
        self.weight, self.weight_sum = empty((K, batch), weight_dtype(dtype)), empty((K,), weight_dtype(dtype))
        self.loss, self.row = empty((K,), dtype), empty((K, batch), dtype)
        self.ones = be.xp.ones((batch,), dtype)

        def buffers(shape, hidden):  # a layer's out, z, grad, scratch
            z = empty(shape, dtype) if hidden and act.needs_z else None
            scratch = tuple(empty(shape, dtype) for _ in range(act.n_scratch)) if hidden and be.elementwise_scratch \
                else ()
            return empty(shape, dtype), z, empty(shape, dtype), scratch

        first = buffers((batch, K * sizes[1]), L > 1)
        self.wide = DenseBuffers(self.x, first[0], first[1], first[2], None, first[3], self.ones, matmul)
        below = [None if x is None else by_member(x, K) for x in first[:3]]  # (K, B, n_1) views of its columns
        self.above = []
        for l in range(2, L + 1):
            out, z, grad, scratch = buffers((K, batch, sizes[l]), l < L)
            self.above.append(DenseBuffers(below[0], out, z, grad, below[2], scratch, self.ones, matmul))
            below = [out, None, grad]
        # Without a hidden layer the first is the output: the loss reads each member's logits
        # and writes its delta_L in rows of their own (kernels take contiguous rows), copied over.
        self.logits = None if L > 1 else (empty((K, batch, sizes[1]), dtype), empty((K, batch, sizes[1]), dtype))
        if self.logits is not None:
            below = [self.logits[0], None, self.logits[1]]
        unweighted = [LossBuffers(below[0][k], self.target, below[2][k], self.loss[k:k + 1].reshape(()), self.row[k])
                      for k in range(K)]
        self.loss_buffers = {False: unweighted,
                             True: [u._replace(weight=self.weight[k], weight_sum=self.weight_sum[k:k + 1].reshape(()))
                                    for k, u in enumerate(unweighted)]}


def by_member(wide, members):
    """(B, K n) as (K, B, n): member k's columns, a view."""
    rows, cols = wide.shape
    return wide.reshape(rows, members, cols // members).transpose(1, 0, 2)
