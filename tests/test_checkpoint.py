"""Checkpoints: a run killed (SIGKILL, at random moments) and resumed ends bit for
bit where an uninterrupted run ends; torn or altered files are skipped, never loaded."""

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop import callbacks, checkpoint

from .helpers import assert_same_params, random_batch

SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    import gpubackprop as gb
    from gpubackprop import callbacks

    directory, out, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])

    class Progress(callbacks.Callback):  # says where it resumed and each step it takes
        def on_train_begin(self, model):
            print("from", model.optimizer.steps, flush=True)

        def on_batch_end(self, model, batch, logs):
            print("step", model.optimizer.steps, flush=True)
            time.sleep(pause)  # stretches the gap between steps, so kills land there too

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((200, 20)).astype(np.float32), rng.integers(0, 4, 200)
    model = gb.MLP([20, 32, 4], seed=0, dropout=0.1)
    history = model.fit(X, y, epochs=5, batch_size=16, optimizer=gb.optim.Adam(1e-2), progress=False,
                        checkpoint_dir=directory, checkpoint_every=1, keep_checkpoints=2, resume=True,
                        callbacks=[Progress()], validation_data=(X[:50], y[:50]))
    np.savez(out, **model.state_dict(), **{f"history.{k}": v for k, v in history.items()})
""")
STEPS = 5 * 13  # epochs x batches


def run_script(tmp_path, directory, out, pause, kill_delay=None):
    """Run the training script; with kill_delay (a callable giving seconds), SIGKILL it
    that long after it reports its second step past where it resumed. The step is
    reported before its checkpoint is written, so by then the first step's checkpoint
    is on disk: every killed run leaves the next one at least a step further, and the
    kill lands in a step, a save or the gap between them. Returns True if it ran to
    the end."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(directory), str(out), str(pause)],
                            stdout=subprocess.PIPE, text=True)
    start = None
    for line in proc.stdout:
        word, steps = line.split()
        if word == "from":
            start = int(steps)
        elif kill_delay is not None and int(steps) >= start + 2:
            time.sleep(kill_delay())
            proc.kill()  # SIGKILL: no handler, no cleanup, as a power cut or the OOM killer
            proc.wait()
            return False
    assert proc.wait() == 0
    return True


def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path, rng):
    reference = tmp_path / "reference.npz"
    assert run_script(tmp_path, tmp_path / "ref", reference, pause=0.0)
    out, kills = tmp_path / "resumed.npz", 0
    # Each step sleeps 10 ms after it is reported and each kill waits up to 10 ms more,
    # so a run is killed within a step or two of its second; each advances at least one.
    while not run_script(tmp_path, tmp_path / "ckpt", out, pause=0.01, kill_delay=lambda: rng.uniform(0, 0.01)):
        kills += 1
        assert kills < STEPS, "a killed run did not advance"
    assert kills >= 15
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
        path, _, optimizer, progress = checkpoint.latest(str(tmp_path))
    assert path == files[-3] and optimizer.steps == 2 and progress["step"] == 2
    messages = " ".join(str(w.message) for w in caught)
    assert "not a readable safetensors file" in messages and "checksum" in messages


def test_resume_refuses_another_models_checkpoint(tmp_path, rng):
    X, y = random_batch(rng, [6, 12, 3], "cross_entropy", 20)
    gb.MLP([6, 12, 3], seed=1).fit(X, y, epochs=1, progress=False, checkpoint_dir=str(tmp_path), checkpoint_every=1)
    with pytest.raises(ValueError, match="is a checkpoint of MLP\\(\\[6, 12, 3\\].*not of this MLP\\(\\[6, 5, 3\\]"):
        gb.MLP([6, 5, 3], seed=1).fit(X, y, epochs=1, progress=False, checkpoint_dir=str(tmp_path), resume=True)


def test_resume_without_checkpoints_starts_fresh_and_options_are_checked(tmp_path, rng):
    X, y = random_batch(rng, [6, 12, 3], "cross_entropy", 20)
    a, b = gb.MLP([6, 12, 3], seed=1), gb.MLP([6, 12, 3], seed=1)
    assert a.fit(X, y, epochs=2, progress=False) == b.fit(X, y, epochs=2, progress=False,
                                                          checkpoint_dir=str(tmp_path / "none"), resume=True)
    with pytest.raises(ValueError, match="need checkpoint_dir"):
        a.fit(X, y, checkpoint_every=2, progress=False)
