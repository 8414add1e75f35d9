"""Recovery: what training does about non-finite steps, and how it resumes.

The divergence policy (``on_nonfinite``; the guard that finds the steps is
gpubackprop.train.guard) is applied where training reads the device anyway:

    "raise"     FloatingPointError naming the step and the tensors that went bad;
                the model keeps its last finite parameters
    "skip"      a warning says how many steps were skipped; training goes on
    "restore"   the newest checkpoint is loaded and the learning rate halved

Resuming loads the newest sound checkpoint (gpubackprop.train.checkpoint) into
the network and the optimizer; data parallel, rank 0 reads it and every rank
takes rank 0's state, so the ranks start equal and stay so.
"""

import inspect
import os
import warnings

import numpy as np

from .checkpoint import latest
from .guard import describe

POLICIES = ("raise", "skip", "restore")


def check_policy(policy):
    if policy not in POLICIES:
        raise ValueError(f"on_nonfinite must be one of {POLICIES}, got {policy!r}")
    return policy


def apply_policy(trainer, policy, restore=None, where=None):
    """Apply ``policy`` to the steps the trainer's guard flagged since it last looked
    (a host sync). ``restore()`` (policy "restore") loads the newest checkpoint from
    the folder ``where`` and returns whether there was one."""
    if trainer.guard is None:
        return
    net, optimizer = trainer.network, trainer.optimizer
    (new, first), (overflowed, first_overflow) = trainer.guard.poll()
    if overflowed:
        what = (f"the update of step {first_overflow} made parameters non-finite "
                f"({describe(net.state_dict())}) from finite gradients: the learning rate is too high")
        if policy != "restore":
            raise FloatingPointError(f"{what}. An applied update cannot be skipped; lower the learning rate, "
                                     "or fit(on_nonfinite='restore', checkpoint_dir=...)")
        new, first = max(new, 1), first_overflow - 1
    if not new:
        return
    what = f"{new} step(s) had non-finite gradients or updates, the first at step {first + 1}"
    if policy == "raise":
        raise FloatingPointError(
            f"{what}: {describe(net.grad_dict())}. Those updates were skipped, so the model holds its "
            "last finite parameters. Lower the learning rate, clip gradients (clip_norm=...), check the "
            "data, or pass on_nonfinite='skip' or 'restore'")
    if policy == "restore":
        if not restore():
            raise FloatingPointError(f"{what}, and {where} holds no checkpoint to restore; set checkpoint_every")
        optimizer.lr = optimizer.lr / 2
        what += f"; restored the newest checkpoint and halved the learning rate to {optimizer.lr:g}"
    else:
        what += "; their updates were skipped"
    warnings.warn(what, RuntimeWarning, stacklevel=caller_level())


def caller_level():
    """The stacklevel, for a warning issued by the function calling this, of the
    first frame outside gpubackprop: the user's call to fit or train_step."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for level, frame in enumerate(inspect.stack(context=0)[2:], start=2):
        if not os.path.abspath(frame.filename).startswith(package + os.sep):
            return level
    return 1


def restore(network, optimizer, directory, comm, sample_weights=None):
    """Parameters and optimizer state from the newest sound checkpoint in ``directory``;
    its progress (see gpubackprop.train.checkpoint), or None. Rank 0 reads it and the
    other ranks take its state. ``sample_weights``: the fingerprint of the run's
    weights (None: unweighted), which the checkpoint's must equal."""
    found = latest(directory) if comm.rank == 0 else None
    progress = None
    if found is not None:
        path, saved = found
        if saved.config != network.config():
            raise ValueError(f"{path} is a checkpoint of {_describe(saved.config)}, not of this {network!r}")
        if saved.user["checkpoint"].get("sample_weights") != sample_weights:
            raise ValueError(f"{path} was trained with other sample weights than these (or with none where these "
                             "are given, or the other way round): resume with the sample_weight / class_weight "
                             "it was trained with, or train afresh without resume")
        optimizer.load_state_dict(saved.optimizer.state_dict())
        network.load_state_dict(saved.tensors)
        optimizer.bind(network)
        progress = saved.user["checkpoint"]
    if comm.parallel:
        progress = comm.bcast(progress)
        adopt_root(network, optimizer, comm)
    return progress


def resume(network, optimizer, directory, comm, sample_weights=None):
    """``restore``, and the shuffle state of the checkpoint's epoch."""
    progress = restore(network, optimizer, directory, comm, sample_weights)
    if progress is not None:
        network.shuffle_rng.bit_generator.state = progress["rng"]
    return progress


def adopt_root(network, optimizer, comm):
    """Every rank takes rank 0's parameters, optimizer (hyperparameters, step count,
    state), loss scale, shuffle state and dropout seed."""
    be, scaler = network.backend, network.scaler
    scaled = scaler and [be.to_host(x).copy() for x in (scaler.scale, scaler.clean_steps)]
    kind, hyperparams, steps, rng, seed, scaled = comm.bcast(
        (type(optimizer).__name__, optimizer.hyperparams, optimizer.steps, network.shuffle_rng.bit_generator.state,
         network.dropout_seed, scaled))
    if comm.rank != 0:
        if kind != type(optimizer).__name__:
            raise ValueError(f"rank {comm.rank} trains with {optimizer!r}, rank 0 with a {kind}: "
                             "every rank must use the same optimizer")
        optimizer.load_state_dict({"type": kind, "hyperparams": hyperparams, "steps": steps, "state": {}})
        optimizer.bind(network)
        network.shuffle_rng.bit_generator.state, network.dropout_seed = rng, seed
        if scaled is not None:
            for dst, src in zip((scaler.scale, scaler.clean_steps), scaled):
                be.xp.copyto(dst, be.asarray(np.asarray(src)))
    comm.bcast_params(network.params)
    network.parameters.changed()
    for name in optimizer.state_names:
        comm.bcast_params(optimizer.state[name])


def _describe(config):
    return "MLP(" + ", ".join([str(config["sizes"])] + [f"{k}={v!r}" for k, v in config.items() if k != "sizes"]) + ")"
