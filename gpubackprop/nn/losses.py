"""Losses with their gradient, each in one pass over the network's output.

For a batch of B rows, logits z (B, C) and targets y (B, C), every loss is a
weighted mean of row losses l_i over the batch:

    L = sum_i s_i l_i,    delta_L = dL/dz,  row i = s_i dl_i/dz_i,
    s_i = 1/B                  without sample weights,
    s_i = w_i / sum_j w_j      with sample weights w (0 where they sum to 0),

so that a row of weight 0 counts as if it were not there, and weights 1 are no
weights (scikit-learn's ``sample_weight``). A batch whose weights are all 0 has loss
and gradient 0; its step still runs (momentum and Adam's moments carry on). The row losses:

    cross_entropy         q = softmax(z_i), l_i = -sum_c y_ic log q_ic,    dl_i/dz_i = q_i - y_i
                          With rows of y summing to 1, log q_ic = z_ic - lse_i, so
                          l_i = log s_i - sum_c y_ic (z_ic - m_i),  s_i = sum_c e^(z_ic - m_i),
                          m_i = max_c z_ic: the shift keeps exp from overflowing, and the
                          dot product on z - m rather than z does not cancel two large numbers.
    binary_cross_entropy  l_i = 1/C sum_c [max(z, 0) - z y + log(1 + e^-|z|)]  (a log-sigmoid
                          that neither overflows nor loses small terms), dl/dz = (sigmoid z - y) / C
    mse                   l_i = 1/C sum_c (z - y)^2,                        dl/dz = 2 (z - y) / C
    huber (delta d)       l_i = 1/C sum_c h(z - y),  h(u) = u^2 / 2 (|u| <= d), d (|u| - d/2) (else),
                          dl/dz = clamp(z - y, -d, d) / C
    mae                   l_i = 1/C sum_c |z - y|,   dl/dz = sign(z - y) / C  (0 at 0)
    poisson               l_i = 1/C sum_c (e^z - y z),  dl/dz = (e^z - y) / C  (z: the log of the
                          mean count, PyTorch's PoissonNLLLoss(log_input=True))

Unweighted, each is PyTorch's loss with reduction="mean" (the element-wise ones
average over all B C elements). This module is the one table of losses: each row
holds the kernels' code (``LOSS_*`` in kernels/loss.cu), what ``predict`` makes
of z (``output``), the metric fit reports beside the loss, the targets it takes,
the NumPy row losses and gradients, float64 references for the tests, and
PyTorch's module for the comparisons.

The NumPy functions fill ``delta`` with dl_i/dz_i and ``row`` with the row losses
(element-wise ones: summed over c; ``finish`` divides by C with the scale);
``finish`` applies s_i and returns L as a 0-d array of z's dtype.
"""

import dataclasses
from typing import Callable, Optional

import numpy as np

from ..optim.base import check

HUBER_DELTA = 1.0  # torch.nn.HuberLoss's default


@dataclasses.dataclass(frozen=True)
class Loss:
    """One loss: see the module docstring. ``delta`` is huber's threshold (unused by the others)."""

    name: str
    code: int  # LOSS_<NAME> in kernels/loss.cu
    output: str  # what predict makes of z: "softmax" (labels: argmax), "sigmoid" (labels: z > 0), "identity", "exp"
    metric: str  # the metric reported beside the loss: "accuracy" (rows), "binary_accuracy" (elements), a loss name, or ""
    targets: str  # "classes": labels or probability rows; "binary": values in [0, 1]; "values"; "counts": >= 0
    numpy: Callable  # (xp, z, y, delta, row, d): delta = dl/dz (unscaled), row = the row losses (summed over c)
    reference: Callable  # (z, y, d) float64 -> (element or row losses, their gradient), written for reading
    torch: tuple  # (torch.nn module name, keyword arguments)
    formula: tuple = ("", "")  # (L, delta_L) as trace prints them, with {a} the output a^(L), {n} its width, {d} huber's delta
    piece: Optional[Callable] = None  # (z, y, d): which piece of a piecewise loss each element is on (gradcheck)
    delta: float = HUBER_DELTA

    @property
    def elementwise(self):
        """Whether l_i averages over the row's C elements (every loss but cross entropy)."""
        return self.name != "cross_entropy"

    @property
    def classifies(self):
        return self.output in ("softmax", "sigmoid")


def softmax(xp, z, out, row):
    """out = softmax(z) row-wise; returns nothing. ``row`` ends holding sum e^(z - m)."""
    xp.max(z, axis=1, out=row)
    xp.subtract(z, row[:, None], out=out)
    xp.exp(out, out=out)
    xp.sum(out, axis=1, out=row)
    xp.divide(out, row[:, None], out=out)


def sigmoid(xp, z, out):
    """out = 1 / (1 + e^-z), as 1 / (1 + e^-|z|) or e^-|z| / (1 + e^-|z|): exp never
    overflows, and small probabilities keep their relative precision."""
    e = xp.exp(-xp.abs(z))
    xp.divide(xp.where(z >= 0, 1.0, e), 1.0 + e, out=out)


def output(xp, loss, z, out, row):
    """out = what the model predicts from logits z: softmax or sigmoid probabilities,
    e^z (poisson's mean count) or z itself. ``row``: a (B,) scratch."""
    if loss.output == "softmax":
        softmax(xp, z, out, row)
    elif loss.output == "sigmoid":
        sigmoid(xp, z, out)
    elif loss.output == "exp":
        xp.exp(z, out=out)
    elif out is not z:
        xp.copyto(out, z)


# ---- the NumPy row losses ---------------------------------------------------------------------
def _cross_entropy(xp, z, y, delta, row, d):
    xp.max(z, axis=1, out=row)
    xp.subtract(z, row[:, None], out=delta)  # z - m
    y_dot = (y * delta).sum(axis=1)
    xp.exp(delta, out=delta)
    xp.sum(delta, axis=1, out=row)
    xp.divide(delta, row[:, None], out=delta)  # q
    xp.log(row, out=row)
    xp.subtract(row, y_dot, out=row)
    xp.subtract(delta, y, out=delta)


def _binary_cross_entropy(xp, z, y, delta, row, d):
    f = xp.log1p(xp.exp(-xp.abs(z)))
    f += xp.maximum(z, 0) - z * y
    f.sum(axis=1, out=row)
    sigmoid(xp, z, delta)
    xp.subtract(delta, y, out=delta)


def _mse(xp, z, y, delta, row, d):
    xp.subtract(z, y, out=delta)
    (delta * delta).sum(axis=1, out=row)
    xp.multiply(delta, 2.0, out=delta)


def _huber(xp, z, y, delta, row, d):
    xp.subtract(z, y, out=delta)
    u = xp.abs(delta)
    xp.where(u <= d, 0.5 * delta * delta, d * (u - 0.5 * d)).sum(axis=1, out=row)
    xp.clip(delta, -d, d, out=delta)


def _mae(xp, z, y, delta, row, d):
    xp.subtract(z, y, out=delta)
    xp.abs(delta).sum(axis=1, out=row)
    xp.sign(delta, out=delta)


def _poisson(xp, z, y, delta, row, d):
    xp.exp(z, out=delta)
    (delta - y * z).sum(axis=1, out=row)
    xp.subtract(delta, y, out=delta)


# ---- float64 references (tests) -----------------------------------------------------------------
def _ref_cross_entropy(z, y, d):
    lse = np.log(np.sum(np.exp(z - z.max(axis=1, keepdims=True)), axis=1)) + z.max(axis=1)
    log_q = z - lse[:, None]
    return -np.sum(y * log_q, axis=1), np.exp(log_q) - y


def _ref_binary_cross_entropy(z, y, d):
    """-[y log p + (1 - y) log(1 - p)], p = sigmoid z, which is log(1 + e^z) - y z
    (written so: log(1 - p) loses digits as p nears 1)."""
    return np.logaddexp(0.0, z) - y * z, 1.0 / (1.0 + np.exp(-z)) - y


def _ref_huber(z, y, d):
    u = z - y
    return np.where(np.abs(u) <= d, u**2 / 2, d * (np.abs(u) - d / 2)), np.clip(u, -d, d)


LOSSES = {loss.name: loss for loss in (
    Loss("cross_entropy", 0, "softmax", "accuracy", "classes", _cross_entropy, _ref_cross_entropy,
         ("CrossEntropyLoss", {}), ("q = softmax({a}),  L = -1/B sum over the batch of sum_j y_j log q_j", "(q - y) / B")),
    Loss("binary_cross_entropy", 2, "sigmoid", "binary_accuracy", "binary", _binary_cross_entropy,
         _ref_binary_cross_entropy, ("BCEWithLogitsLoss", {}),
         ("L = 1/(B {n}) sum over the batch of sum_j [max({a}_j, 0) - {a}_j y_j + log(1 + e^-|{a}_j|)]",
          "(sigmoid({a}) - y) / (B {n})")),
    Loss("mse", 1, "identity", "mse", "values", _mse, lambda z, y, d: ((z - y) ** 2, 2 * (z - y)), ("MSELoss", {}),
         ("L = 1/(B {n}) sum over the batch of sum_j ({a}_j - y_j)^2", "2 ({a} - y) / (B {n})")),
    Loss("huber", 3, "identity", "", "values", _huber, _ref_huber, ("HuberLoss", {}),
         ("L = 1/(B {n}) sum over the batch of sum_j h({a}_j - y_j),  h(u) = u^2/2 (|u| <= d), d (|u| - d/2) (else), "
          "d = {d}", "clamp({a} - y, -d, d) / (B {n})"), piece=lambda z, y, d: np.sign(z - y) * (np.abs(z - y) > d)),
    Loss("mae", 4, "identity", "mae", "values", _mae, lambda z, y, d: (np.abs(z - y), np.sign(z - y)), ("L1Loss", {}),
         ("L = 1/(B {n}) sum over the batch of sum_j |{a}_j - y_j|", "sign({a} - y) / (B {n})"),
         piece=lambda z, y, d: np.sign(z - y)),
    Loss("poisson", 5, "exp", "", "counts", _poisson, lambda z, y, d: (np.exp(z) - y * z, np.exp(z) - y),
         ("PoissonNLLLoss", {"log_input": True, "full": False}),
         ("L = 1/(B {n}) sum over the batch of sum_j (e^{a}_j - y_j {a}_j)", "(e^{a} - y) / (B {n})")),
)}


def get_loss(name, delta=HUBER_DELTA):
    """The Loss called ``name`` (with huber's ``delta``); a ValueError naming the choices."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {list(LOSSES)}")
    return dataclasses.replace(LOSSES[name], delta=check("huber_delta", delta, low_open=True))


def row_scales(xp, batch, weight, weight_sum):
    """s: the Python float 1/B without weights, else the (B,) array w / sum w (zeros where the sum is 0)."""
    if weight is None:
        return 1.0 / batch
    total = float(weight_sum)
    return weight * (1.0 / total) if total > 0 else xp.zeros_like(weight)


def hits(xp, loss, z, y):
    """Per row: 1 where argmax z = argmax y (cross entropy), the count of elements with
    [z > 0] = [y > 1/2] (binary cross entropy); None for the other losses."""
    if loss.output == "softmax":
        return xp.argmax(z, axis=1) == xp.argmax(y, axis=1)
    if loss.output == "sigmoid":
        return ((z > 0) == (y > 0.5)).sum(axis=1)
    return None


def finish(xp, loss, delta, row, scale):
    """Scale the row gradients in ``delta`` by s_i (/ C for an element-wise loss) and
    return L = sum_i s_i l_i from ``row``, a 0-d array of delta's dtype."""
    cols = delta.shape[1] if loss.elementwise else 1
    dtype = delta.dtype.type
    if isinstance(scale, float):
        xp.multiply(delta, dtype(scale / cols), out=delta)
        return (row.sum() * dtype(scale / cols)).astype(delta.dtype)
    s = (scale / cols).astype(delta.dtype)
    xp.multiply(delta, s[:, None], out=delta)
    return xp.vdot(s, row).astype(delta.dtype)


def metrics(loss, totals, count, outputs):
    """The loss and its metric from the running [loss sum, hits] over ``count`` rows
    (or, weighted, the rows' weights' sum) of ``outputs`` outputs: accuracy over rows,
    binary_accuracy over every output, or a copy of the loss under its name."""
    total_loss, hits = totals
    logs = {"loss": float(total_loss) / count}
    if loss.metric == "accuracy":
        logs[loss.metric] = float(hits) / count
    elif loss.metric == "binary_accuracy":
        logs[loss.metric] = float(hits) / (count * outputs)
    elif loss.metric:
        logs[loss.metric] = logs["loss"]
    return logs
