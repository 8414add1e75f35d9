"""The one-pool experiment's pieces compute what the shipped ones do: results only,
never a timing."""

import numpy as np
import pytest

from bench import one_pool

cpu_kernels = pytest.importorskip("gpubackprop.backend.cpu_kernels", reason="needs numba (the fast extra)")


def test_parallel_relu_loops_match_the_shipped_serial_ones():
    rng = np.random.default_rng(0)
    forward, backward = one_pool.parallel_relu_loops()
    z = rng.standard_normal((37, 19)).astype(np.float32)
    b = rng.standard_normal(19).astype(np.float32)
    g = rng.standard_normal((37, 19)).astype(np.float32)
    out = []
    for fwd, bwd in ((forward, backward), cpu_kernels.DENSE["relu"]):
        a, grad, db = np.full_like(z, np.nan), g.copy(), np.full(19, np.nan, np.float32)
        fwd(z, b, a)
        bwd(grad, a, db)
        out.append((a, grad, db))
    np.testing.assert_array_equal(out[0][0], out[1][0])
    np.testing.assert_array_equal(out[0][1], out[1][1])
    np.testing.assert_allclose(out[0][2], out[1][2], rtol=1e-6)  # float64 partial sums, another order
