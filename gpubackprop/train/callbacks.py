"""Callbacks for ``MLP.fit``: progress display, early stopping, checkpoints and
learning-rate schedules, as Keras and PyTorch users know them.

A callback is any object with some of these methods (the rest are skipped):

    on_train_begin(model)                  model.optimizer is the fit's optimizer
    on_epoch_begin(model, epoch)
    on_batch_end(model, batch, logs)       logs: {"batch_size"}, and "loss" (the
                                           epoch's running mean) every 16th batch,
                                           when fit reads it anyway: no extra sync
    on_epoch_end(model, epoch, logs)       logs: the epoch's metrics, as in History
    on_train_end(model)

Setting ``model.stop_training = True`` ends training after the current epoch.
Schedules change ``model.optimizer.lr`` between epochs (on a GPU the captured
step is then captured anew).
"""

import math
import sys

MONITOR_MODES = ("auto", "min", "max")


class Callback:
    """A base with every hook a no-op."""

    @property
    def monitored(self):
        """The epoch log this callback watches ("val_loss", ...), None for none: fit
        checks before the first epoch that the log will exist."""
        monitor = getattr(self, "_monitor", None)
        return monitor.monitor if monitor is not None else None

    def on_train_begin(self, model):
        pass

    def on_epoch_begin(self, model, epoch):
        pass

    def on_batch_end(self, model, batch, logs):
        pass

    def on_epoch_end(self, model, epoch, logs):
        pass

    def on_train_end(self, model):
        pass


def call(callbacks, hook, *args):
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(*args)


class _Monitor:
    """Tracks the best value of one logged metric; "auto" minimises losses and
    maximises accuracies."""

    def __init__(self, monitor, mode, min_delta):
        if mode not in MONITOR_MODES:
            raise ValueError(f"mode must be one of {MONITOR_MODES}, got {mode!r}")
        self.monitor, self.min_delta = monitor, abs(min_delta)
        self.sign = -1.0 if mode == "max" or (mode == "auto" and "acc" in monitor) else 1.0
        self.best = math.inf

    def value(self, logs):
        if self.monitor not in logs:
            raise KeyError(f"cannot monitor {self.monitor!r}: the epoch logs hold {sorted(logs)} "
                           "(val_* metrics need validation_data)")
        return float(logs[self.monitor])

    def improved(self, logs):
        """Whether logs beat the best by min_delta (and if so, it becomes the best)."""
        v = self.sign * self.value(logs)
        if v < self.best - self.min_delta:
            self.best = v
            return True
        return False


class ProgressBar(Callback):
    """A live tqdm bar per epoch on a terminal; one line per epoch otherwise (CI, log
    files) or without tqdm (it comes with the ``cli`` extra)."""

    def __init__(self, epochs, steps_per_epoch, stream=None):
        self.epochs, self.steps = epochs, steps_per_epoch
        self.stream = stream or sys.stderr
        self._bar, self._done = None, 0
        self._tqdm = None
        if getattr(self.stream, "isatty", lambda: False)():
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._tqdm = tqdm

    def on_epoch_begin(self, model, epoch):
        self._done = 0
        if self._tqdm is not None:
            width = len(str(self.epochs))
            self._bar = self._tqdm(total=self.steps, desc=f"epoch {epoch + 1:>{width}}/{self.epochs}",
                                   unit="step", file=self.stream, leave=True, dynamic_ncols=True)

    def on_batch_end(self, model, batch, logs):
        if self._bar is not None and "loss" in logs:  # update with each reading, not every step
            self._bar.update(batch + 1 - self._done)
            self._done = batch + 1
            self._bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

    def on_epoch_end(self, model, epoch, logs):
        text = {k: f"{v:.4f}" for k, v in logs.items()}
        if self._bar is not None:
            self._bar.update(self.steps - self._done)
            self._bar.set_postfix(text)
            self._bar.close()
            self._bar = None
        else:
            print(f"epoch {epoch + 1}/{self.epochs}  " + "  ".join(f"{k} {v}" for k, v in text.items()),
                  file=self.stream, flush=True)


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs;
    with ``restore_best_weights`` the model ends with its best epoch's parameters."""

    def __init__(self, monitor="val_loss", patience=5, min_delta=0.0, mode="auto", restore_best_weights=False):
        self._monitor = _Monitor(monitor, mode, min_delta)
        self.patience, self.restore_best_weights = patience, restore_best_weights
        self.wait, self.stopped_epoch, self.best_state = 0, None, None

    def on_train_begin(self, model):
        self._monitor.best, self.wait, self.stopped_epoch, self.best_state = math.inf, 0, None, None

    def on_epoch_end(self, model, epoch, logs):
        if self._monitor.improved(logs):
            self.wait = 0
            if self.restore_best_weights:
                self.best_state = model.state_dict()
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            model.stop_training = True

    def on_train_end(self, model):
        if self.restore_best_weights and self.best_state is not None:
            model.load_state_dict(self.best_state)


class ModelCheckpoint(Callback):
    """Save the model (and its optimizer) after each epoch, atomically, to ``path``
    (formatted with ``epoch`` and the epoch's logs, e.g. "ckpt-{epoch:03d}.safetensors");
    with ``save_best_only``, only when ``monitor`` improved."""

    def __init__(self, path, monitor="val_loss", save_best_only=False, mode="auto"):
        self.path, self.save_best_only = str(path), save_best_only
        self._monitor = _Monitor(monitor, mode, 0.0)
        self.saved = []

    @property
    def monitored(self):
        return self._monitor.monitor if self.save_best_only else None  # else it saves every epoch, watching nothing

    def on_epoch_end(self, model, epoch, logs):
        if self.save_best_only and not self._monitor.improved(logs):
            return
        if model.comm.rank != 0:  # data parallel: the ranks hold the same model; one writes it
            return
        path = self.path.format(epoch=epoch + 1, **logs)
        model.save(path, optimizer=getattr(model, "optimizer", None))
        self.saved.append(path)


class _Schedule(Callback):
    """Sets the optimizer's lr from the epoch: lr = schedule(epoch, base lr)."""

    def on_train_begin(self, model):
        self.base_lr = model.optimizer.lr

    def on_epoch_begin(self, model, epoch):
        model.optimizer.lr = self.lr(epoch)


class StepLR(_Schedule):
    """lr = base * gamma ** (epoch // step_size), as torch.optim.lr_scheduler.StepLR."""

    def __init__(self, step_size, gamma=0.1):
        self.step_size, self.gamma = step_size, gamma

    def lr(self, epoch):
        return self.base_lr * self.gamma ** (epoch // self.step_size)


class ExponentialLR(_Schedule):
    """lr = base * gamma ** epoch."""

    def __init__(self, gamma):
        self.gamma = gamma

    def lr(self, epoch):
        return self.base_lr * self.gamma**epoch


class CosineLR(_Schedule):
    """Linear warm-up over ``warmup`` epochs to the base lr, then a cosine from it to
    ``min_lr`` at epoch ``epochs`` (and min_lr after)."""

    def __init__(self, epochs, warmup=0, min_lr=0.0):
        if not 0 <= warmup < epochs:
            raise ValueError(f"warmup must be in [0, epochs), got warmup={warmup}, epochs={epochs}")
        self.epochs, self.warmup, self.min_lr = epochs, warmup, min_lr

    def lr(self, epoch):
        if epoch < self.warmup:
            return self.base_lr * (epoch + 1) / self.warmup
        t = min(1.0, (epoch - self.warmup) / (self.epochs - self.warmup))
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t))


class ReduceLROnPlateau(Callback):
    """lr *= factor when ``monitor`` has not improved by ``min_delta`` for ``patience``
    epochs, down to ``min_lr``."""

    def __init__(self, monitor="val_loss", factor=0.1, patience=10, min_delta=1e-4, min_lr=0.0, mode="auto"):
        if not 0 < factor < 1:
            raise ValueError(f"factor must be in (0, 1), got {factor}")
        self._monitor = _Monitor(monitor, mode, min_delta)
        self.factor, self.patience, self.min_lr, self.wait = factor, patience, min_lr, 0

    def on_train_begin(self, model):
        self._monitor.best, self.wait = math.inf, 0

    def on_epoch_end(self, model, epoch, logs):
        if self._monitor.improved(logs):
            self.wait = 0
        else:
            self.wait += 1
            if self.wait >= self.patience:
                model.optimizer.lr = max(self.min_lr, model.optimizer.lr * self.factor)
                self.wait = 0
