import json
import os
import stat

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop import modelfile

from .helpers import assert_same_params, params_of, random_batch


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("act,loss", [("relu", "cross_entropy"), ("gelu", "mse")])
def test_save_load_round_trip_bit_for_bit(tmp_path, dtype, act, loss, rng):
    model = gb.MLP([7, 5, 3], activation=act, loss=loss, dtype=dtype, seed=0)
    model.fit(*random_batch(rng, model.sizes, loss, 20), epochs=2, progress=False)
    path = tmp_path / "m.safetensors"
    model.save(path, metadata={"mean": [1.0, 2.0]})
    back = gb.load(path)
    assert back.config() == model.config()
    assert_same_params(params_of(back), params_of(model))
    X = rng.standard_normal((4, 7))
    np.testing.assert_array_equal(back.predict(X), model.predict(X))
    assert modelfile.load_metadata(path) == {"mean": [1.0, 2.0]}
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp files left


def test_optimizer_state_saved_beside_the_model(tmp_path, rng):
    X, y = random_batch(rng, [4, 6, 3], "cross_entropy", 10)
    model, opt = gb.MLP([4, 6, 3], seed=0), gb.optim.Adam(1e-2)
    for _ in range(3):
        model.train_step(X, y, opt)
    path = tmp_path / "ckpt.safetensors"
    model.save(path, optimizer=opt)
    model2, opt2 = gb.MLP.load(path), modelfile.load_optimizer(path)
    model.train_step(X, y, opt)
    model2.train_step(X, y, opt2)
    assert_same_params(params_of(model2), params_of(model))
    model.save(path)
    with pytest.raises(ValueError, match="holds no optimizer state"):
        modelfile.load_optimizer(path)


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    old = gb.MLP([3, 2], seed=0)
    old.save(path)
    original = path.read_bytes()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        gb.MLP([3, 2], seed=1).save(path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_bad_files_get_clear_errors(tmp_path):
    good = tmp_path / "good.safetensors"
    gb.MLP([3, 4, 2], seed=0).save(good)
    data = good.read_bytes()
    cases = {
        "garbage": (os.urandom(100), "not a readable safetensors file"),
        "truncated": (data[: len(data) // 2], "not a readable safetensors file"),
        "empty": (b"", "not a readable safetensors file"),
        "huge header": ((2**60).to_bytes(8, "little") + data[8:], "not a readable safetensors file"),
    }
    for name, (content, message) in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(content)
        with pytest.raises(ValueError, match=message):
            gb.load(p)
    with pytest.raises(FileNotFoundError, match="no model file"):
        gb.load(tmp_path / "missing.safetensors")


def test_foreign_and_mismatched_safetensors(tmp_path):
    from safetensors.numpy import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(foreign))
    with pytest.raises(ValueError, match="not a gpubackprop model"):
        gb.load(foreign)
    wrong = tmp_path / "wrong.safetensors"
    sd = gb.MLP([3, 4, 2], seed=0).state_dict()
    sd["layers.0.weight"] = np.zeros((5, 3), np.float32)
    save_file(sd, str(wrong), metadata={"format": modelfile.FORMAT, "version": modelfile.VERSION,
                                        "config": '{"sizes": [3, 4, 2], "activation": "relu", "loss": "cross_entropy", "dtype": "float32"}'})
    with pytest.raises(ValueError, match=r"layers.0.weight has shape \(5, 3\), expected \(4, 3\)"):
        gb.load(wrong)


def test_a_file_from_before_precision_and_dropout_were_saved_gets_their_defaults(tmp_path):
    """Version 1's first files had no precision or dropout in their config: they load,
    and a checkpoint of them resumes a model that has the defaults."""
    from gpubackprop import state

    model = gb.MLP([3, 4, 2], seed=0)
    path = tmp_path / "old.safetensors"
    config = {k: v for k, v in model.config().items() if k not in ("precision", "dropout")}
    state.save(path, model.state_dict(), {"config": json.dumps(config)}, modelfile.FORMAT, modelfile.VERSION)
    saved = modelfile.read(path)
    assert saved.config == model.config()
    assert gb.load(path).config() == model.config()


def test_saving_into_a_missing_folder_names_the_folder_and_files_get_the_umasks_mode(tmp_path):
    model = gb.MLP([2, 3, 2])
    with pytest.raises(FileNotFoundError, match=f"the folder {tmp_path / 'missing'} does not exist"):
        model.save(tmp_path / "missing" / "m.safetensors")
    old = os.umask(0o022)
    try:
        model.save(tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "m.safetensors").st_mode) == 0o644  # not mkstemp's 0600
