"""Inputs from any array library or layout give the same answers; outputs come back
in the caller's library (CuPy and PyTorch-on-GPU cases run with -m gpu)."""

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop import interop

from .helpers import random_batch


@pytest.fixture
def model_and_data(rng):
    model = gb.MLP([6, 8, 3], seed=0)
    X, y = random_batch(rng, model.sizes, "cross_entropy", 25)
    return model, X.astype(np.float32), y


@pytest.mark.parametrize("layout", ["fortran", "readonly", "memmap", "list", "strided"])
def test_every_layout_gives_the_same_predictions(model_and_data, layout, tmp_path):
    model, X, y = model_and_data
    if layout == "fortran":
        Xa = np.asfortranarray(X)
    elif layout == "readonly":
        Xa = X.copy()
        Xa.flags.writeable = False
    elif layout == "memmap":
        np.save(tmp_path / "x.npy", X)
        Xa = np.load(tmp_path / "x.npy", mmap_mode="r")
    elif layout == "list":
        Xa = X.tolist()
    else:
        Xa = np.repeat(X, 2, axis=1)[:, ::2]  # a non-contiguous view with X's values
    np.testing.assert_array_equal(model.predict_proba(Xa), model.predict_proba(X))
    before = model.state_dict()
    assert model.fit(Xa, y, epochs=1, progress=False)["loss"][0] > 0
    assert any(not np.array_equal(v, before[k]) for k, v in model.state_dict().items())


def test_torch_tensors_in_torch_tensors_out(model_and_data):
    torch = pytest.importorskip("torch")
    model, X, y = model_and_data
    Xt = torch.from_numpy(X)
    for method in ("predict", "predict_proba", "forward"):
        got = getattr(model, method)(Xt)
        assert isinstance(got, torch.Tensor)
        np.testing.assert_array_equal(got.numpy(), getattr(model, method)(X))
    history = model.fit(Xt, torch.from_numpy(y), epochs=2, progress=False)
    assert len(history["loss"]) == 2


def test_library_names():
    assert interop.library(np.zeros(1)) == "numpy" and interop.library([1]) == "builtins"


@pytest.mark.gpu
def test_gpu_arrays_stay_on_the_gpu(rng):
    cupy = pytest.importorskip("cupy")
    try:
        model = gb.MLP([6, 8, 3], seed=0, device="cuda")
    except gb.DeviceUnavailableError as e:
        pytest.skip(str(e))
    X = rng.standard_normal((25, 6)).astype(np.float32)
    out = model.predict_proba(cupy.asarray(X))
    assert isinstance(out, cupy.ndarray)
    np.testing.assert_allclose(out.get(), model.predict_proba(X), rtol=1e-6)
    torch = pytest.importorskip("torch")
    Xt = torch.from_numpy(X).cuda()
    got = model.predict_proba(Xt)
    assert isinstance(got, torch.Tensor) and got.is_cuda
    np.testing.assert_allclose(got.cpu().numpy(), model.predict_proba(X), rtol=1e-6)


def test_a_torch_tensor_that_requires_grad_is_taken_detached():
    torch = pytest.importorskip("torch")
    model = gb.MLP([3, 4, 2], seed=0)
    X = torch.randn(5, 3, requires_grad=True)
    np.testing.assert_array_equal(np.asarray(model.predict(X)), np.asarray(model.predict(X.detach())))
