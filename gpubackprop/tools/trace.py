"""One training step with every number shown: ``trace(model, X, y)``.

For layers l = 1..L (layer 0 is the input x), unit j of layer l, unit k of layer
l - 1 and one sample (the engine runs a batch of B samples as rows):

    z^(l)_j = sum_k w^(l)_{j,k} a^(l-1)_k + b^(l)_j,   a^(l)_j = g(z^(l)_j),   a^(L) = z^(L)
    delta^(L) = dL/dz^(L) = 2 (a^(L) - y) / (B n_L)             mse
                          = (q - y) / B,  q = softmax(a^(L))     cross_entropy
                          (each loss's own: its row of gpubackprop.nn.losses)
    delta^(l)_k = (sum_j w^(l+1)_{j,k} delta^(l+1)_j) g'(z^(l)_k)
    dL/dw^(l)_{j,k} = sum over the batch of delta^(l)_j a^(l-1)_k
    dL/db^(l)_j     = sum over the batch of delta^(l)_j
    SGD(lr):  w <- w - lr dL/dw,   b <- b - lr dL/db

(the deltas carry the 1/B of a batch-mean loss). w^(l)_{j,k} is the weight from
unit k of layer l - 1 to unit j of layer l. Units are counted from 1 as in the
textbook, so w^(l)_{j,k} is ``trace.layers[l].W[j - 1, k - 1]``, which is
``model.state_dict()[f"layers.{l - 1}.weight"][j - 1, k - 1]``.

The numbers are the engine's own: trace runs a Trainer's step (gpubackprop.train),
the step that ``train_step`` and ``fit`` run, on the model's backend (the CUDA kernels on a GPU),
and reads a, delta, dW and db from its buffers. Only z is formed on the side, since
the engine keeps it for GELU alone (g' of the others is a function of a): the
forward pass runs once before the step, and each layer's GEMM and bias are repeated
into a buffer of their own by the same dense_forward primitive, with the identity
activation. The model and the optimizer take the step, as with ``train_step``.

    t = gb.trace(model, X, y)       # one SGD(lr=0.1) step
    print(t.to_text())              # or t.to_markdown(); t.plot("step.png") draws it
    t.layers[1].delta               # (B, n_1) host arrays, like every other number
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..backend import DenseBuffers
from ..nn.losses import HUBER_DELTA, get_loss, softmax
from ..nn.activations import IDENTITY, get_activation
from ..optim import SGD
from ..train.trainer import Trainer, check_optimizer
from . import plots

_SAMPLES_SHOWN = 4


@dataclass
class Layer:
    """Layer l's numbers, host NumPy arrays: rows are samples, W is (n_l, n_{l-1}).
    The input layer (l = 0) has only ``a`` (= X)."""

    a: np.ndarray
    z: Optional[np.ndarray] = None
    delta: Optional[np.ndarray] = None
    W: Optional[np.ndarray] = None  # before the step
    b: Optional[np.ndarray] = None
    dW: Optional[np.ndarray] = None  # dL/dW, summed over the batch
    db: Optional[np.ndarray] = None
    W_new: Optional[np.ndarray] = None  # after the step
    b_new: Optional[np.ndarray] = None


@dataclass
class Trace:
    """What ``trace`` saw: the model's repr, ``layers[l]`` for l = 0..L, the targets
    y as rows (one-hot for cross entropy), the softmax q (cross entropy, else None)
    and the batch's loss."""

    model: str
    activation: str
    loss_name: str
    optimizer: object
    layers: list
    y: np.ndarray
    q: Optional[np.ndarray]
    loss: float
    huber_delta: float = HUBER_DELTA

    @property
    def sizes(self):
        return [layer.a.shape[1] for layer in self.layers]

    @property
    def params_before(self):
        return self._params("W", "b")

    @property
    def params_after(self):
        return self._params("W_new", "b_new")

    def _params(self, w, b):
        """Under state_dict's names."""
        d = {}
        for l, layer in enumerate(self.layers[1:]):
            d[f"layers.{l}.weight"], d[f"layers.{l}.bias"] = getattr(layer, w), getattr(layer, b)
        return d

    # ---- reports ------------------------------------------------------------------
    def to_text(self, digits=6):
        """Aligned plain-text tables for the terminal."""
        out = list(self._header())
        for name, formulas, header, rows in self._tables(digits, markdown=False):
            out += ["", f"{name}:  " + formulas[0]] + [" " * (len(name) + 3) + f for f in formulas[1:]]
            cells = [header] + rows
            widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
            for r in cells:
                out.append("  " + "   ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                            for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        return "\n".join(out) + "\n"

    def to_markdown(self, digits=6):
        """The same tables in Markdown, the symbols in LaTeX ($...$, as GitHub renders)."""
        h = self._header()
        out = [f"**{h[0]}**", "", f"{h[1]}; {h[2]}."]
        for name, formulas, header, rows in self._tables(digits, markdown=True):
            out += ["", f"#### {name}", "", "<br>".join(f"`{f}`" for f in formulas), "",
                    "| " + " | ".join(header) + " |", "|" + "|".join([":--"] + ["--:"] * (len(header) - 1)) + "|"]
            out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out) + "\n"

    def _header(self):
        B = self.layers[0].a.shape[0]
        shown = "" if B <= _SAMPLES_SHOWN else f" (the first {_SAMPLES_SHOWN} shown)"
        return [f"One training step of {self.model}",
                f"{B} sample{'s' if B > 1 else ''}{shown}, optimizer {_name(self.optimizer)}",
                "units count from 1; w^(l)_{j,k} joins unit k of layer l-1 to unit j of layer l "
                "(layers.{l-1}.weight[j-1, k-1])"]

    def _tables(self, digits, markdown):
        """(name, formulas, header, rows) of each table, the cells formatted."""
        L = len(self.layers) - 1
        B = self.layers[0].a.shape[0]
        samples = [""] + [f"sample {i + 1}" for i in range(min(B, _SAMPLES_SHOWN))]

        def sym(s, l=None, j=None):
            if markdown:
                s = {"delta": r"\delta"}.get(s, s)
                return f"${s}" + ("" if l is None else f"^{{({l})}}") + ("" if j is None else f"_{{{j}}}") + "$"
            j = j if j is None or "," not in str(j) else f"{{{j}}}"
            return s + ("" if l is None else f"^({l})") + ("" if j is None else f"_{j}")

        def num(v):
            return f"{float(v) + 0.0:.{digits}g}"  # + 0.0: no "-0"

        def per_sample(name, values):
            return [name] + [num(v) for v in values[:_SAMPLES_SHOWN]]

        rows = [per_sample(f"{sym('a', 0, k + 1)} = {sym('x', None, k + 1)}", col)
                for k, col in enumerate(self.layers[0].a.T)]
        for l, layer in enumerate(self.layers[1:], 1):
            for j in range(layer.a.shape[1]):
                rows += [per_sample(sym("z", l, j + 1), layer.z[:, j]), per_sample(sym("a", l, j + 1), layer.a[:, j])]
        formulas = ["z^(l) = W^(l) a^(l-1) + b^(l)"]
        if L > 1:
            formulas.append(f"a^(l) = {self.activation}(z^(l)) for l = {'1' if L == 2 else f'1..{L - 1}'}")
        yield "forward", formulas + [f"a^({L}) = z^({L}) (the output layer is linear)"], samples, rows

        rows = [per_sample(sym("y", None, j + 1), col) for j, col in enumerate(self.y.T)]
        loss_formula, delta_formula = (text.format(a=f"a^({L})", n=f"n_{L}", d=f"{self.huber_delta:g}")
                                       for text in get_loss(self.loss_name).formula)
        if self.q is not None:
            rows += [per_sample(sym("q", None, j + 1), col) for j, col in enumerate(self.q.T)]
        rows.append(["L (batch mean)", num(self.loss)] + [""] * (len(samples) - 2))
        yield "loss", [loss_formula], samples, rows

        rows = [per_sample(sym("delta", l, j + 1), col)
                for l in range(L, 0, -1) for j, col in enumerate(self.layers[l].delta.T)]
        formulas = [f"delta^({L}) = dL/dz^({L}) = {delta_formula}"]
        if L > 1:
            formulas.append(f"delta^(l)_k = (sum_j w^(l+1)_{{j,k}} delta^(l+1)_j) g'(z^(l)_k),  "
                            f"g' = {get_activation(self.activation).grad_formula}")
        yield "backward", formulas, samples, rows

        rows = []
        for l, layer in enumerate(self.layers[1:], 1):
            for j in range(layer.W.shape[0]):
                rows += [[sym("w", l, f"{j + 1},{k + 1}"), num(layer.W[j, k]), num(layer.dW[j, k]),
                          num(layer.W_new[j, k])] for k in range(layer.W.shape[1])]
            rows += [[sym("b", l, j + 1), num(layer.b[j]), num(layer.db[j]), num(layer.b_new[j])]
                     for j in range(layer.b.shape[0])]
        formulas = ["dL/dw^(l)_{j,k} = sum over the batch of delta^(l)_j a^(l-1)_k",
                    "dL/db^(l)_j = sum over the batch of delta^(l)_j"]
        lr = self.optimizer.hyperparams["lr"]
        formulas.append(f"after = before - {lr:g} gradient" if _plain_sgd(self.optimizer)
                        else f"after: one step of {self.optimizer!r} (gpubackprop.optim)")
        yield "update", formulas, ["", "before", "gradient", "after"], rows

    def plot(self, path):
        """A PNG of the network: a node per unit with x, or z, a, delta and its bias
        before and after; an edge per weight with w before and after, and dL/dw,
        coloured by the gradient's sign. Nodes show the first sample. The values are
        written out up to 12 units a layer and 12 weights between two layers."""
        from matplotlib.collections import LineCollection
        from matplotlib.transforms import Bbox

        sizes, L, B = self.sizes, len(self.layers) - 1, self.layers[0].a.shape[0]
        tall, crowded = max(sizes), max(a * b for a, b in zip(sizes, sizes[1:]))
        labelled = tall <= 12 and crowded <= 12
        if labelled:
            fig = plots.figure(((3.6 if crowded <= 8 else 4.8) * (L + 1), max(3.5, 1.45 * tall + 1.4)))
        else:  # the shape and the gradients' signs alone
            fig = plots.figure((max(8.0, 2.5 * (L + 1)), min(12.0, 0.3 * tall + 2.5)))
        ax = fig.subplots()
        ax.set_axis_off()
        ax.set_xlim(-0.4, L + 0.4)
        bottom = 1.0 if tall in sizes[1:] else 0.55  # room for a hidden node's four lines, or an input's one
        ax.set_ylim(-(tall - 1) / 2 - bottom, (tall - 1) / 2 + 0.3)
        ax.set_title(f"{self.model}\none step of {_name(self.optimizer)}: loss {self.loss:.6g}"
                     + (f"; nodes show sample 1 of {B}" if B > 1 and labelled else "")
                     + "\nedges: red where ∂L/∂w > 0, blue where ≤ 0", fontsize=10)
        pos = [[(l, (n - 1) / 2 - j) for j in range(n)] for l, n in enumerate(sizes)]
        edges = [(l, j, k) for l in range(1, L + 1) for j in range(sizes[l]) for k in range(sizes[l - 1])]
        ax.add_collection(LineCollection(
            [(pos[l - 1][k], pos[l][j]) for l, j, k in edges], linewidths=0.9, alpha=0.6 if labelled else 0.3,
            colors=["tab:red" if self.layers[l].dW[j, k] > 0 else "tab:blue" for l, j, k in edges], zorder=1))
        ax.scatter(*zip(*(p for column in pos for p in column)), s=500 if labelled else 60, color="white",
                   edgecolors="black", zorder=3)
        if not labelled:
            return plots.save_png(fig, path)
        boxes = []
        for l, layer in enumerate(self.layers):
            for j, (x, y) in enumerate(pos[l]):
                ax.text(x, y, f"$x_{{{j + 1}}}$" if l == 0 else f"$a^{{({l})}}_{{{j + 1}}}$", fontsize=8.5,
                        ha="center", va="center", zorder=4)
                text = f"{layer.a[0, j] + 0.0:.4g}" if l == 0 else (
                    f"z {layer.z[0, j] + 0.0:.4g}\na {layer.a[0, j] + 0.0:.4g}\nδ {layer.delta[0, j] + 0.0:.4g}\n"
                    f"b {layer.b[j] + 0.0:.3g} → {layer.b_new[j] + 0.0:.4g}")
                boxes.append(ax.text(x, y - 0.17, text, fontsize=8, ha="center", va="top", zorder=4,
                                     bbox=dict(boxstyle="round,pad=0.3", fc="lightyellow", ec="gray", lw=0.5)))
        fig.canvas.draw()  # lays the figure out, so that boxes can be measured
        fig.set_layout_engine("none")
        renderer = fig.canvas.get_renderer()
        taken = [box.get_window_extent(renderer).expanded(1.05, 1.1) for box in boxes]
        r = 14 * fig.dpi / 72  # a node's radius in pixels (s=500 points^2: 11.2 points), and a margin
        taken += [Bbox.from_extents(*(ax.transData.transform(p) + [[-r, -r], [r, r]]).ravel())
                  for column in pos for p in column]
        # Level edges first: their labels can only slide sideways past the others.
        for l, j, k in sorted(edges, key=lambda e: abs(pos[e[0]][e[1]][1] - pos[e[0] - 1][e[2]][1])):
            layer = self.layers[l]
            text = (f"$w^{{({l})}}_{{{j + 1},{k + 1}}}$ {layer.W[j, k] + 0.0:.3g} → {layer.W_new[j, k] + 0.0:.4g}\n"
                    f"$\\partial L/\\partial w$ {layer.dW[j, k] + 0.0:.3g}")
            label = ax.text(0, 0, text, fontsize=7.5, ha="center", va="center", zorder=2,
                            bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.85))
            taken.append(_place(label, pos[l - 1][k], pos[l][j], taken, renderer).expanded(1.02, 1.1))
        plots.save_png(fig, path)


def _place(label, start, end, taken, renderer):
    """Put ``label`` on the line from start to end where it overlaps the fewest of the
    ``taken`` boxes, nearest the middle; returns its box."""
    (x0, y0), (x1, y1) = start, end
    best = None
    for t in sorted(np.linspace(0.15, 0.85, 15), key=lambda t: abs(t - 0.5)):
        label.set_position((x0 + t * (x1 - x0), y0 + t * (y1 - y0)))
        extent = label.get_window_extent(renderer)
        clashes = sum(extent.overlaps(other) for other in taken)
        if best is None or clashes < best[0]:
            best = clashes, t, extent
        if not clashes:
            break
    t = best[1]
    label.set_position((x0 + t * (x1 - x0), y0 + t * (y1 - y0)))
    return best[2]


def _plain_sgd(optimizer):
    h = optimizer.hyperparams
    return isinstance(optimizer, SGD) and not (h["momentum"] or h["weight_decay"])


def _name(optimizer):
    return f"SGD(lr={optimizer.lr:g})" if _plain_sgd(optimizer) else repr(optimizer)


def trace(model, X, y, optimizer=None):
    """Run one training step of ``model`` on the batch (X, y) and return a Trace of
    every intermediate (see the module docstring). ``optimizer`` defaults to
    SGD(lr=0.1). The model and the optimizer take the step, as ``train_step`` does."""
    optimizer = SGD(lr=0.1) if optimizer is None else check_optimizer(optimizer)
    if model.dropout:
        raise ValueError("trace shows steps without dropout; make the model with dropout=0")
    if model.compute_dtype != np.dtype(model.dtype):
        raise ValueError(f"trace shows float32 and float64 steps, not mixed precision {model.precision!r}")
    be = model.backend
    with model.context():
        ws = model.load_batch(X, y)
        before = model.state_dict()
        # z first: the step's forward pass, run once more, with each layer's GEMM and bias
        # repeated into a buffer of its own by the same primitive with g = identity.
        model.forward_pass(ws)
        z = [None]
        for l, layer in enumerate(model.layers, start=1):
            buf = be.empty(ws.a[l].shape, ws.a[l].dtype)
            be.dense_forward(layer._replace(act=IDENTITY), DenseBuffers(ws.a[l - 1], buf, None, None, None, (), None))
            z.append(be.to_host(buf).copy())
        loss = float(Trainer(model, optimizer, graphs=False).step(ws))
        optimizer.sync_steps()
        grads, after = model.grad_dict(), model.state_dict()
        host = [be.to_host(a).copy() for a in ws.a]
        deltas = [None] + [be.to_host(d).copy() for d in ws.delta[1:]]
        y_rows = be.to_host(ws.target).copy()
        q = None
        if model.loss == "cross_entropy":
            qd, row = be.empty(ws.a[-1].shape, ws.a[-1].dtype), be.empty((ws.batch,), ws.a[-1].dtype)
            softmax(be.xp, ws.a[-1], qd, row)
            q = be.to_host(qd).copy()
    layers = [Layer(a=host[0])]
    for l in range(1, len(model.sizes)):
        w, bias = f"layers.{l - 1}.weight", f"layers.{l - 1}.bias"
        layers.append(Layer(a=host[l], z=z[l], delta=deltas[l], W=before[w], b=before[bias], dW=grads[w],
                            db=grads[bias], W_new=after[w], b_new=after[bias]))
    return Trace(repr(model), model.activation, model.loss, optimizer, layers, y_rows, q, loss, model.criterion.delta)
