"""L-BFGS: full-batch quasi-Newton training through scipy's L-BFGS-B, the solver
scikit-learn's MLP users pick for small tabular sets.

scipy minimizes, over the flat parameter buffer theta (float64 on the host),

    f(theta) = L(X, y; theta) + alpha / (2 n) * sum of the squared weights

(the biases spared, as scikit-learn's MLP spares them; with sample weights, L is
their weighted mean and n their sum, as scikit-learn has it), with its gradient
from one forward and backward pass of the whole batch, loaded onto the device once:
on a GPU, one copy of theta to the device and one of the gradient back per evaluation.
``max_iter``, ``max_fun`` and ``tol`` (scipy's gtol) are scikit-learn's.
"""

import numpy as np


def weight_mask(model):
    """True where the model's flat buffer holds a weight (not a bias)."""
    mask = np.zeros(model.n_params, bool)
    for w in model.weight_slices:
        mask[w] = True
    return mask


def minimize_lbfgs(model, X, y, alpha=0.0, max_iter=200, max_fun=15000, tol=1e-4, sample_weight=None):
    """Train ``model`` on all of (X, y) (rows weighted by ``sample_weight``) by L-BFGS-B;
    the model ends at scipy's answer. Returns scipy's OptimizeResult (``nit``,
    ``nfev``, ``fun``: the loss with its penalty, ``success``, ``message``)."""
    try:
        from scipy.optimize import minimize
    except ImportError:
        raise ImportError("solver='lbfgs' needs scipy: pip install 'gpubackprop[sklearn]'") from None
    if model.precision != "float32":
        raise ValueError(f"L-BFGS trains in the model's dtype; precision={model.precision!r} has no place in it")
    mask = weight_mask(model)
    with model.context():
        ws = model.load_batch(X, y, sample_weight)  # checked: the weights' sum is > 0
        penalty = alpha / (len(X) if sample_weight is None else float(np.sum(sample_weight)))

        def f(theta):
            model.parameters.assign(theta)
            model.forward_pass(ws)
            loss = float(model.compute_loss(ws))
            model.backward_pass(ws)
            g = np.asarray(model.backend.to_host(model.grads), np.float64).copy()
            g[mask] += penalty * theta[mask]
            return loss + 0.5 * penalty * float(theta[mask] @ theta[mask]), g

        theta0 = np.asarray(model.backend.to_host(model.params), np.float64).copy()
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # scipy's line search probes far
            result = minimize(f, theta0, jac=True, method="L-BFGS-B",
                              options={"maxiter": max_iter, "maxfun": max_fun, "gtol": tol})
        model.parameters.assign(result.x)
    return result
