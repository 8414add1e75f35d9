"""The activation table is the one source: the kernels' enum and constants in
kernels/common.cuh agree with it, and each row's NumPy g and g' agree with its
float64 reference (the backends' tests then hold the kernels to NumPy)."""

import re

import numpy as np
import pytest

from gpubackprop.backend.kernels import source
from gpubackprop.nn.activations import ACTIVATIONS

COMMON = source("common.cuh")


def test_the_kernels_enum_is_the_tables():
    enum = re.search(r"enum\s*\{([^}]*ACT_IDENTITY[^}]*)\}", COMMON).group(1)
    codes = {name.strip(): int(value) for name, value in re.findall(r"(ACT_\w+)\s*=\s*(\d+)", enum)}
    assert codes == {f"ACT_{a.name.upper()}": a.code for a in ACTIVATIONS.values()}


@pytest.mark.parametrize("name", sorted(n for n, a in ACTIVATIONS.items() if a.constants))
def test_the_kernels_constants_are_the_tables(name):
    for constant, value in ACTIVATIONS[name].constants:
        defined = re.search(rf"^#define {constant} ([-+0-9.eE]+)", COMMON, flags=re.M)
        assert defined, f"kernels/common.cuh does not #define {constant}"
        assert float(defined.group(1)) == pytest.approx(value, rel=1e-15), constant


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_numpy_g_and_g_prime_match_the_reference(name, rng):
    act = ACTIVATIONS[name]
    z = np.concatenate([rng.standard_normal(200) * 4, [-30.0, -1e-3, 1e-3, 30.0]])
    out, scratch = np.empty_like(z), tuple(np.empty_like(z) for _ in range(act.n_scratch))
    act.forward(np, z, out, scratch)
    np.testing.assert_allclose(out, act.reference(z), rtol=1e-12, atol=1e-14)
    grad = np.ones_like(z)
    if act.backward is not None:
        act.backward(np, grad, out, z if act.needs_z else None, scratch)
    np.testing.assert_allclose(grad, act.reference_grad(z), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_the_reference_g_prime_is_the_derivative_of_g(name, rng):
    act = ACTIVATIONS[name]
    z = rng.standard_normal(100) * 3
    z = z[np.abs(z) > 1e-3] if not act.smooth else z  # away from the kink
    h = 1e-6
    numeric = (act.reference(z + h) - act.reference(z - h)) / (2 * h)
    np.testing.assert_allclose(act.reference_grad(z), numeric, rtol=1e-6, atol=1e-8)
