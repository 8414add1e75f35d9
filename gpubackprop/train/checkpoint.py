"""Crash-safe checkpoints for ``MLP.fit``: a run killed at any moment resumes to the
same parameters, bit for bit, as a run never interrupted.

A checkpoint is one model file (gpubackprop.modelfile: safetensors, written atomically,
with a SHA-256 of its tensors) holding the parameters, the optimizer's state and
step count, and in its metadata where training stood:

    epoch, step          the epoch, and the steps of it done
    rng                  the shuffle generator's state at the start of that epoch
                         (resuming draws the epoch's order again, then skips)
    running              the epoch's running [loss sum, hits] so far
    history              the finished epochs' metrics
    sample_weights       a fingerprint of the run's sample weights (None: unweighted);
                         resuming with others is refused

Dropout needs no state of its own: its masks are a function of the optimizer's
step count (gpubackprop.nn.dropout). Files are named by that count,
ckpt-<steps>.safetensors; the newest ``keep`` are kept. Reading picks the newest
file that parses and matches its checksum; a torn or altered one is skipped with
a warning, never loaded.
"""

import glob
import os
import warnings

from .. import modelfile
from ..nn.network import Network

PREFIX, SUFFIX = "ckpt-", ".safetensors"


def path_for(directory, steps):
    return os.path.join(directory, f"{PREFIX}{steps:010d}{SUFFIX}")


def checkpoints(directory):
    """The checkpoint files in ``directory``, oldest first."""
    return sorted(glob.glob(os.path.join(glob.escape(directory), f"{PREFIX}*{SUFFIX}")))


def write(directory, model, optimizer, progress, keep):
    """Save a checkpoint, then ``prune``."""
    os.makedirs(directory, exist_ok=True)
    modelfile.write(path_for(directory, optimizer.steps), model.config(), model.state_dict(), optimizer,
                    {"checkpoint": progress})
    prune(directory, keep)


def prune(directory, keep):
    """Delete all checkpoints but the newest ``keep``, and any temporary file a
    killed write left behind. (Also on resuming: a run killed between its save and
    this leaves one too many, and a resumed run with no step left writes none.)"""
    for old in checkpoints(directory)[:-keep]:
        os.unlink(old)
    for stale in glob.glob(os.path.join(glob.escape(directory), f".{PREFIX}*.tmp")):
        os.unlink(stale)


def latest(directory):
    """(path, modelfile.ModelFile) of the newest sound checkpoint (its progress in
    ``user["checkpoint"]``), or None."""
    for path in reversed(checkpoints(directory)):
        try:
            saved = modelfile.read(path)
            Network(**saved.config)  # a config that builds no network is a damaged file, skipped like one
            if saved.optimizer is None or not isinstance(saved.user, dict) or "checkpoint" not in saved.user:
                raise ValueError("no checkpoint metadata or optimizer state")
            return path, saved
        except ValueError as e:
            warnings.warn(f"skipping checkpoint {path}: {e}", RuntimeWarning, stacklevel=2)
    return None
