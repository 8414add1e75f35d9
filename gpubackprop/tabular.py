"""Raw table rows to the network's numbers, and its answers back to the user's labels:
the input transform and the target encoding a model carries in its file, so that
``gb.load(path).predict(rows)`` takes what a user holds and answers in the original
labels (as scikit-learn's Pipeline and Keras' Normalization layer do).

    Inputs   column by column, in the training file's order: a number column's
             missing cells imputed (the training split's mean or median) or refused;
             a text column one-hot over the training split's categories (an unseen
             category at predict time is all zeros, with a warning); then the number
             columns scaled by the training split's statistics ("standard":
             (x - mean) / std, "minmax": (x - low) / span, or "none").
    Target   classification: the original class values (numbers or strings) and the
             ids 0..K-1 the network learns; regression: y and (y - mean) / std.

``rows`` is a pandas DataFrame with the training file's column names (others are
ignored), or a 2-D array of the columns in file order: numbers, or objects with
strings for text columns and None / NaN / "" for missing cells. Both are fitted on
the training split only, and both are JSON (``to_json`` / ``from_json``).
"""

import math
import warnings

import numpy as np

SCALINGS = ("standard", "minmax", "none")
IMPUTES = ("mean", "median", "none")
TASKS = ("classification", "regression")
MISSING_TEXT = {"", "na", "n/a", "nan", "null", "none"}  # what a CSV writes for a missing cell
MAX_CATEGORIES = 50
MAX_CLASSES = 50  # an integer target with more distinct values than this is taken for regression


# ---- cells --------------------------------------------------------------------------------
def is_missing(cell):
    if cell is None or type(cell).__name__ in ("NAType", "NaTType"):  # pandas' pd.NA and NaT, without pandas
        return True
    if isinstance(cell, str):
        return cell.strip().lower() in MISSING_TEXT
    try:
        return math.isnan(cell)
    except TypeError:
        return False


def as_number(cell):
    """The cell as a float, NaN where missing, None where it is text."""
    if is_missing(cell):
        return math.nan
    if isinstance(cell, str):
        try:
            return float(cell.strip())
        except ValueError:
            return None
    try:
        return float(cell)
    except (TypeError, ValueError):
        return None


def column_numbers(cells, name):
    """A column's cells as float64 (NaN where missing), or None where it holds text."""
    if cells.dtype.kind in "biuf":
        x = cells.astype(np.float64)
    else:
        try:  # numbers, numeric strings, None and NaN: NumPy's own conversion, fast
            x = np.array(cells, dtype=np.float64)
        except (TypeError, ValueError):
            values = [as_number(c) for c in cells]
            if any(v is None for v in values):
                return None
            x = np.array(values, dtype=np.float64)
    if np.isinf(x).any():
        row = int(np.flatnonzero(np.isinf(x))[0])
        raise ValueError(f"{describe(name)}, row {row + 1}: {cells[row]!r} is infinite")
    return x


def column_kind(cells, name, first_row=1):
    """(kind, numbers): ("number", the cells as float64) or ("category", None) where
    every present cell is text; a column of numbers with some text cells is a typo,
    not categories: a ValueError naming the first (``first_row``: cells[0]'s row)."""
    x = column_numbers(cells, name)
    if x is not None:
        return "number", x
    numbers = [as_number(c) for c in cells]
    if any(v is not None and not math.isnan(v) for v in numbers):
        row = next(i for i, v in enumerate(numbers) if v is None)
        raise ValueError(f"{describe(name)}, row {row + first_row}: {cells[row]!r} is not a number, "
                         "and the column's other cells are")
    return "category", None


def numbered_names(n):
    """The names of a headerless table's n columns: their numbers, from 1. One
    convention for training, the model file and predict / evaluate, which match a
    headerless file's columns to the model's by these names."""
    return [str(i + 1) for i in range(n)]


def describe(name):
    """How messages name a column: by its number where the file has no header."""
    return f"column {name}" if name.isdigit() else f"column {name!r}"


def plain(value):
    """A NumPy scalar as the Python value JSON keeps (1.0 as 1 where whole)."""
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def columns_of(rows, names=None, width=None):
    """(a 2-D object or float array of the columns in order, their names). A
    DataFrame is matched by ``names`` when given; an array by position, checked
    against ``width``."""
    if hasattr(rows, "columns") and hasattr(rows, "to_numpy"):  # a pandas DataFrame, without importing pandas
        found = [str(c) for c in rows.columns]
        if names is not None:
            missing = [n for n in names if n not in found]
            if missing:
                raise ValueError(f"the rows lack the column(s) {missing} the model was trained on "
                                 f"(they have {found})")
            rows = rows.iloc[:, [found.index(n) for n in names]]  # by position: labels need not be strings
            found = list(names)
        return np.asarray(rows.to_numpy(dtype=object)), found
    array = np.asarray(rows)
    if array.ndim == 1 and array.dtype == object and len(array) and isinstance(array[0], (list, tuple, np.ndarray)):
        array = np.asarray(list(array), dtype=object)
    if array.ndim != 2:
        raise ValueError(f"rows must be 2-D (samples, columns), got shape {array.shape}")
    if width is not None and array.shape[1] != width:
        raise ValueError(f"rows have {array.shape[1]} columns; the model was trained on {width}"
                         + (f" ({', '.join(names)})" if names else ""))
    return array, names if names is not None else numbered_names(array.shape[1])


# ---- inputs -------------------------------------------------------------------------------
class Inputs:
    """The fitted input transform; see the module docstring. ``columns`` is a list of
    {"name", "kind": "number" | "category", and "fill" (number: the imputed value or
    None) or "categories" (category: the training split's values, and "fill" the most
    frequent one, or None)}."""

    def __init__(self, columns, scale="standard", shift=None, divide=None):
        if scale not in SCALINGS:
            raise ValueError(f"scale must be one of {', '.join(SCALINGS)}, got {scale!r}")
        self.columns, self.scale = columns, scale
        n = sum(c["kind"] == "number" for c in columns)
        self.shift = np.zeros(n) if shift is None else np.asarray(shift, np.float64)
        self.divide = np.ones(n) if divide is None else np.asarray(divide, np.float64)

    @property
    def names(self):
        return [c["name"] for c in self.columns]

    @property
    def n_features(self):
        return sum(1 if c["kind"] == "number" else len(c["categories"]) for c in self.columns)

    @classmethod
    def fit(cls, rows, names=None, scale="standard", impute="none", max_categories=MAX_CATEGORIES):
        """The transform fitted on the training ``rows`` (see ``columns_of``)."""
        if impute not in IMPUTES:
            raise ValueError(f"impute must be one of {', '.join(IMPUTES)}, got {impute!r}")
        table, names = columns_of(rows, names)
        columns, numbers = [], []
        for j, name in enumerate(names):
            cells = table[:, j]
            kind, x = column_kind(cells, name)
            if kind == "category":
                present = [str(c).strip() for c in cells if not is_missing(c)]
                categories, counts = np.unique(present, return_counts=True)
                if len(categories) > max_categories:
                    raise ValueError(f"{describe(name)} holds {len(categories)} distinct text values; one-hot "
                                     f"encoding is capped at {max_categories} (raise the cap, or drop the column)")
                fill = str(categories[np.argmax(counts)]) if impute != "none" and len(categories) else None
                columns.append({"name": name, "kind": "category", "categories": [str(c) for c in categories],
                                "fill": fill})
            else:
                present = x[~np.isnan(x)]
                fill = None
                if impute != "none" and present.size:
                    fill = float(np.mean(present) if impute == "mean" else np.median(present))
                columns.append({"name": name, "kind": "number", "fill": fill})
                numbers.append(np.where(np.isnan(x), np.nan if fill is None else fill, x))
        transform = cls(columns, "none")
        check_missing(table, transform)
        stats = np.stack(numbers, axis=1) if numbers else np.zeros((len(table), 0))
        if scale == "standard" and len(stats):
            shift, divide = stats.mean(axis=0), stats.std(axis=0)
        elif scale == "minmax" and len(stats):
            shift, divide = stats.min(axis=0), stats.max(axis=0) - stats.min(axis=0)
        else:
            shift, divide = None, None
        if divide is not None:
            divide = np.where(divide == 0, 1.0, divide)  # a constant column maps to 0
        return cls(columns, scale if shift is not None else "none", shift, divide)

    def transform(self, rows):
        """The network's float64 features (n, n_features) for ``rows``."""
        table, _ = columns_of(rows, self.names, len(self.columns))
        check_missing(table, self)
        n = table.shape[0]
        out, numbers, unseen = [], [], {}
        for j, column in enumerate(self.columns):
            cells = table[:, j]
            if column["kind"] == "number":
                x = column_numbers(cells, column["name"])
                if x is None:
                    row = next(i for i, c in enumerate(cells) if as_number(c) is None)
                    raise ValueError(f"{describe(column['name'])}, row {row + 1}: {cells[row]!r} is not a number")
                if column["fill"] is not None:
                    x = np.where(np.isnan(x), column["fill"], x)
                numbers.append(len(out))
                out.append(x[:, None])
            else:
                index = {c: k for k, c in enumerate(column["categories"])}
                onehot = np.zeros((n, len(index)))
                for i, cell in enumerate(cells):
                    value = column["fill"] if is_missing(cell) else str(cell).strip()
                    k = index.get(value)
                    if k is None:
                        unseen.setdefault(column["name"], set()).add(value)
                    else:
                        onehot[i, k] = 1.0
                out.append(onehot)
        if unseen:
            warnings.warn("categories not seen in training are encoded as all zeros: " + "; ".join(
                f"{describe(name)}: {sorted(values)[:5]}" for name, values in unseen.items()), RuntimeWarning,
                stacklevel=3)
        for k, position in enumerate(numbers):
            out[position] = (out[position] - self.shift[k]) / self.divide[k]
        return np.concatenate(out, axis=1) if out else np.zeros((n, 0))

    def to_json(self):
        return {"columns": self.columns, "scale": self.scale, "shift": self.shift.tolist(),
                "divide": self.divide.tolist()}

    @classmethod
    def from_json(cls, saved):
        return cls(saved["columns"], saved["scale"], saved["shift"], saved["divide"])

    @classmethod
    def from_legacy(cls, metadata, width):
        """The transform a CLI-trained file of the first format kept in its metadata
        ("scale" with "standardize": mean / std, or "min_max": low / span), or None."""
        scale = metadata.get("scale") if isinstance(metadata, dict) else None
        stats = {"standard": ("standardize", "mean", "std"), "minmax": ("min_max", "low", "span")}.get(scale)
        if stats is None or not isinstance(metadata.get(stats[0]), dict):
            return None
        columns = [{"name": name, "kind": "number", "fill": None} for name in numbered_names(width)]
        kept = metadata[stats[0]]
        return cls(columns, scale, kept[stats[1]], kept[stats[2]])


def check_missing(table, inputs):
    """A ValueError counting the missing cells per column where a column has no fill."""
    counts = {}
    for j, column in enumerate(inputs.columns):
        if column["fill"] is None:
            cells = table[:, j]
            if cells.dtype.kind in "biu":
                continue  # integers and booleans have no missing value
            n = int(np.isnan(cells).sum()) if cells.dtype.kind == "f" else sum(is_missing(c) for c in cells)
            if n:
                counts[column["name"]] = n
    if counts:
        raise ValueError("missing values (empty, NA or NaN cells): " + ", ".join(
            f"{n} in {describe(name)}" for name, n in counts.items())
            + "; fill them, or train with --impute mean|median (impute='mean' / 'median') to fill them "
              "with the training split's statistic")


# ---- the target ---------------------------------------------------------------------------
def infer_task(y):
    """(task, why): regression for non-integer numbers or more distinct integers than
    a classification plausibly has (MAX_CLASSES), classification otherwise."""
    numbers = np.array([as_number(v) for v in np.asarray(y, dtype=object).ravel()], dtype=object)
    if any(v is None for v in numbers):
        return "classification", "the target holds text"
    x = numbers.astype(np.float64)
    distinct = len(np.unique(x[~np.isnan(x)]))
    if not np.all(x[~np.isnan(x)] == np.round(x[~np.isnan(x)])):
        return "regression", f"the target holds non-integer numbers ({distinct} distinct values)"
    if distinct > MAX_CLASSES:
        return "regression", f"the target holds {distinct} distinct integers, more than {MAX_CLASSES} classes"
    return "classification", f"the target holds {distinct} distinct integers"


class Target:
    """The fitted target encoding; see the module docstring."""

    def __init__(self, task, classes=None, mean=0.0, std=1.0):
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        self.task, self.classes, self.mean, self.std = task, classes, float(mean), float(std)
        self._ids = {c: k for k, c in enumerate(classes)} if classes is not None else None

    @classmethod
    def fit(cls, y, task, train=None, standardize=True):
        """The encoding of ``y`` for ``task``: the classes of all of y, or the mean and
        std of y's training rows (``train``: a boolean mask or indices; all rows by
        default); a regression target left as it is unless ``standardize``."""
        y = np.asarray(y, dtype=object).ravel()
        if any(is_missing(v) for v in y):
            raise ValueError(f"the target has {sum(is_missing(v) for v in y)} missing values; drop those rows")
        if task == "classification":
            values = [label_value(v) for v in y]
            classes = sorted(set(values), key=lambda v: (isinstance(v, str), v))
            if len(classes) < 2:
                raise ValueError(f"classification needs at least two classes, found {classes}")
            return cls(task, classes)
        x = _numbers(y, "a regression target")
        if not standardize:
            return cls(task)
        part = x if train is None else x[train]
        std = float(part.std()) or 1.0
        return cls(task, mean=float(part.mean()), std=std)

    @property
    def n_outputs(self):
        return len(self.classes) if self.task == "classification" else 1

    def encode(self, y):
        """Class ids (int64), or standardized values (n, 1)."""
        y = np.asarray(y, dtype=object).ravel()
        if self.task == "regression":
            return ((_numbers(y, "the target") - self.mean) / self.std)[:, None]
        ids = np.empty(len(y), np.int64)
        unknown = set()
        for i, v in enumerate(y):
            k = self._ids.get(label_value(v))
            if k is None:
                unknown.add(v)
            else:
                ids[i] = k
        if unknown:
            raise ValueError(f"labels the model does not know: {sorted(map(str, unknown))[:10]}; it was trained "
                             f"on the classes {self.classes}")
        return ids

    def decode(self, outputs):
        """The original labels for class ids, or the outputs in the target's units."""
        outputs = np.asarray(outputs)
        if self.task == "regression":
            values = outputs * self.std + self.mean
            return values[:, 0] if values.ndim == 2 and values.shape[1] == 1 else values
        labels = np.asarray(self.classes, dtype=object)[outputs]
        if all(isinstance(c, int) for c in self.classes):
            return labels.astype(np.int64)
        if all(isinstance(c, (int, float)) for c in self.classes):
            return labels.astype(np.float64)
        return labels

    def to_json(self):
        return {"task": self.task, "classes": self.classes, "mean": self.mean, "std": self.std}

    @classmethod
    def from_legacy(cls, metadata, config):
        """The encoding of a classifier the first CLI format wrote (it took only class
        ids 0..K-1, and kept "scale" and "held_out_accuracy" in its metadata), or None."""
        if (isinstance(metadata, dict) and {"scale", "held_out_accuracy"} <= set(metadata)
                and config["loss"] == "cross_entropy"):
            return cls("classification", list(range(config["sizes"][-1])))
        return None

    @classmethod
    def from_json(cls, saved):
        return cls(saved["task"], saved.get("classes"), saved.get("mean", 0.0), saved.get("std", 1.0))


def label_value(v):
    """A class label as JSON keeps it: an integer, a float, or text. Text is read as a
    number only where it is that number's own spelling ("7", "0.5"; not "007"), and
    integers stay integers (beyond 2**53 a float would merge neighbours)."""
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return plain(float(v))
    text = str(v).strip()
    for kind in (int, float):
        try:
            number = kind(text)
        except ValueError:
            continue
        if repr(number) == text:
            return plain(number)
    return text


def _numbers(values, what):
    x = np.array([as_number(v) for v in values], dtype=object)
    bad = [v for v, n in zip(values, x) if n is None]
    if bad:
        raise ValueError(f"{what} must be numbers; found text such as {bad[0]!r}")
    return x.astype(np.float64)
