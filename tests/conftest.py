import zlib

import numpy as np
import pytest


@pytest.fixture
def rng(request):
    # Fresh random inputs per test, reproducible from the test's name.
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


class StrictFloat32:
    """Stands in for the numpy module and fails any call that mixes float64 into
    float32 work: a float64 array or NumPy float64 scalar among the arguments of a
    call whose other arrays are float32 (NumPy 2 would promote it and compute in
    float64, silently, even with a float32 ``out=``)."""

    def __init__(self):
        self.calls = 0

    def __getattr__(self, name):
        target = getattr(np, name)
        if not callable(target) or isinstance(target, type):
            return target

        def checked(*args, **kwargs):
            values = list(args) + list(kwargs.values())
            dtypes = {v.dtype for v in values if isinstance(v, (np.ndarray, np.generic))}
            if np.dtype(np.float32) in dtypes and np.dtype(np.float64) in dtypes:
                raise AssertionError(f"np.{name} mixes float64 into float32 work: {sorted(map(str, dtypes))}")
            self.calls += 1
            return target(*args, **kwargs)

        return checked


@pytest.fixture
def strict_float32():
    return StrictFloat32()
