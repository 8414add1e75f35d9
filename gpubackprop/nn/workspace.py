"""The buffers of one train step at one batch size, and the cache that keeps them.

A step allocates nothing after the first of its batch size: everything it writes
lives in a Workspace made once for that size. The cache keeps the few sizes a fit
uses (the batch, its last partial batch, evaluation's chunks) and says plainly
when a device has no room for one.
"""

import collections
import weakref

import numpy as np

from ..backend import DenseBuffers, LossBuffers, OutOfMemoryError

KEPT = 4  # the training batch, its last partial batch, and evaluation's


class Workspace:
    """The buffers of one step at batch size B (index l: layer l, 0 = the input).

    a[l]       activations a_l (a[0] the input rows)
    z[l]       pre-activations z_l, only where g' needs z
    delta[l]   dL/da_l, turned into delta_l = dL/dz_l in place by the backward pass
    dropped[l] the dropped copy of a_l fed to layer l + 1 (hidden layers, with dropout)
    scratch[l] the activation's temporaries (backends with elementwise_scratch)
    target     the targets; loss the batch's loss (0-d); index the rows this batch
               is gathered from; first_row where it starts in the global batch (data
               parallel: a rank's shard; dropout masks are drawn by that position)
    weight     the rows' sample weights and weight_sum their sum, in weight_dtype;
               read by the loss only while ``weighted`` (set by whoever fills the batch)
    """

    def __init__(self, backend, sizes, act, batch, dtype, dropout=False, matmul=None):
        L = len(sizes) - 1
        empty = backend.empty
        self.batch = batch
        self.first_row = 0
        self.a = [empty((batch, n), dtype) for n in sizes]
        self.delta = [None] + [empty((batch, n), dtype) for n in sizes[1:]]
        self.z = [None] * (L + 1)
        self.scratch = [()] * (L + 1)
        self.dropped = [None] * (L + 1)
        for l in range(1, L):
            if act.needs_z:
                self.z[l] = empty((batch, sizes[l]), dtype)
            if backend.elementwise_scratch:
                self.scratch[l] = tuple(empty((batch, sizes[l]), dtype) for _ in range(act.n_scratch))
            if dropout:
                self.dropped[l] = empty((batch, sizes[l]), dtype)
        self.target = empty((batch, sizes[-1]), dtype)
        self.row = empty((batch,), dtype)
        self.ones = backend.xp.ones((batch,), dtype)
        self.matmul = matmul
        self.pred = empty((batch,), np.int64)
        self.index = empty((batch,), np.int64)
        self.loss = empty((), dtype)
        self.weight = empty((batch,), weight_dtype(dtype))
        self.weight_sum = empty((), weight_dtype(dtype))
        self.weighted = False
        # The primitives' views, made once: a step builds no tuples per layer.
        self._layers = {train: [None] + [self._views(l, train) for l in range(1, L + 1)] for train in (False, True)}
        unweighted = LossBuffers(self.a[-1], self.target, self.delta[-1], self.loss, self.row)
        self._loss = {False: unweighted, True: unweighted._replace(weight=self.weight, weight_sum=self.weight_sum)}

    @staticmethod
    def nbytes(sizes, act, batch, itemsize, dropout=False, scratch=True):
        """The bytes __init__ allocates (``scratch``: the backend's elementwise_scratch;
        a test holds the two together)."""
        hidden = sum(sizes[1:-1])
        per_hidden = act.needs_z + act.n_scratch * bool(scratch) + bool(dropout)
        floats = batch * (sum(sizes) + sum(sizes[1:]) + hidden * per_hidden + sizes[-1] + 2) + 1
        return floats * itemsize + (batch + 1) * max(itemsize, 4) + batch * (8 + 8)

    def layer(self, l, train):
        """Layer l's DenseBuffers; ``train``: its input is the dropped copy where there is one."""
        return self._layers[train][l]

    def loss_buffers(self):
        return self._loss[self.weighted]

    def set_weights(self, backend, weights=None):
        """The batch's sample weights (a device vector of ``batch`` values, already in
        ``weight``), or None: unweighted. Sums them for the loss."""
        self.weighted = weights is not None
        if self.weighted:
            if weights is not self.weight:  # else gathered there already
                backend.xp.copyto(self.weight, weights)
            backend.sum(self.weight, self.weight_sum)

    def _views(self, l, train):
        source = self.dropped[l - 1] if train and self.dropped[l - 1] is not None else self.a[l - 1]
        return DenseBuffers(source, self.a[l], self.z[l], self.delta[l], self.delta[l - 1] if l > 1 else None,
                            self.scratch[l], self.ones, self.matmul)


class Workspaces:
    """The workspaces of one network, by batch size, least recently used first out.

    ``users`` (weakly held: the captured-step caches of the network's trainers) are
    told of each one dropped, ``user.forget(workspace)``: a captured step holding it
    must go too, or its memory stays alive, unaccounted."""

    def __init__(self, backend, sizes, act, dtype, dropout):
        self.backend, self.sizes, self.act, self.dtype, self.dropout = backend, sizes, act, dtype, dropout
        self.users = weakref.WeakSet()
        self._kept = collections.OrderedDict()
        self._matmul, self._chosen = None, False  # chosen with the first workspace, kept: one BLAS per model

    def live(self):
        """The workspaces kept now."""
        return list(self._kept.values())

    def get(self, batch):
        ws = self._kept.pop(batch, None)
        if ws is None:
            ws = self._make(batch)
            while len(self._kept) >= KEPT:
                _, evicted = self._kept.popitem(last=False)
                for user in list(self.users):
                    user.forget(evicted)
        self._kept[batch] = ws
        return ws

    def _make(self, batch):
        backend = self.backend
        need = Workspace.nbytes(self.sizes, self.act, batch, np.dtype(self.dtype).itemsize, self.dropout,
                                backend.elementwise_scratch)
        free = backend.free_bytes()
        try:
            if free is not None and need > free:  # say so before trying, not after a failed allocation
                raise MemoryError
            with backend.context():
                if not self._chosen:
                    self._matmul = backend.matmul_for(self.sizes, self.act, batch, self.dtype, self.dropout)
                    self._chosen = True
                return Workspace(backend, self.sizes, self.act, batch, self.dtype, self.dropout, self._matmul)
        except MemoryError:
            raise out_of_memory(backend, f"the buffers of a batch of {batch} rows", need,
                                "use a smaller batch_size") from None


def weight_dtype(dtype):
    """The dtype of sample weights for a batch of ``dtype``: never 16-bit, which would
    round them and could overflow their sum."""
    return np.dtype(dtype) if np.dtype(dtype).itemsize >= 4 else np.dtype(np.float32)


def out_of_memory(backend, what, need, fix):
    """The OutOfMemoryError for ``what`` (``need`` bytes) on ``backend``, naming ``fix``."""
    free = backend.free_bytes()
    free = "" if free is None else f", {_megabytes(free)} free"
    return OutOfMemoryError(f"{backend.name} ran out of memory allocating {what}: "
                            f"{_megabytes(need)} needed{free}; {fix}. The model is unchanged.")


def _megabytes(n):
    return f"{n / 2**20:,.1f} MiB"
