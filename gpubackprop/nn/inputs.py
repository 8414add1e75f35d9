"""A network's inputs: X and y checked and copied to its device, in its compute dtype.

Checked once per call (shape, dtype, finiteness, label range: gpubackprop.validation);
in mixed precision the copy is 16-bit, and fp16 refuses values beyond its range
rather than turning them into Inf.
"""

import numpy as np

from .. import validation
from ..optim import precision as precision_modes
from .workspace import out_of_memory, weight_dtype


def prepare(net, X, y):
    """(X, T): the rows and the dense target rows, on net's device."""
    try:
        X = validation.check_X(X, net.sizes[0], net.dtype, net.backend)
        T = validation.check_targets(y, X.shape[0], net.criterion, net.sizes[-1], net.dtype, net.backend)
        X, T = to_compute(net, X, "X"), to_compute(net, T, "the targets")
    except MemoryError:
        rows = len(X)
        need = rows * (net.sizes[0] + net.sizes[-1]) * np.dtype(net.dtype).itemsize
        raise out_of_memory(net.backend, f"a copy of {rows} rows of data", need,
                            "pass fewer rows at a time (fit on a subset, or call train_step per batch)") from None
    return X, T


def prepare_streamed(net, X, y):
    """A memory-mapped X checked without being read whole, and the targets on the device."""
    X = validation.check_X_on_disk(X, net.sizes[0])
    T = validation.check_targets(y, X.shape[0], net.criterion, net.sizes[-1], net.dtype, net.backend)
    return X, to_compute(net, T, "the targets")


def weights(net, sample_weight, n):
    """The sample weights on net's device, in the dtype the loss reads them in; None for None."""
    if sample_weight is None:
        return None
    return validation.check_sample_weight(sample_weight, n, weight_dtype(net.compute_dtype), net.backend)


def class_weights(y, class_weight):
    """Per-row weights class_weight[label of the row], for labels y (1-D, of any kind, or
    rows of class probabilities: their argmax). "balanced" gives each class k the weight
    n / (K n_k), as scikit-learn's compute_class_weight; a dict maps labels to weights
    (labels it leaves out: 1)."""
    y = np.asarray(y)
    labels = y.argmax(axis=1) if y.ndim == 2 else y
    classes, ids, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if isinstance(class_weight, str) and class_weight == "balanced":
        per_class = len(labels) / (len(classes) * counts)
    elif isinstance(class_weight, dict):
        known = range(y.shape[1]) if y.ndim == 2 else classes.tolist()  # probability rows: their columns
        unknown = [label for label in class_weight if label not in known]
        if unknown:
            raise ValueError(f"class_weight names label(s) {unknown} that y does not hold; its labels are "
                             f"{list(known)}")
        per_class = np.array([float(class_weight.get(c, 1.0)) for c in classes.tolist()])
    else:
        raise ValueError(f"class_weight must be 'balanced' or a dict {{label: weight}}, got {class_weight!r}")
    return per_class[ids.ravel()]


def to_compute(net, A, name):
    """A in net's compute dtype (16-bit in mixed precision)."""
    if A.dtype == net.compute_dtype:
        return A
    if net.precision == "fp16" and float(abs(A).max()) > precision_modes.FLOAT16_MAX:
        raise ValueError(f"{name} holds values beyond float16's range (65504); scale the data, "
                         "or use precision='bf16'")
    return A.astype(net.compute_dtype)
