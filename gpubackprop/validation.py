"""Checks on what users pass in, each failing with a message that names the fix.

They run before anything is changed, so a bad call leaves the model as it was.
"""

import numbers

import numpy as np


def check_sizes(sizes):
    try:
        sizes = [operator_index(s) for s in sizes]
    except TypeError:
        raise TypeError(f"sizes must be a sequence of integers like [784, 256, 10], got {sizes!r}") from None
    if len(sizes) < 2:
        raise ValueError(f"sizes needs at least an input and an output size, got {sizes}")
    if any(s < 1 for s in sizes):
        raise ValueError(f"every layer size must be >= 1, got {sizes}")
    return sizes


def operator_index(value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"expected an integer, got {value!r}")
    return int(value)


def check_positive_int(name, value, minimum=1):
    try:
        value = operator_index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _as_numeric(name, x, backend):
    if isinstance(x, np.ndarray) or (backend is not None and backend.is_native(x)):
        arr = x
    elif hasattr(x, "__cuda_array_interface__"):
        # A GPU array of another library (PyTorch, JAX, Numba): the CUDA backend
        # wraps it without a copy; the CPU backend says how to move one or the other.
        arr = backend.asarray(x)
    else:
        if hasattr(x, "detach") and getattr(x, "requires_grad", False):  # a PyTorch tensor in autograd
            x = x.detach()
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError) as e:
            raise TypeError(f"{name} could not be read as an array: {e}") from None
    kind = arr.dtype.kind
    if kind not in "biuf":
        raise TypeError(
            f"{name} has dtype {arr.dtype}; it must be numeric (bool, integer or float)"
            + (" -- was the array ragged or mixed with strings?" if kind in "OUS" else "")
        )
    return arr


def _check_finite(name, arr, xp):
    if arr.dtype.kind == "f" and not bool(xp.isfinite(arr).all()):
        bad = int((~xp.isfinite(arr)).sum())
        raise ValueError(f"{name} contains {bad} NaN or Inf value(s); clean or impute them first")


def _check_X_shape(arr, n_features):
    if arr.ndim != 2:
        hint = "; for one sample use X.reshape(1, -1)" if arr.ndim == 1 else ""
        raise ValueError(f"X must be 2-D (n_samples, n_features), got shape {arr.shape}{hint}")
    if arr.shape[0] == 0:
        raise ValueError("X is empty (0 samples)")
    if arr.shape[1] != n_features:
        raise ValueError(f"X has {arr.shape[1]} features but the model's input size is {n_features}")


def check_X(X, n_features, dtype, backend):
    """X as a finite (n, n_features) array of ``dtype`` on ``backend``."""
    arr = _as_numeric("X", X, backend)
    _check_X_shape(arr, n_features)
    arr = backend.asarray(arr, dtype=dtype)
    _check_finite("X", arr, backend.xp)
    return arr


def check_X_on_disk(X, n_features, chunk_bytes=16 << 20):
    """The checks of check_X on a memory-mapped X, read ``chunk_bytes`` at a time
    (never whole, and never copied off the disk)."""
    _as_numeric("X", X, None)
    _check_X_shape(X, n_features)
    rows = max(1, chunk_bytes // (X.shape[1] * X.itemsize))
    for start in range(0, X.shape[0], rows):
        _check_finite("X", X[start:start + rows], np)
    return X


TARGET_RANGES = {  # the targets' kind (gpubackprop.nn.losses) -> (test, what it needs)
    "binary": (lambda a: bool(((a >= 0) & (a <= 1)).all()), "values in [0, 1] (0/1 labels or probabilities)"),
    "counts": (lambda a: bool((a >= 0).all()), "counts >= 0"),
}


def check_targets(y, n, loss, n_out, dtype, backend):
    """y as dense (n, n_out) targets of ``dtype`` on ``backend``, for ``loss`` (a
    gpubackprop.nn.losses.Loss).

    A "classes" loss (cross entropy) takes integer labels in [0, n_out) (one-hot
    encoded here) or rows of class probabilities; the others take (n, n_out)
    values, or (n,) when n_out is 1: in [0, 1] for "binary", >= 0 for "counts".
    """
    arr = _as_numeric("y", y, backend)
    xp = backend.xp
    if arr.shape[:1] != (n,):
        raise ValueError(f"X has {n} samples but y has {arr.shape[0] if arr.ndim else 0}")
    classes = loss.targets == "classes"
    if classes and arr.ndim == 1:
        return _one_hot(arr, n, n_out, dtype, backend)
    if not classes and arr.ndim == 1 and n_out == 1:
        arr = arr.reshape(n, 1)
    if arr.ndim != 2 or arr.shape[1] != n_out:
        want = "(n,) integer labels or (n, %d) probability rows" % n_out if classes else f"(n, {n_out})"
        raise ValueError(f"y has shape {arr.shape}; the model's output needs {want}")
    arr = backend.asarray(arr, dtype=dtype)
    _check_finite("y", arr, xp)
    if classes:
        tol = 1e-3 if np.dtype(dtype) == np.float32 else 1e-6
        if bool((arr < 0).any()) or not bool(xp.allclose(arr.sum(axis=1), 1.0, atol=tol, rtol=0)):
            raise ValueError("y's rows must be probabilities: non-negative, each summing to 1")
    elif loss.targets in TARGET_RANGES:
        test, need = TARGET_RANGES[loss.targets]
        if not test(arr):
            raise ValueError(f"{loss.name} needs targets y of {need}; y holds values from {float(arr.min())} "
                             f"to {float(arr.max())}")
    return arr


def _one_hot(labels, n, n_out, dtype, backend):
    xp = backend.xp
    if labels.dtype.kind == "f":
        _check_finite("y", labels, xp)
        if not bool((labels == xp.floor(labels)).all()):
            raise ValueError("y holds non-integer class labels; pass integer labels or (n, classes) probability rows")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= n_out:
        raise ValueError(
            f"label {lo if lo < 0 else hi} is out of range for {n_out} classes (labels must be in 0..{n_out - 1})"
        )
    labels = backend.asarray(labels, dtype=np.int64)
    onehot = backend.zeros((n, n_out), dtype)
    onehot[xp.arange(n), labels] = 1.0
    return onehot


def check_sample_weight(sample_weight, n, dtype, backend):
    """Sample weights as a (n,) array of ``dtype`` on ``backend``: finite, >= 0, not all 0."""
    arr = _as_numeric("sample_weight", sample_weight, backend)
    if arr.ndim == 0 or arr.shape != (n,):
        raise ValueError(f"sample_weight must hold one weight per row: shape ({n},), got {arr.shape}")
    arr = backend.asarray(arr, dtype=dtype)
    _check_finite("sample_weight", arr, backend.xp)
    if bool((arr < 0).any()):
        raise ValueError(f"sample_weight holds {int((arr < 0).sum())} negative weight(s): a negative weight rewards "
                         "a larger loss; weights must be >= 0 (0 leaves a row out)")
    if not bool((arr > 0).any()):
        raise ValueError("sample_weight is zero for every row: there is nothing to train on")
    return arr
