"""The divergence guard of ``fit``: no step may leave Inf or NaN in the parameters.

Each step flags non-finite gradients on the device (a float32 overflow, a learning
rate too high, bad data); the optimizer skips a flagged step whole, and the device
counts them and notes the first. ``fit`` reads the count only where it syncs
anyway (every 16 steps and at each epoch's end) and applies its policy,
``on_nonfinite``:

    "raise"     FloatingPointError naming the step, and the tensors and values in
                the latest gradients that went bad; the model keeps its last finite
                parameters
    "skip"      go on; a warning per check says how many steps were skipped
    "restore"   load the newest checkpoint (checkpoint_dir), halve the learning
                rate, go on

fp16 training has this built in: its loss scaler skips overflowing steps and
shrinks the scale, which is how fp16 finds its range, so the guard stands aside.
"""

import numpy as np

POLICIES = ("raise", "skip", "restore")


class Guard:
    def __init__(self, backend):
        self.backend = backend
        self.flag = backend.zeros((1,), np.uint32)
        self.count = backend.zeros((1,), np.uint32)
        self.first_bad = backend.zeros((1,), np.uint32)
        self.seen = 0

    def check(self, grads):
        self.backend.flag_nonfinite(grads, self.flag)

    def after_update(self, steps):
        self.backend.count_nonfinite(self.flag, self.count, self.first_bad, steps)

    def poll(self):
        """(steps skipped since the last poll, the step count at the first ever) (a host sync)."""
        count = int(self.backend.to_host(self.count)[0])
        new, self.seen = count - self.seen, count
        return new, int(self.backend.to_host(self.first_bad)[0])


def describe(named_grads):
    """Which gradient tensors hold Inf or NaN, with an example value and where."""
    bad = []
    for name, g in named_grads.items():
        where = np.argwhere(~np.isfinite(g))
        if len(where):
            at = tuple(int(i) for i in where[0])
            bad.append(f"{name} ({len(where)} non-finite, e.g. {g[at]} at {list(at)})")
    return "; ".join(bad) if bad else "the latest step's gradients are finite again"
