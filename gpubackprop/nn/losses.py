"""Losses with their gradient, each in one pass over the network's output.

For a batch of B rows, logits z (B, C) and targets y (B, C):

    cross_entropy  q = softmax(z) row-wise, L = -1/B sum_i sum_c y_ic log q_ic,
                   delta_L = dL/dz = (q - y) / B.
                   With rows of y summing to 1, log q_ic = z_ic - lse_i, so
                   L = 1/B sum_i (log s_i - sum_c y_ic (z_ic - m_i)),  s_i = sum_c e^(z_ic - m_i),
                   m_i = max_c z_ic. The shift keeps exp from overflowing, and taking
                   the dot product on z - m rather than z avoids cancelling two large
                   numbers (lse_i and y.z_i) when the logits are large.
    mse            L = 1/(B C) sum_ic (z_ic - y_ic)^2,  delta_L = 2 (z - y) / (B C).

Each function writes delta_L into ``delta`` and returns the loss as a 0-d array of
the input's dtype (on the GPU it stays there: reading it is a host sync).
``row`` is a (B,) scratch buffer. Integer labels are turned into one-hot rows of y
before they get here (see ``model``), so both label forms share this code.
"""

LOSSES = ("cross_entropy", "mse")


def softmax(xp, z, out, row):
    """out = softmax(z) row-wise; returns nothing. ``row`` ends holding sum e^(z - m)."""
    xp.max(z, axis=1, out=row)
    xp.subtract(z, row[:, None], out=out)
    xp.exp(out, out=out)
    xp.sum(out, axis=1, out=row)
    xp.divide(out, row[:, None], out=out)


def softmax_cross_entropy(xp, z, y, delta, row):
    batch = z.shape[0]
    xp.max(z, axis=1, out=row)
    xp.subtract(z, row[:, None], out=delta)  # z - m
    y_dot_shifted = xp.vdot(y, delta)
    xp.exp(delta, out=delta)
    xp.sum(delta, axis=1, out=row)
    xp.divide(delta, row[:, None], out=delta)  # q
    xp.log(row, out=row)
    loss = (row.sum() - y_dot_shifted) / batch
    xp.subtract(delta, y, out=delta)
    xp.multiply(delta, 1.0 / batch, out=delta)
    return loss


def mse(xp, z, y, delta, row=None):
    n = z.size
    xp.subtract(z, y, out=delta)
    loss = xp.vdot(delta, delta) / n
    xp.multiply(delta, 2.0 / n, out=delta)
    return loss


def get_loss(name):
    if name == "cross_entropy":
        return softmax_cross_entropy
    if name == "mse":
        return mse
    raise ValueError(f"unknown loss {name!r}; choose one of {list(LOSSES)}")
