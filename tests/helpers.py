import numpy as np

from gpubackprop.tools.selftest import loss_targets


def random_batch(rng, sizes, loss, n):
    """A batch of n samples for a network of ``sizes`` with loss ``loss``: integer
    labels for cross entropy, else targets of the kind the loss takes."""
    X = rng.standard_normal((n, sizes[0]))
    if loss == "cross_entropy":
        y = rng.integers(0, sizes[-1], n)
    else:
        y = loss_targets(loss, rng, (n, sizes[-1]))
    return X, y


def dense_targets(y, loss, n_out):
    return np.eye(n_out)[y] if loss == "cross_entropy" else np.asarray(y, float).reshape(len(y), n_out)


def params_of(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
