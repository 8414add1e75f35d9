"""The one-pool experiment's pieces compute what the shipped ones do: results only,
never a timing."""

import os

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


@pytest.mark.skipif(not os.path.exists(one_pool.MKL_RT), reason="needs the mkl wheel (pip install mkl)")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mkl_matmul_matches_numpy_on_the_layers_transposed_views(dtype):
    rng = np.random.default_rng(1)
    matmul = one_pool.mkl_matmul()
    x = rng.standard_normal((33, 17)).astype(dtype)
    W = rng.standard_normal((5, 17)).astype(dtype)
    g = rng.standard_normal((33, 5)).astype(dtype)
    for a, b in ((x, W.T), (g.T, x), (g, W)):  # forward, weight gradient, input gradient
        out = np.full((a.shape[0], b.shape[1]), np.nan, dtype)
        matmul(a, b, out)
        np.testing.assert_allclose(out, a @ b, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)
