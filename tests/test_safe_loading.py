"""No pickle in any load path: with every way into pickle made to fail, every loader
(model files, optimizer state, metadata, checkpoints, all data formats) still works."""

import pickle

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop import data, modelfile
from gpubackprop.train import checkpoint

from .test_fuzz import valid_files


def test_every_load_path_works_with_pickle_forbidden(tmp_path, rng, monkeypatch):
    files = valid_files(tmp_path, rng)
    X, y = rng.standard_normal((20, 5)).astype(np.float32), rng.integers(0, 3, 20)
    gb.MLP([5, 4, 3], seed=0).fit(X, y, epochs=1, progress=False, checkpoint_dir=str(tmp_path / "ck"),
                                  checkpoint_every=1)

    def forbidden(*args, **kwargs):
        raise AssertionError("a load path unpickled")

    for name in ("load", "loads", "Unpickler", "_Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden, raising=False)
    model_file = files["model"][0]
    assert gb.load(model_file).sizes == [5, 4, 3]
    assert gb.load_optimizer(model_file).steps > 0 and modelfile.load_metadata(model_file) == {"k": 1}
    assert checkpoint.latest(str(tmp_path / "ck"))[1].user["checkpoint"]["step"] >= 1
    for kind in ("npz", "csv", "idx", "idx.gz", "npy"):
        path, kwargs = files[kind]
        Xl, yl = data.load_dataset(str(path), **kwargs)
        assert len(Xl) == len(yl) == 12


def test_pickled_arrays_are_refused_not_unpickled(tmp_path):
    np.savez(tmp_path / "obj.npz", X=np.array([{"a": 1}] * 3, dtype=object), y=np.arange(3))
    with pytest.raises(ValueError, match="never unpickles"):
        data.load_dataset(str(tmp_path / "obj.npz"))
