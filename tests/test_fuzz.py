"""Fuzzing: the public API over generated inputs (hypothesis), and every file loader
over mutated valid files. Every input either works or raises a clean error (a
ValueError, TypeError, KeyError, OSError or FloatingPointError naming the
problem); anything else is a crash and fails. ``FUZZ_EXAMPLES`` scales the run
(CI: the defaults below; the closing note of the trust issue reports a larger run)."""

import gzip
import io as bytes_io
import os
import struct
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpubackprop as gb
from gpubackprop import data, modelfile

CLEAN = (ValueError, TypeError, KeyError, OSError, FloatingPointError)
SCALE = int(os.environ.get("FUZZ_EXAMPLES", "1"))
SPECIAL = [np.nan, np.inf, -np.inf, 1e38, -1e38, 1e-45, 0.0, -0.0, 3e38]


def values(shape):
    return st.one_of(
        st.builds(lambda seed: np.random.default_rng(seed).standard_normal(shape), st.integers(0, 2**32 - 1)),
        st.lists(st.sampled_from(SPECIAL + [1.0, -2.5]), min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))
        .map(lambda v: np.array(v, float).reshape(shape)),
    )


@st.composite
def fit_calls(draw):
    n_in, n_out = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    n = draw(st.integers(0, 6))
    hidden = draw(st.lists(st.integers(1, 6), max_size=2))
    X = draw(values((n, n_in)))
    if draw(st.booleans()):
        with np.errstate(invalid="ignore", over="ignore"):  # NaN / huge values cast to int or float16
            X = X.astype(draw(st.sampled_from([np.float32, np.float64, np.int64, np.float16, bool])))
    if draw(st.integers(0, 9)) == 0:  # a wrong shape
        X = X.reshape(-1)
    loss = draw(st.sampled_from(["cross_entropy", "mse"]))
    y = draw(st.one_of(st.lists(st.integers(-2, n_out + 1), min_size=n, max_size=n).map(np.array), values((n, n_out))))
    return dict(sizes=[n_in, *hidden, n_out], loss=loss, X=X, y=y,
                activation=draw(st.sampled_from(["relu", "tanh", "gelu", "sigmoid", "leaky_relu", "identity"])),
                dtype=draw(st.sampled_from(["float32", "float64"])),
                lr=draw(st.sampled_from([1e-3, 0.1, 10.0, 1e30])),
                batch=draw(st.integers(1, 8)), epochs=draw(st.integers(0, 2)))


@settings(max_examples=150 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fit_calls())
def test_fit_predict_save_either_work_or_fail_cleanly(call):
    model = gb.MLP(call["sizes"], activation=call["activation"], loss=call["loss"], dtype=call["dtype"], seed=0)
    before = model.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # overflow notes from NumPy, on the huge values
        try:
            model.fit(call["X"], call["y"], epochs=call["epochs"], batch_size=call["batch"],
                      optimizer=gb.optim.SGD(call["lr"]), progress=False, on_nonfinite="skip")
        except FloatingPointError as e:  # an update that overflowed by itself: said, not silent
            assert "learning rate is too high" in str(e)
        except CLEAN as e:
            assert str(e)
        else:
            for v in model.state_dict().values():
                assert np.isfinite(v).all()  # a fit that returns leaves no NaN or Inf behind
        try:
            out = model.predict_proba(call["X"]) if call["loss"] == "cross_entropy" else model.predict(call["X"])
            assert out.shape[0] == np.asarray(call["X"]).shape[0]
        except CLEAN as e:
            assert str(e)
    assert before.keys() == model.state_dict().keys()


# ---- loaders over mutated files --------------------------------------------------------
def valid_files(tmp_path, rng):
    X, y = rng.standard_normal((12, 5)).astype(np.float32), rng.integers(0, 3, 12)
    files = {}
    np.savez(tmp_path / "d.npz", X=X, y=y)
    files["npz"] = (tmp_path / "d.npz", {})
    lines = ["a,b,c,d,e,label"] + [",".join(f"{v:.4f}" for v in row) + f",{c}" for row, c in zip(X, y)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    files["csv"] = (tmp_path / "d.csv", {})
    images = (rng.random((12, 4, 4)) * 255).astype(np.uint8)
    (tmp_path / "img.idx").write_bytes(struct.pack(">HBB3I", 0, 8, 3, 12, 4, 4) + images.tobytes())
    (tmp_path / "lab.idx").write_bytes(struct.pack(">HBBI", 0, 8, 1, 12) + y.astype(np.uint8).tobytes())
    files["idx"] = (tmp_path / "img.idx", {"labels": str(tmp_path / "lab.idx")})
    with gzip.open(tmp_path / "img.idx.gz", "wb") as f:
        f.write((tmp_path / "img.idx").read_bytes())
    files["idx.gz"] = (tmp_path / "img.idx.gz", {"labels": str(tmp_path / "lab.idx")})
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "y.npy", y)
    files["npy"] = (tmp_path / "x.npy", {"labels": str(tmp_path / "y.npy")})
    model = gb.MLP([5, 4, 3], seed=0)
    model.fit(X, y, epochs=1, progress=False)
    model.save(tmp_path / "m.safetensors", optimizer=model.optimizer, metadata={"k": 1})
    files["model"] = (tmp_path / "m.safetensors", None)
    return files


def mutate(blob, rng):
    b = bytearray(blob)
    kind = rng.integers(0, 5)
    if kind == 0 and b:  # flip bytes
        for i in rng.integers(0, len(b), rng.integers(1, 8)):
            b[i] ^= int(rng.integers(1, 256))
    elif kind == 1:  # truncate
        b = b[: rng.integers(0, len(b) + 1)]
    elif kind == 2:  # insert junk
        at = rng.integers(0, len(b) + 1)
        b[at:at] = rng.integers(0, 256, rng.integers(1, 64)).astype(np.uint8).tobytes()
    elif kind == 3 and len(b) >= 8:  # a huge number where a header length or size may be
        at = rng.integers(0, min(len(b), 64) - 7)
        b[at:at + 8] = struct.pack("<Q", int(rng.integers(2**40, 2**62)))
    else:  # duplicate a slice
        i, j = sorted(rng.integers(0, len(b) + 1, 2))
        b[j:j] = b[i:j]
    return bytes(b)


@pytest.mark.parametrize("kind", ["npz", "csv", "idx", "idx.gz", "npy", "model"])
def test_mutated_files_load_or_fail_cleanly(kind, tmp_path, rng):
    files = valid_files(tmp_path, rng)
    path, kwargs = files[kind]
    original = path.read_bytes()
    tried = clean = 0
    for _ in range(120 * SCALE):
        path.write_bytes(mutate(original, rng))
        tried += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if kwargs is None:
                    gb.load(path), gb.load_optimizer(path), modelfile.load_metadata(path)
                else:
                    data.load_dataset(str(path), **kwargs)
        except CLEAN as e:
            assert str(e), f"{type(e).__name__} without a message"
            clean += 1
    assert tried == 120 * SCALE and clean > 0  # the mutations did break files, and nothing crashed


# ---- the fuzzer's findings, kept as regression tests ------------------------------------
def test_a_csv_header_wider_than_its_rows(tmp_path):
    path = tmp_path / "wide.csv"
    path.write_text("a,b,c,d,label\n1,2,0\n3,4,1\n")
    with pytest.raises(ValueError, match="the header has 5 columns but the data rows have 3"):
        data.load_dataset(str(path))


def test_a_npy_header_numpy_cannot_parse(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 2), np.float32))
    np.save(tmp_path / "y.npy", np.arange(3))
    blob = bytearray((tmp_path / "x.npy").read_bytes())
    blob[20:24] = b"\xd7(\x00{"  # inside the header's dict literal
    (tmp_path / "x.npy").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="not a .npy file"):
        data.load_dataset(str(tmp_path / "x.npy"), labels=str(tmp_path / "y.npy"))


def test_an_npz_member_with_an_unknown_compression_method(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, X=np.zeros((3, 2)), y=np.arange(3))
    blob = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):  # local and central headers
        at = blob.find(signature)
        while at != -1:
            blob[at + offset:at + offset + 2] = (99).to_bytes(2, "little")
            at = blob.find(signature, at + 4)
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="could not be read as an .npz file"):
        data.load_dataset(str(path))
