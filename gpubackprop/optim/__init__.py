"""Optimizers over one flat parameter buffer, with torch.optim's semantics, and the
precision modes (``precision``: 16-bit compute and loss scaling).

Each optimizer's maths is at the top of its module (sgd.py, adam.py); base.py
holds binding, the step count and state_dict.
"""

from .adam import Adam, AdamW
from .base import Flat, Optimizer, Update
from .sgd import SGD

OPTIMIZERS = {cls.__name__: cls for cls in (SGD, Adam, AdamW)}  # the table: a new optimizer is a row


def from_state_dict(d):
    """An optimizer rebuilt from ``state_dict()``'s output."""
    cls = OPTIMIZERS.get(d.get("type") if isinstance(d, dict) else None)
    if cls is None:
        raise ValueError(f"unknown optimizer type in state_dict; expected one of {sorted(OPTIMIZERS)}")
    opt = cls(**d["hyperparams"])
    opt.load_state_dict(d)
    return opt


__all__ = ["SGD", "Adam", "AdamW", "Flat", "Optimizer", "OPTIMIZERS", "Update", "from_state_dict"]
