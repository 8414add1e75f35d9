"""Model files: an MLP's parameters, config and optimizer state in a state.py file.

A file holds the tensors of ``model.state_dict()`` (layers.{i}.weight / .bias),
optionally the optimizer's flat state buffers as ``optimizer.<name>``, and string
metadata: ``config`` (sizes, activation, loss, dtype, precision, dropout, huber_delta as
JSON), ``optimizer`` (type, hyperparameters, steps), ``user`` (the caller's
JSON), and where the model has them, ``inputs`` and ``target``: the input transform
and target encoding that make the file a whole predictor of raw rows
(gpubackprop.tabular, as JSON). Reading gives plain data (a ModelFile);
``MLP.load`` builds the model from its config.
"""

import json
from typing import Any, NamedTuple

from . import optim, state

FORMAT = "gpubackprop.mlp"
VERSION = "1"
_OPT = "optimizer."
_CONFIG_REQUIRED = {"sizes", "activation", "loss", "dtype"}
_CONFIG_DEFAULTS = {"precision": "float32", "dropout": 0.0, "huber_delta": 1.0}  # arrived after version 1's first files


class ModelFile(NamedTuple):
    config: dict  # MLP's keyword arguments, every one (defaults filled in for older files)
    tensors: dict  # the state_dict
    optimizer: Any  # a gpubackprop.optim optimizer with its state, or None
    user: Any  # the caller's metadata, or None
    inputs: Any = None  # tabular.Inputs' JSON, or None
    target: Any = None  # tabular.Target's JSON, or None


def write(path, config, tensors, optimizer=None, metadata=None, inputs=None, target=None):
    """Save a model's ``config`` and ``tensors`` (its state_dict), ``optimizer``'s state,
    and its ``inputs`` / ``target`` JSON, to ``path``."""
    tensors = dict(tensors)
    meta = {"config": json.dumps(config)}
    for key, value in (("inputs", inputs), ("target", target)):
        if value is not None:
            meta[key] = json.dumps(value)
    if optimizer is not None:
        saved = optimizer.state_dict()
        tensors.update({_OPT + k: v for k, v in saved.pop("state").items()})
        meta["optimizer"] = json.dumps(saved)
    if metadata is not None:
        try:
            meta["user"] = json.dumps(metadata)
        except TypeError as e:
            raise TypeError(f"metadata must be JSON-serialisable: {e}") from None
    state.save(path, tensors, meta, FORMAT, VERSION)


def read(path):
    """The ModelFile at ``path``, every part checked."""
    tensors, meta = state.load(path, FORMAT, VERSION)
    config = _json(meta, "config", path)
    if not isinstance(config, dict) or not _CONFIG_REQUIRED <= set(config) <= _CONFIG_REQUIRED | set(_CONFIG_DEFAULTS):
        raise ValueError(f"{path}: metadata 'config' must hold sizes, activation, loss and dtype "
                         "(and optionally precision, dropout, huber_delta)")
    config = {**_CONFIG_DEFAULTS, **config}
    optimizer = None
    if "optimizer" in meta:
        saved = _json(meta, "optimizer", path)
        saved["state"] = {k[len(_OPT):]: v for k, v in tensors.items() if k.startswith(_OPT)}
        optimizer = optim.from_state_dict(saved)
    user, inputs, target = (_json(meta, key, path) if key in meta else None for key in ("user", "inputs", "target"))
    return ModelFile(config, {k: v for k, v in tensors.items() if not k.startswith(_OPT)}, optimizer, user,
                     inputs, target)


def load_optimizer(path):
    """The optimizer saved beside the model at ``path`` by ``model.save(path, optimizer=...)``."""
    saved = read(path)
    if saved.optimizer is None:
        raise ValueError(f"{path} holds no optimizer state; save it with model.save(path, optimizer=opt)")
    return saved.optimizer


def load_metadata(path):
    """The ``metadata`` passed to ``save`` (None if there was none)."""
    return read(path).user


def _json(meta, key, path):
    try:
        return json.loads(meta[key])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: metadata {key!r} is missing or not JSON ({e})") from None
