"""The parameters of an MLP: one flat buffer, its gradient twin, and per-layer views.

Every W_l (n_l, n_{l-1}) and b_l (n_l,) is a view into one flat buffer laid out
W_1, b_1, W_2, b_2, ..., and every gradient a view into a second flat buffer of
the same layout, so an optimizer updates all parameters in one pass. In mixed
precision the GEMMs read a 16-bit copy whose tensors each start 16 bytes aligned
(``aligned_layout``), refreshed after every update.
"""

import numpy as np

from ..backend import Dense
from .activations import IDENTITY

LOW_ALIGN = 8  # elements: 16 bytes of a 16-bit type


def parameter_count(sizes):
    """Weights and biases of an MLP with layer widths ``sizes``: sum of n_l (n_{l-1} + 1)."""
    return sum(o * i + o for i, o in zip(sizes[:-1], sizes[1:]))


def layout(sizes):
    """(weight slice, bias slice, out, in) of each layer in the flat buffer."""
    start = 0
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        w_end = start + n_out * n_in
        yield slice(start, w_end), slice(w_end, w_end + n_out), n_out, n_in
        start = w_end + n_out


def names(sizes):
    """state_dict's names, layer by layer: (weight name, bias name)."""
    return [(f"layers.{i}.weight", f"layers.{i}.bias") for i in range(len(sizes) - 1)]


def aligned_layout(lengths, align=LOW_ALIGN):
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


def initial_values(sizes, act, rng):
    """He-normal weights (std sqrt(2 / n_in)) for the ReLU family, Glorot-uniform (limit
    sqrt(6 / (n_in + n_out))) otherwise; zero biases. Drawn in float64 whatever the
    dtype, so float32 and float64 models of one seed start equal up to rounding."""
    flat = np.zeros(parameter_count(sizes))
    for w, _, n_out, n_in in layout(sizes):
        if act.he_init:
            flat[w] = rng.normal(0.0, np.sqrt(2.0 / n_in), n_out * n_in)
        else:
            limit = np.sqrt(6.0 / (n_in + n_out))
            flat[w] = rng.uniform(-limit, limit, n_out * n_in)
    return flat


class Parameters:
    """The flat buffers on one backend: ``flat`` (the parameters, in ``dtype``),
    ``grads``, ``low`` (the 16-bit copy of mixed precision, else None) and
    ``layers``: per layer a Dense of views (W, b from ``low`` where it exists)."""

    def __init__(self, backend, sizes, act, dtype, compute_dtype, flat_host):
        self.backend, self.sizes = backend, sizes
        mixed = np.dtype(compute_dtype) != np.dtype(dtype)
        lengths = [n for w, b, _, _ in layout(sizes) for n in (w.stop - w.start, b.stop - b.start)]
        starts, shifts, low_size = aligned_layout(lengths)
        with backend.context():
            self.flat = backend.asarray(flat_host, dtype=dtype)
            self.grads = backend.zeros(self.flat.shape, dtype)
            self.low = backend.empty((low_size,), compute_dtype) if mixed else None
            self.low_segments = (backend.asarray(np.array(starts, np.int64)),
                                 backend.asarray(np.array(shifts, np.int64))) if mixed else None
        weights, shift = (self.flat, [0] * len(shifts)) if self.low is None else (self.low, shifts)
        self.layers = []
        L = len(sizes) - 1
        for l, (w, bias, n_out, n_in) in enumerate(layout(sizes)):
            sw, sb = shift[2 * l], shift[2 * l + 1]
            self.layers.append(Dense(weights[w.start + sw:w.stop + sw].reshape(n_out, n_in),
                                     weights[bias.start + sb:bias.stop + sb],
                                     self.grads[w].reshape(n_out, n_in), self.grads[bias],
                                     act if l < L - 1 else IDENTITY))
        self.changed()

    def buffers(self):
        """What a captured step that updates the parameters reads and writes."""
        return self.flat, self.grads, self.low, self.low_segments

    def changed(self):
        """Refresh the 16-bit copy (mixed precision) after the parameters changed."""
        with self.backend.context():
            self.cast()

    def cast(self):
        """The 16-bit copy from the parameters, on the current stream (a train step's
        last launch, captured with it)."""
        if self.low is not None:
            self.backend.cast_parameters(self.flat, self.low, *self.low_segments)

    def named(self, flat):
        """A host copy of a flat buffer (parameters or gradients), split under state_dict's names."""
        host = self.backend.to_host(flat).copy()
        d = {}
        for (wn, bn), (w, b, n_out, n_in) in zip(names(self.sizes), layout(self.sizes)):
            d[wn], d[bn] = host[w].reshape(n_out, n_in), host[b]
        return d

    def load(self, state):
        """Copy a state_dict in; names, shapes, dtypes and values are all checked first."""
        if not hasattr(state, "keys"):
            raise TypeError(f"state_dict must be a mapping of names to arrays, got {type(state).__name__}")
        expected = {n for pair in names(self.sizes) for n in pair}
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise KeyError(f"state_dict does not match {self.sizes}: missing {sorted(missing)}, "
                           f"unexpected {sorted(unexpected)}")
        flat = np.empty(self.flat.shape[0], dtype=self.flat.dtype)
        for (wn, bn), (w, b, n_out, n_in) in zip(names(self.sizes), layout(self.sizes)):
            for name, sl, shape in ((wn, w, (n_out, n_in)), (bn, b, (n_out,))):
                arr = np.asarray(self.backend.to_host(state[name]))
                if arr.shape != shape:
                    raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")
                if arr.dtype.kind != "f":
                    raise TypeError(f"{name} has dtype {arr.dtype}, expected a float dtype")
                if not np.isfinite(arr).all():
                    raise ValueError(f"{name} contains NaN or Inf")
                flat[sl] = arr.ravel()
        self.assign(flat)

    def assign(self, flat_host):
        """Overwrite every parameter from a host flat buffer (already checked)."""
        with self.backend.context():
            self.backend.xp.copyto(self.flat, self.backend.asarray(flat_host, dtype=self.flat.dtype))
        self.changed()
