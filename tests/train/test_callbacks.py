"""Callbacks: progress lines, early stopping, checkpoints, schedules; gradient clipping."""

import io

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.train import callbacks as cbs

from ..helpers import random_batch


class Recorder(cbs.Callback):
    def __init__(self):
        self.events, self.lrs = [], []

    def on_train_begin(self, model):
        self.events.append("train_begin")

    def on_epoch_begin(self, model, epoch):
        self.lrs.append(model.optimizer.lr)

    def on_batch_end(self, model, batch, logs):
        self.events.append(("batch", batch, "loss" in logs))

    def on_epoch_end(self, model, epoch, logs):
        self.events.append(("epoch", epoch))

    def on_train_end(self, model):
        self.events.append("train_end")


@pytest.fixture
def data(rng):
    return random_batch(rng, [5, 8, 3], "cross_entropy", 40)


def test_hooks_run_in_order_and_loss_is_read_every_16th_batch(data):
    rec = Recorder()
    gb.MLP([5, 8, 3], seed=0).fit(*data, epochs=2, batch_size=2, callbacks=[rec], progress=False)
    batches = [e for e in rec.events if e[0] == "batch"][:20]
    assert rec.events[0] == "train_begin" and rec.events[-1] == "train_end"
    assert [b for _, b, _ in batches] == list(range(20))
    assert [b for _, b, has_loss in batches if has_loss] == [15]
    assert rec.events.count(("epoch", 1)) == 1


def test_progress_prints_a_line_per_epoch_when_not_a_terminal(data):
    stream = io.StringIO()
    model = gb.MLP([5, 8, 3], seed=0)
    model.fit(*data, epochs=3, batch_size=8, progress=False, callbacks=[cbs.ProgressBar(3, 5, stream=stream)])
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].startswith("epoch 1/3  loss ") and "accuracy" in lines[0]


def test_early_stopping_waits_patience_epochs_and_restores_the_best(data):
    X, y = data
    model = gb.MLP([5, 8, 3], seed=0)
    # A learning rate this large makes validation loss worsen soon after the start.
    stop = cbs.EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    history = model.fit(X, y, epochs=40, batch_size=4, optimizer=gb.optim.SGD(2.0), progress=False,
                        validation_data=(X, y), callbacks=[stop])
    best = int(np.argmin(history["val_loss"]))
    assert stop.stopped_epoch == len(history["val_loss"]) - 1 == best + 2
    assert model.evaluate(X, y)["loss"] == pytest.approx(history["val_loss"][best], rel=1e-5)


def test_early_stopping_names_what_it_can_monitor(data):
    with pytest.raises(KeyError, match=r"cannot monitor 'val_los': the epoch logs hold \['accuracy', 'loss', "):
        gb.MLP([5, 8, 3], seed=0).fit(*data, epochs=1, progress=False, validation_data=data,
                                      callbacks=[cbs.EarlyStopping("val_los")])


def test_model_checkpoint_saves_each_epoch_or_only_the_best(data, tmp_path):
    X, y = data
    every = cbs.ModelCheckpoint(tmp_path / "e{epoch:02d}.safetensors")
    best = cbs.ModelCheckpoint(tmp_path / "best.safetensors", monitor="loss", save_best_only=True)
    model = gb.MLP([5, 8, 3], seed=0)
    model.fit(X, y, epochs=3, batch_size=8, optimizer=gb.optim.Adam(1e-2), progress=False, callbacks=[every, best])
    assert sorted(p.name for p in tmp_path.glob("e*")) == ["e01.safetensors", "e02.safetensors", "e03.safetensors"]
    assert len(best.saved) == 3  # the training loss fell every epoch
    loaded, opt = gb.load(best.saved[-1]), gb.load_optimizer(best.saved[-1])
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    assert opt.steps == model.optimizer.steps


@pytest.mark.parametrize("schedule,expected", [
    (cbs.StepLR(2, gamma=0.5), [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]),
    (cbs.ExponentialLR(0.5), [1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125]),
    (cbs.CosineLR(epochs=5, warmup=2, min_lr=0.1), [0.5, 1.0, 1.0, 0.775, 0.325, 0.1]),
])
def test_schedules_set_the_lr_each_epoch(data, schedule, expected):
    rec = Recorder()
    gb.MLP([5, 8, 3], seed=0).fit(*data, epochs=6, batch_size=40, optimizer=gb.optim.SGD(1.0), progress=False,
                                  callbacks=[schedule, rec])
    np.testing.assert_allclose(rec.lrs, expected)


def test_reduce_lr_on_plateau(data):
    rec = Recorder()
    plateau = cbs.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=1, min_delta=10.0)  # never improves enough
    gb.MLP([5, 8, 3], seed=0).fit(*data, epochs=4, progress=False, optimizer=gb.optim.SGD(1.0), callbacks=[plateau, rec])
    assert rec.lrs == [1.0, 1.0, 0.5, 0.25]  # the first epoch sets the best; each later one misses it


def test_clip_norm_scales_the_step_as_torch_clip_grad_norm(data):
    X, y = data
    model, lr = gb.MLP([5, 8, 3], seed=0, dtype="float64"), 0.1
    before = model.state_dict()
    _, grads = model.loss_and_grad(X, y)
    norm = np.sqrt(sum((g**2).sum() for g in grads.values()))
    clip = norm / 4
    model.fit(X, y, epochs=1, batch_size=len(X), shuffle=False, optimizer=gb.optim.SGD(lr), progress=False,
              clip_norm=clip)
    coef = clip / (norm + 1e-6)
    for k, v in model.state_dict().items():
        np.testing.assert_allclose(v, before[k] - lr * coef * grads[k], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="clip_norm must be a positive number"):
        model.fit(X, y, clip_norm=-1.0, progress=False)


@pytest.mark.parametrize("make", [lambda: cbs.EarlyStopping("val_loss"),
                                  lambda: cbs.ReduceLROnPlateau(monitor="val_accuracy")])
def test_a_val_monitor_without_validation_data_fails_before_the_first_epoch(make, rng):
    X, y = random_batch(rng, [4, 3, 2], "cross_entropy", 20)
    model = gb.MLP([4, 3, 2], seed=0)
    before = model.params.copy()
    with pytest.raises(ValueError, match=r"monitors 'val_.*', which needs validation data: pass validation_data"):
        model.fit(X, y, epochs=3, callbacks=[make()], progress=False)
    np.testing.assert_array_equal(model.params, before)  # not an epoch trained
