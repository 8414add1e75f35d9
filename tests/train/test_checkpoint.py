"""Checkpoints: a run killed (SIGKILL, at random moments) and resumed ends bit for
bit where an uninterrupted run ends; torn or altered files are skipped, never loaded."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.train import callbacks, checkpoint

from ..helpers import assert_same_params, random_batch

SCRIPT = textwrap.dedent("""
    import os, signal, sys, threading
    import numpy as np
    import gpubackprop as gb
    from gpubackprop.train import callbacks

    directory, out, kill_after, delay = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])

    def die():  # SIGKILL: no handler, no cleanup, as a power cut or the OOM killer
        os.kill(os.getpid(), signal.SIGKILL)

    class KillSoon(callbacks.Callback):
        \"\"\"kill_after steps past where this run resumed, a timer of ``delay`` seconds
        starts; it kills the process in that step's checkpoint write, in the gap, or
        in the next step, and the next step's end kills it at the latest.\"\"\"

        def on_train_begin(self, model):
            self.start, self.armed = model.optimizer.steps, False

        def on_batch_end(self, model, batch, logs):
            if self.armed:
                die()
            if kill_after >= 0 and model.optimizer.steps == self.start + kill_after:
                self.armed = True
                threading.Timer(delay, die).start()

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((200, 20)).astype(np.float32), rng.integers(0, 4, 200)
    model = gb.MLP([20, 32, 4], seed=0, dropout=0.1)
    history = model.fit(X, y, epochs=5, batch_size=16, optimizer=gb.optim.Adam(1e-2), progress=False,
                        checkpoint_dir=directory, checkpoint_every=1, keep_checkpoints=2, resume=True,
                        callbacks=[KillSoon()], validation_data=(X[:50], y[:50]))
    np.savez(out, **model.state_dict(), **{f"history.{k}": v for k, v in history.items()})
""")
STEPS = 5 * 13  # epochs x batches


def run_script(tmp_path, directory, out, kill_after=-1, delay=0.0):
    """Run the training script, killed (kill_after >= 0) between the end of the step
    kill_after past where it resumed and the end of the next (see KillSoon). The
    first of those steps has its checkpoint from the step before on disk, so every
    killed run leaves the next at least a step further, and at most kill_after.
    Returns True if it ran to the end."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(directory), str(out), str(kill_after), str(delay)],
                          capture_output=True, text=True)
    if done.returncode == -signal.SIGKILL:
        return False
    assert done.returncode == 0, done.stderr
    return True


def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path, rng):
    reference = tmp_path / "reference.npz"
    assert run_script(tmp_path, tmp_path / "ref", reference)
    out, kills = tmp_path / "resumed.npz", 0
    while not run_script(tmp_path, tmp_path / "ckpt", out, kill_after=int(rng.integers(2, 4)),
                         delay=rng.uniform(0, 0.005)):
        kills += 1
        assert kills < STEPS, "a killed run did not advance"
    assert kills >= (STEPS - 3) // 3  # each run advanced 1 to 3 steps, wherever its kill landed
    want, got = np.load(reference), np.load(out)
    assert sorted(want.files) == sorted(got.files)
    for name in want.files:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert len(checkpoint.checkpoints(str(tmp_path / "ckpt"))) == 2  # keep_checkpoints
    assert not [f for f in os.listdir(tmp_path / "ckpt") if f.endswith(".tmp")]


class Crash(callbacks.Callback):
    def __init__(self, at_step):
        self.at_step, self.seen = at_step, 0

    def on_batch_end(self, model, batch, logs):
        self.seen += 1
        if self.seen == self.at_step:
            raise KeyboardInterrupt("simulated crash")


@pytest.mark.parametrize("crash_at", [1, 7, 13, 14, 30])  # first step, mid-epoch, an epoch's last, next's first
def test_resume_at_every_kind_of_step(tmp_path, rng, crash_at):
    X, y = random_batch(rng, [6, 12, 3], "cross_entropy", 100)
    settings = dict(epochs=3, batch_size=8, progress=False, validation_data=(X[:20], y[:20]))
    plain = gb.MLP([6, 12, 3], seed=1, dropout=0.2)
    want = plain.fit(X, y, optimizer=gb.optim.SGD(0.1, momentum=0.9), **settings)
    crashing = gb.MLP([6, 12, 3], seed=1, dropout=0.2)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit(X, y, optimizer=gb.optim.SGD(0.1, momentum=0.9), checkpoint_dir=str(tmp_path),
                     checkpoint_every=1, callbacks=[Crash(crash_at)], **settings)
    resumed = gb.MLP([6, 12, 3], seed=1, dropout=0.2)
    got = resumed.fit(X, y, optimizer=gb.optim.SGD(0.1, momentum=0.9), checkpoint_dir=str(tmp_path),
                      checkpoint_every=1, resume=True, **settings)
    assert got == want
    assert_same_params(resumed.state_dict(), plain.state_dict())


def test_a_weighted_run_resumes_to_the_uninterrupted_one_and_only_with_its_weights(tmp_path, rng):
    X, y = random_batch(rng, [6, 12, 3], "cross_entropy", 100)
    w = rng.random(100) * (rng.random(100) > 0.2)
    settings = dict(epochs=3, batch_size=8, progress=False, sample_weight=w, validation_data=(X[:20], y[:20], w[:20]))
    plain = gb.MLP([6, 12, 3], seed=1)
    want = plain.fit(X, y, optimizer=gb.optim.Adam(1e-2), **settings)
    crashing = gb.MLP([6, 12, 3], seed=1)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit(X, y, optimizer=gb.optim.Adam(1e-2), checkpoint_dir=str(tmp_path), checkpoint_every=1,
                     callbacks=[Crash(20)], **settings)
    before = gb.MLP([6, 12, 3], seed=1)
    for other in (dict(settings, sample_weight=None), dict(settings, sample_weight=w * 2)):
        with pytest.raises(ValueError, match="was trained with other sample weights than these"):
            before.fit(X, y, optimizer=gb.optim.Adam(1e-2), checkpoint_dir=str(tmp_path), resume=True, **other)
    assert_same_params(before.state_dict(), gb.MLP([6, 12, 3], seed=1).state_dict())  # refused before any change
    got = before.fit(X, y, optimizer=gb.optim.Adam(1e-2), checkpoint_dir=str(tmp_path), checkpoint_every=1,
                     resume=True, **settings)
    assert got == want
    assert_same_params(before.state_dict(), plain.state_dict())


def test_torn_and_altered_checkpoints_are_skipped_with_a_warning(tmp_path, rng):
    X, y = random_batch(rng, [6, 12, 3], "cross_entropy", 40)
    model = gb.MLP([6, 12, 3], seed=1)
    model.fit(X, y, epochs=1, batch_size=10, progress=False, checkpoint_dir=str(tmp_path), checkpoint_every=1,
              keep_checkpoints=4)
    files = checkpoint.checkpoints(str(tmp_path))
    assert len(files) == 4
    with open(files[-1], "r+b") as f:  # torn: the last write cut short
        f.truncate(os.path.getsize(files[-1]) // 2)
    data = bytearray(open(files[-2], "rb").read())
    data[-3] ^= 0xFF  # altered: a flipped bit in the tensors
    open(files[-2], "wb").write(bytes(data))
    with pytest.warns(RuntimeWarning) as caught:
        path, saved = checkpoint.latest(str(tmp_path))
        optimizer, progress = saved.optimizer, saved.user["checkpoint"]
    assert path == files[-3] and optimizer.steps == 2 and progress["step"] == 2
    messages = " ".join(str(w.message) for w in caught)
    assert "not a readable safetensors file" in messages and "checksum" in messages


def test_resume_refuses_another_models_checkpoint(tmp_path, rng):
    X, y = random_batch(rng, [6, 12, 3], "cross_entropy", 20)
    gb.MLP([6, 12, 3], seed=1).fit(X, y, epochs=1, progress=False, checkpoint_dir=str(tmp_path), checkpoint_every=1)
    with pytest.raises(ValueError, match="is a checkpoint of MLP\\(\\[6, 12, 3\\].*not of this MLP\\(\\[6, 5, 3\\]"):
        gb.MLP([6, 5, 3], seed=1).fit(X, y, epochs=1, progress=False, checkpoint_dir=str(tmp_path), resume=True)


def test_resume_without_checkpoints_says_so_starts_fresh_and_options_are_checked(tmp_path, rng):
    X, y = random_batch(rng, [6, 12, 3], "cross_entropy", 20)
    a, b = gb.MLP([6, 12, 3], seed=1), gb.MLP([6, 12, 3], seed=1)
    with pytest.warns(RuntimeWarning, match="resume=True found no checkpoint in .*none: training from the start"):
        resumed = b.fit(X, y, epochs=2, progress=False, checkpoint_dir=str(tmp_path / "none"), resume=True)
    assert a.fit(X, y, epochs=2, progress=False) == resumed
    with pytest.raises(ValueError, match="need checkpoint_dir"):
        a.fit(X, y, checkpoint_every=2, progress=False)


def test_resuming_prunes_what_a_killed_save_left(tmp_path, rng):
    """A run killed after its last save but before pruning leaves one checkpoint too
    many (and maybe a temporary file); resuming with no step left writes nothing, so
    the resume itself prunes."""
    X, y = random_batch(rng, [6, 12, 3], "cross_entropy", 40)
    model = gb.MLP([6, 12, 3], seed=1)
    model.fit(X, y, epochs=1, batch_size=10, progress=False, checkpoint_dir=str(tmp_path), checkpoint_every=1,
              keep_checkpoints=3)
    (tmp_path / ".ckpt-0000000005.safetensors.x.tmp").write_bytes(b"torn")
    assert len(checkpoint.checkpoints(str(tmp_path))) == 3
    resumed = gb.MLP([6, 12, 3], seed=1)
    resumed.fit(X, y, epochs=1, batch_size=10, progress=False, checkpoint_dir=str(tmp_path), checkpoint_every=1,
                keep_checkpoints=2, resume=True)
    assert [os.path.basename(p) for p in checkpoint.checkpoints(str(tmp_path))] == [
        "ckpt-0000000003.safetensors", "ckpt-0000000004.safetensors"]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert_same_params(resumed.state_dict(), model.state_dict())


@pytest.mark.parametrize("every", [None, "epoch"])
def test_a_checkpoint_dir_alone_checkpoints_every_epoch_and_resumes_from_it(tmp_path, rng, every):
    """Before, checkpoint_dir without checkpoint_every wrote nothing (not even the
    folder), and resume=True after a crash silently started from scratch."""
    X, y = random_batch(rng, [6, 12, 3], "cross_entropy", 100)
    settings = dict(epochs=3, batch_size=8, progress=False)
    plain = gb.MLP([6, 12, 3], seed=1)
    want = plain.fit(X, y, optimizer=gb.optim.SGD(0.1), **settings)
    directory = str(tmp_path / "ckpt")
    crashing = gb.MLP([6, 12, 3], seed=1)
    with pytest.raises(KeyboardInterrupt):  # in epoch 2, after epoch 1's checkpoint
        crashing.fit(X, y, optimizer=gb.optim.SGD(0.1), checkpoint_dir=directory, checkpoint_every=every,
                     callbacks=[Crash(13 + 5)], **settings)
    assert [os.path.basename(p) for p in checkpoint.checkpoints(directory)] == ["ckpt-0000000013.safetensors"]
    resumed = gb.MLP([6, 12, 3], seed=1)
    got = resumed.fit(X, y, optimizer=gb.optim.SGD(0.1), checkpoint_dir=directory, resume=True, **settings)
    assert got == want
    assert_same_params(resumed.state_dict(), plain.state_dict())
    assert len(checkpoint.checkpoints(directory)) == 3  # one per epoch, all kept (keep_checkpoints=3)


def test_ctrl_c_after_the_last_step_is_not_swallowed(tmp_path, rng):
    import signal as signals

    class CtrlCAtTheEnd(callbacks.Callback):
        def on_epoch_end(self, model, epoch, logs):
            if epoch == 1:
                os.kill(os.getpid(), signals.SIGINT)  # during the last epoch's end: no step follows

    X, y = random_batch(rng, [6, 12, 3], "cross_entropy", 40)
    model = gb.MLP([6, 12, 3], seed=1)
    with pytest.raises(gb.train.StepInterrupt, match=r"interrupted after the last step \(10\): training had finished"):
        model.fit(X, y, epochs=2, batch_size=8, progress=False, checkpoint_dir=str(tmp_path),
                  callbacks=[CtrlCAtTheEnd()])
