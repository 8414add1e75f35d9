"""Tensors and JSON metadata in one safetensors file: checksummed, written atomically.

Knows nothing of models (as tinygrad's nn/state.py): a file holds named NumPy
arrays and string metadata, ``format`` and ``version`` naming what wrote it and
``sha256`` (of the tensors, checked on every read). No pickle anywhere: reading a
file can only ever yield arrays and strings.

Writes go to a temporary file in the same folder, are fsynced, renamed over the
target with ``os.replace`` and the folder is fsynced: a crash leaves either the old
file or the new one, never a torn one.
"""

import hashlib
import os
import tempfile


def cache_folder(*parts):
    """gpubackprop's cache folder (``$XDG_CACHE_HOME/gpubackprop``, else
    ``~/.cache/gpubackprop``), joined with ``parts``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "gpubackprop", *parts)


def current_umask():
    """The process's umask: from /proc where Linux shows it, else by setting it and
    setting it back (a moment in which another thread's new file would get 0666)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, data):
    """Write bytes to ``path`` so that readers see the old file or the new, whole."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path}: the folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0600; the file gets what the umask gives, as open() would
            os.fchmod(fd, 0o666 & ~current_umask())
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


def save(path, tensors, metadata, format, version):
    """Write ``tensors`` (name -> NumPy array) and ``metadata`` (name -> str) to ``path``."""
    from safetensors.numpy import save as to_bytes

    meta = {"format": format, "version": version, **metadata, "sha256": digest(tensors)}
    atomic_write(path, to_bytes(tensors, metadata=meta))


def load(path, format, version):
    """(tensors, metadata) of the file at ``path``, which must be ``format`` at ``version``
    and match its checksum (files written before checksums have none)."""
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
    if meta.get("format") != format:
        raise ValueError(f"{path} is a safetensors file but not a gpubackprop model (no '{format}' metadata)")
    if meta.get("version") != version:
        raise ValueError(f"{path} has format version {meta.get('version')!r}; this gpubackprop reads version {version}")
    if "sha256" in meta and meta["sha256"] != digest(tensors):
        raise ValueError(f"{path}: the tensors do not match the file's checksum; the file is damaged or was altered")
    return tensors, meta
