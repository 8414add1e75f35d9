"""fit: epochs of shuffled mini-batches, metrics, validation, callbacks, checkpoints,
data-parallel sharding; each step is the Trainer's.

The history is a dict of per-epoch lists: "loss" and the loss's metric
(Network.metrics), averaged over the epoch's batches as they were trained (weighted
means with sample weights), and the same with "val_" before them with validation data. The loss is read from the device
every ``SYNC_EVERY`` steps and at each epoch's end, never per step.
"""

import collections
import dataclasses
import functools
import hashlib
import inspect
import os
import signal
import threading
import warnings
from typing import Any, Optional

import numpy as np

from .. import distributed, validation
from ..nn import inputs
from ..nn.network import row_count
from ..optim import Adam
from . import checkpoint, recovery
from .callbacks import ProgressBar, call
from .trainer import Trainer, check_clip_norm, check_optimizer

SYNC_EVERY = 16  # steps between reads of the running loss (each a device sync)
ONE_PROCESS = distributed.SingleProcess()


@dataclasses.dataclass
class FitSettings:
    """fit's settings (see MLP.fit for what each does)."""

    epochs: int = 10
    batch_size: int = 32
    optimizer: Any = None
    shuffle: bool = True
    validation_data: Optional[tuple] = None
    progress: bool = True
    callbacks: Any = None
    graphs: bool = True
    clip_norm: Optional[float] = None
    checkpoint_dir: Optional[str] = None
    checkpoint_every: Any = None  # steps, or "epoch" (the default with a checkpoint_dir)
    keep_checkpoints: int = 3
    resume: bool = False
    on_nonfinite: str = "raise"
    comm: Any = None
    sample_weight: Any = None
    class_weight: Any = None

    @classmethod
    def of(cls, settings):
        """FitSettings from fit's keyword arguments; a TypeError naming any unknown one."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise TypeError(f"fit() got unexpected keyword argument(s) {unknown}; its settings are {names}")
        return cls(**settings)

    @classmethod
    def signature(cls, fit):
        """``fit``'s signature with every setting named (fit takes the first few by
        position and the rest as keywords): for help() and editors."""
        params = list(inspect.signature(fit).parameters.values())[:3]  # self, X, y
        params += [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default)
                   for f in dataclasses.fields(cls)]
        return inspect.Signature(params)

    def checked(self, backend):
        """A copy with every setting checked (a ValueError / TypeError naming the fix) and defaults filled in."""
        s = dataclasses.replace(self)
        s.comm = ONE_PROCESS if s.comm is None else check_comm(s.comm, backend)
        s.epochs = validation.check_positive_int("epochs", s.epochs, minimum=0)
        s.batch_size = validation.check_positive_int("batch_size", s.batch_size)
        s.optimizer = Adam() if s.optimizer is None else check_optimizer(s.optimizer)
        check_clip_norm(s.clip_norm)
        s.callbacks = list(s.callbacks or ())
        for callback in s.callbacks:
            watched = getattr(callback, "monitored", None)
            if watched and watched.startswith("val_") and s.validation_data is None:
                raise ValueError(f"{type(callback).__name__} monitors {watched!r}, which needs validation data: "
                                 "pass validation_data=(X_val, y_val) to fit, or monitor a training metric")
        if (s.checkpoint_every is not None or s.resume or s.on_nonfinite == "restore") and s.checkpoint_dir is None:
            raise ValueError("checkpoint_every, resume and on_nonfinite='restore' need checkpoint_dir")
        recovery.check_policy(s.on_nonfinite)
        if s.checkpoint_dir is not None and s.checkpoint_every in (None, "epoch"):
            s.checkpoint_every = "epoch"  # a checkpoint_dir that never received a checkpoint would be a trap
        elif s.checkpoint_every is not None:
            s.checkpoint_every = validation.check_positive_int("checkpoint_every", s.checkpoint_every)
        s.keep_checkpoints = validation.check_positive_int("keep_checkpoints", s.keep_checkpoints)
        return s


def fit(model, X, y, settings):
    """Train ``model`` on (X, y) with ``settings`` (a FitSettings); the history."""
    comm = settings.comm if isinstance(settings.comm, distributed.Communicator) else ONE_PROCESS
    try:  # on every rank, checks and data included: a failure anywhere aborts the job
        s = settings.checked(model.backend)
        with model.context():
            return Loop(model, s).run(X, y)
    except BaseException as e:
        if comm.size > 1:  # the other ranks would wait for this one forever
            comm.abort(e)
        raise
    finally:
        model.comm = ONE_PROCESS


class Loop:
    """One fit: its data on the device, its trainer, its epochs."""

    def __init__(self, model, settings):
        self.model, self.s, self.comm = model, settings, settings.comm
        self.optimizer = settings.optimizer
        self.history = collections.defaultdict(list)
        self.running = None  # this rank's [loss sum, hits] of the epoch, on the device

    def run(self, X, y):
        model, s = self.model, self.s
        # The data set goes to the device once and batches are gathered there; a
        # memory-mapped X stays on disk and each batch's rows are read as needed.
        self.X_disk = X if isinstance(X, np.memmap) else None
        if self.X_disk is not None:
            _, self.T = inputs.prepare_streamed(model, X, y)
            self.X = None
        else:
            self.X, self.T = model.prepare(X, y)
        self.val = validation_set(model, s.validation_data)
        model.comm = self.comm
        self.n = self._rows()
        self.W = model.prepare_weights(s.sample_weight, self.n)
        self.W_host = None if self.W is None else model.backend.to_host(self.W).astype(np.float64)
        self.W_total = None if self.W_host is None else weight_total(self.W_host)  # what an epoch's sums divide by
        self.weights_id = self._weights_id()
        self.trainer = Trainer(model, self.optimizer, s.clip_norm, graphs=s.graphs, parallel=self.comm.parallel)
        start = self._start()
        # NumPy's overflow warnings stay quiet: the divergence guard reports a step that
        # went non-finite in fit's own words (on_nonfinite), and would say it twice.
        with HeldInterrupt(s.checkpoint_dir is not None and not self.comm.parallel) as self.interrupt, \
                np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            history = self._epochs(start)
        if self.interrupt.pending:  # Ctrl-C after the last step (in validation, a callback): the run is whole
            raise StepInterrupt(self.optimizer.steps, s.checkpoint_dir, finished=True)
        return history

    def _weights_id(self):
        """A fingerprint of the sample weights (None: unweighted), the same on every rank:
        checkpoints keep it, and resuming with other weights is refused."""
        mine = None if self.W_host is None else hashlib.sha256(self.W_host.tobytes()).hexdigest()[:16]
        if self.comm.bcast(mine) != mine:
            raise ValueError(f"rank {self.comm.rank} has other sample weights than rank 0: every rank must pass the "
                             "whole data set with the same sample_weight (fit shards it)")
        return mine

    def _rows(self):
        n = self.T.shape[0]
        root_n = self.comm.bcast(n)
        if root_n != n:
            raise ValueError(f"rank {self.comm.rank} has {n} training rows, rank 0 has {root_n}: "
                             "every rank must pass the whole data set (fit shards it)")
        return n

    def _start(self):
        """Where training starts: a checkpoint's progress when resuming, else None."""
        s, comm = self.s, self.comm
        if s.resume:
            start = recovery.resume(self.model, self.optimizer, s.checkpoint_dir, comm, self.weights_id)
            if comm.rank == 0 and os.path.isdir(s.checkpoint_dir):
                checkpoint.prune(s.checkpoint_dir, s.keep_checkpoints)
            if start:
                self.history.update(start["history"])
            elif comm.rank == 0:
                warnings.warn(f"resume=True found no checkpoint in {s.checkpoint_dir}: training from the start",
                              RuntimeWarning, stacklevel=recovery.caller_level())
            return start
        if comm.parallel:
            recovery.adopt_root(self.model, self.optimizer, comm)
        return None

    def _epochs(self, start):
        model, s = self.model, self.s
        self.batch_size = min(s.batch_size, self.n)
        self.steps_per_epoch = -(-self.n // self.batch_size)
        self.callbacks = list(s.callbacks)
        if s.progress and self.comm.rank == 0:
            self.callbacks.append(ProgressBar(s.epochs, -(-self.n // self.batch_size)))
        self.running = model.backend.zeros((2,), np.float64)
        first_epoch, done_steps = (start["epoch"], start["step"]) if start else (0, 0)
        model.stop_training = False
        model.optimizer = self.optimizer
        call(self.callbacks, "on_train_begin", model)
        for epoch in range(first_epoch, s.epochs):
            self._epoch(epoch, done_steps if epoch == first_epoch else 0, start if epoch == first_epoch else None)
            model.stop_training = self.comm.bcast(model.stop_training)  # rank 0's callbacks decide for all
            if model.stop_training:
                break
        call(self.callbacks, "on_train_end", model)
        return dict(self.history)

    def _epoch(self, epoch, skip, start):
        """One epoch; ``skip`` steps were done before the checkpoint ``start`` this run resumed from."""
        model, be, comm = self.model, self.model.backend, self.comm
        call(self.callbacks, "on_epoch_begin", model, epoch)
        self.epoch_rng = model.shuffle_rng.bit_generator.state
        # Drawn on the host from the model's seeded generator, so a seed gives the
        # same batches on every device (and every rank); one small copy per epoch.
        order_host = model.shuffle_rng.permutation(self.n) if self.s.shuffle else np.arange(self.n)
        order = be.asarray(order_host)
        self.running.fill(0)
        if start and comm.rank == 0:  # the checkpoint holds all ranks' sums
            be.xp.copyto(self.running, be.asarray(np.array(start["running"], np.float64)))
        for s, start_row in enumerate(range(0, self.n, self.batch_size)):
            if s >= skip:
                self._batch(epoch, s, start_row, order, order_host)
        self._check_nonfinite()
        self.optimizer.sync_steps()
        logs = model.metrics(self.totals(self.running), self.n if self.W_host is None else self.W_total)
        if self.val is not None:
            logs.update({f"val_{k}": v for k, v in self.evaluate(*self.val).items()})
        for k, v in logs.items():
            self.history[k].append(v)
        call(self.callbacks, "on_epoch_end", model, epoch, logs)

    def _batch(self, epoch, s, start_row, order, order_host):
        model, be, comm = self.model, self.model.backend, self.comm
        rows = min(self.batch_size, self.n - start_row)
        lo, hi = distributed.shard(rows, comm.rank, comm.size)
        ws = model.workspace(hi - lo) if hi > lo else None  # None: this rank's shard is empty
        if ws is not None:
            ws.first_row = lo
            be.xp.copyto(ws.index, order[start_row + lo:start_row + hi])
            if self.X_disk is not None:
                mine = order_host[start_row + lo:start_row + hi]
                rows_read = inputs.to_compute(model, np.asarray(self.X_disk[mine], model.dtype), "X")
                be.xp.copyto(ws.a[0], be.asarray(rows_read))
        reduce = None
        if comm.parallel:  # this shard's share of the global batch: its rows, or its weights
            share = self._count(order_host[start_row + lo:start_row + hi], hi - lo)
            whole = self._count(order_host[start_row:start_row + rows], rows)
            reduce = functools.partial(comm.allreduce_mean, weight=share / whole if whole > 0 else 0.0)
        self.trainer.step(ws, self.running, reduce, X=self.X, T=self.T, W=self.W)
        logs = {"batch_size": rows}
        if s % SYNC_EVERY == SYNC_EVERY - 1:
            seen = min(self.n, start_row + rows)
            logs["loss"] = self.totals(self.running)[0] / self._count(order_host[:seen], seen)
            self._check_nonfinite()
        call(self.callbacks, "on_batch_end", model, s, logs)
        every = self.s.checkpoint_every
        due = s == self.steps_per_epoch - 1 if every == "epoch" else every and self.optimizer.steps % every == 0
        if due or self.interrupt.pending:
            self._checkpoint(epoch, s)
        if self.interrupt.pending:
            raise StepInterrupt(self.optimizer.steps, self.s.checkpoint_dir)

    def _checkpoint(self, epoch, s):
        self._check_nonfinite()  # a checkpoint never holds a step the guard would refuse
        self.optimizer.sync_steps()
        totals = self.totals(self.running)
        if self.comm.rank == 0:
            checkpoint.write(self.s.checkpoint_dir, self.model, self.optimizer, {
                "epoch": epoch, "step": s + 1, "rng": self.epoch_rng,
                "running": totals.tolist(), "history": dict(self.history), "sample_weights": self.weights_id,
            }, self.s.keep_checkpoints)

    def _check_nonfinite(self):
        def restore():
            return recovery.restore(self.model, self.optimizer, self.s.checkpoint_dir, self.comm,
                                    self.weights_id) is not None

        recovery.apply_policy(self.trainer, self.s.on_nonfinite, restore, where=self.s.checkpoint_dir)

    def totals(self, running):
        """The running [loss sum, hits] of all ranks, on the host (a device sync)."""
        totals = self.model.backend.to_host(running).copy()
        self.comm.allreduce_sum(totals)
        return totals

    def _count(self, rows, n):
        """What the running totals of the data set's ``rows`` (n of them) are divided by:
        n, or with sample weights their sum."""
        return n if self.W_host is None else float(self.W_host[rows].sum())

    def evaluate(self, X, T, W=None):
        """Loss and metric over (X, T) (weighted by W where given); each rank evaluates its shard of the rows."""
        lo, hi = distributed.shard(X.shape[0], self.comm.rank, self.comm.size)
        totals = self.totals(self.model.totals(X[lo:hi], T[lo:hi], None if W is None else W[lo:hi]))
        return self.model.metrics(totals, row_count(X, W))


def weight_total(weights_host):
    """The sum of a data set's weights (host, float64) that its epoch's metrics divide by:
    one function, so that fit and a pack (gpubackprop.nn.pack) divide by the same bits."""
    return float(weights_host.sum())


def check_validation_data(data):
    """fit's validation_data: (X, y) or (X, y, sample_weight), else a ValueError saying so."""
    if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
        raise ValueError("validation_data must be (X_val, y_val) or (X_val, y_val, sample_weight_val)")
    return data


def validation_set(model, data):
    """fit's validation_data on the device: (X, T, W or None)."""
    if data is None:
        return None
    X, T = model.prepare(*check_validation_data(data)[:2])
    return X, T, model.prepare_weights(data[2] if len(data) == 3 else None, X.shape[0])


def check_comm(comm, backend):
    if not isinstance(comm, distributed.Communicator):
        raise TypeError(f"comm must be a gpubackprop.distributed communicator (gb.distributed.init()), got {comm!r}")
    if isinstance(comm, distributed.NCCLCommunicator) and backend.name != comm.device:
        raise ValueError(f"this rank's NCCL communicator is bound to {comm.device} but the model is on "
                         f"{backend.name}; make the model with device=comm.device")
    return comm


class StepInterrupt(KeyboardInterrupt):
    """Ctrl-C, held to the end of a step (HeldInterrupt): ``steps`` done, every one in
    the model and in the checkpoint in ``directory``."""

    def __init__(self, steps, directory, finished=False):
        self.steps, self.directory, self.finished = steps, directory, finished
        super().__init__(f"interrupted after the last step ({steps}): training had finished" if finished else
                         f"interrupted after step {steps}; its checkpoint is in {directory} (resume=True continues "
                         "from it)")


class HeldInterrupt:
    """Ctrl-C (SIGINT) during a fit that checkpoints is held until the step ends, so
    that the step is whole and its checkpoint can be written (then ``_batch`` raises
    StepInterrupt, a KeyboardInterrupt). Only in the main thread, where Python's own handler is set
    (a program with its own handler keeps it), and not data parallel (the ranks
    would have to agree on the step). A second Ctrl-C interrupts at once."""

    def __init__(self, enabled):
        self.enabled, self.pending, self._previous = enabled, False, None

    def __enter__(self):
        if (self.enabled and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum, frame):
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False
