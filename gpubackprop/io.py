"""Model files: safetensors with the architecture in its metadata, written atomically.

A file holds the tensors of ``model.state_dict()`` (layers.{i}.weight / .bias),
optionally the optimizer's flat state buffers as ``optimizer.<name>``, and string
metadata: ``format``, ``version``, ``sha256`` (of the tensors, checked on every
read), ``config`` (sizes, activation, loss, dtype, precision, dropout as
JSON), ``optimizer`` (type, hyperparameters, steps) and ``user`` (caller's JSON).
No pickle anywhere: loading a file can only ever yield arrays and strings.

Writes go to a temporary file in the same folder, are fsynced, renamed over the
target with ``os.replace`` and the folder is fsynced: a crash leaves either the old
file or the new one, never a torn one.
"""

import hashlib
import json
import os
import tempfile

FORMAT = "gpubackprop.mlp"
VERSION = "1"
_OPT = "optimizer."


def atomic_write(path, data):
    """Write bytes to ``path`` so that readers see the old file or the new, whole."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def digest(tensors):
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype.str}:{t.shape};".encode())
        h.update(t.tobytes())
    return h.hexdigest()


def save(model, path, optimizer=None, metadata=None):
    """Save ``model`` (and ``optimizer``'s state, if given) to ``path``."""
    from safetensors.numpy import save as to_bytes

    tensors = model.state_dict()
    meta = {"format": FORMAT, "version": VERSION, "config": json.dumps(model.config())}
    if optimizer is not None:
        state = optimizer.state_dict()
        tensors.update({_OPT + k: v for k, v in state.pop("state").items()})
        meta["optimizer"] = json.dumps(state)
    if metadata is not None:
        try:
            meta["user"] = json.dumps(metadata)
        except TypeError as e:
            raise TypeError(f"metadata must be JSON-serialisable: {e}") from None
    meta["sha256"] = digest(tensors)
    atomic_write(path, to_bytes(tensors, metadata=meta))


def _read(path):
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model file at {path}")
    try:
        with safe_open(path, framework="np") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors reports a bad file with its own error types
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is a safetensors file but not a gpubackprop model (no '{FORMAT}' metadata)")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path} has format version {meta.get('version')!r}; this gpubackprop reads version {VERSION}")
    if "sha256" in meta and meta["sha256"] != digest(tensors):  # files written before checksums have none
        raise ValueError(f"{path}: the tensors do not match the file's checksum; the file is damaged or was altered")
    return meta, tensors


def _json(meta, key, path):
    try:
        return json.loads(meta[key])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: metadata {key!r} is missing or not JSON ({e})") from None


def load(path, device="cpu"):
    """The MLP saved at ``path``, on ``device``."""
    meta, tensors = _read(path)
    return _model(meta, tensors, path, device)


def load_optimizer(path):
    """The optimizer saved beside the model at ``path`` by ``model.save(path, optimizer=...)``."""
    meta, tensors = _read(path)
    if "optimizer" not in meta:
        raise ValueError(f"{path} holds no optimizer state; save it with model.save(path, optimizer=opt)")
    return _optimizer(meta, tensors, path)


def load_metadata(path):
    """The ``metadata`` passed to ``save`` (None if there was none)."""
    meta, _ = _read(path)
    return _metadata(meta, path)


def load_all(path, device="cpu"):
    """(model, optimizer or None, metadata or None) from one read of ``path``."""
    meta, tensors = _read(path)
    optimizer = _optimizer(meta, tensors, path) if "optimizer" in meta else None
    return _model(meta, tensors, path, device), optimizer, _metadata(meta, path)


def _model(meta, tensors, path, device):
    from .model import MLP

    config = _json(meta, "config", path)
    # precision and dropout arrived after version 1's first files: optional (float32, 0).
    if not isinstance(config, dict) or not {"sizes", "activation", "loss", "dtype"} <= set(config) <= {
            "sizes", "activation", "loss", "dtype", "precision", "dropout"}:
        raise ValueError(f"{path}: metadata 'config' must hold sizes, activation, loss and dtype "
                         "(and optionally precision, dropout)")
    model = MLP(**config, device=device)
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(_OPT)})
    return model


def _optimizer(meta, tensors, path):
    from . import optim

    state = _json(meta, "optimizer", path)
    state["state"] = {k[len(_OPT):]: v for k, v in tensors.items() if k.startswith(_OPT)}
    return optim.from_state_dict(state)


def _metadata(meta, path):
    return _json(meta, "user", path) if "user" in meta else None
