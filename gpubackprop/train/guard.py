"""The divergence guard of every train step: no step may leave Inf or NaN in the parameters.

Each step flags non-finite gradients on the device (a float32 overflow, a learning
rate too high, bad data); the optimizer skips a flagged step whole, and the device
counts them and notes the first. Training reads the count only where it syncs
anyway (every 16 steps and at each epoch's end in ``fit``, every ``train_step``)
and applies its policy, ``on_nonfinite`` (gpubackprop.train.recovery).

An update can also overflow by itself: finite gradients times a huge learning
rate. The update checks the parameters it wrote too (the optimizer's
``params_flag``: on the CPU in the same pass); that cannot be undone
(the step has been applied), so it raises under "raise" and "skip" alike, and
restores under "restore".

fp16 training has this built in: its loss scaler skips overflowing steps and
shrinks the scale, which is how fp16 finds its range, so the guard stands aside.
"""

import numpy as np


class _Counter:
    """A device flag, the count of steps it was raised in, and the first such step."""

    def __init__(self, backend):
        self.flag, self.count, self.first = (backend.zeros((1,), np.uint32) for _ in range(3))
        self.seen = 0


class Guard:
    def __init__(self, backend):
        self.backend = backend
        self.grads, self.params = _Counter(backend), _Counter(backend)

    @property
    def flag(self):
        """Set when this step's gradients are not finite: the optimizer skips the step."""
        return self.grads.flag

    def check(self, grads):
        self.backend.flag_nonfinite(grads, self.grads.flag)

    def after_update(self, steps):
        """Count this step's flags (the update set ``params.flag`` where the new
        parameters hold Inf or NaN)."""
        for c in (self.grads, self.params):
            self.backend.count_nonfinite(c.flag, c.count, c.first, steps)

    def poll(self):
        """For the gradients and for the parameters: (steps flagged since the last poll,
        the step count at the first ever) (a host sync)."""
        result = []
        for c in (self.grads, self.params):
            count = int(self.backend.to_host(c.count)[0])
            new, c.seen = count - c.seen, count
            result.append((new, int(self.backend.to_host(c.first)[0])))
        return result


def describe(named_grads):
    """Which gradient tensors hold Inf or NaN, with an example value and where."""
    bad = []
    for name, g in named_grads.items():
        where = np.argwhere(~np.isfinite(g))
        if len(where):
            at = tuple(int(i) for i in where[0])
            bad.append(f"{name} ({len(where)} non-finite, e.g. {g[at]} at {list(at)})")
    return "; ".join(bad) if bad else "the latest step's gradients are finite again"
