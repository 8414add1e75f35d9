"""The training progress display: a tqdm bar per epoch, or a line per epoch.

tqdm comes with the ``cli`` extra; without it (or with ``progress=False`` in
``fit``) training still runs, printing one summary line per epoch or nothing.
"""

import sys


def _fmt(logs):
    return "  ".join(f"{k} {v:.4f}" for k, v in logs.items())


class Progress:
    def __init__(self, epochs, steps_per_epoch, enabled=True, stream=None):
        self.epochs, self.steps, self.enabled = epochs, steps_per_epoch, enabled
        self.stream = stream or sys.stderr
        self._bar = None
        try:
            import tqdm
        except ImportError:
            self._tqdm = None
        else:
            self._tqdm = tqdm.tqdm

    def start_epoch(self, epoch):
        if self.enabled and self._tqdm is not None:
            width = len(str(self.epochs))
            self._bar = self._tqdm(
                total=self.steps, desc=f"epoch {epoch + 1:>{width}}/{self.epochs}",
                unit="step", file=self.stream, leave=True, dynamic_ncols=True,
            )

    def step(self, n, logs=None):
        if self._bar is not None:
            self._bar.update(n)
            if logs:
                self._bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()}, refresh=False)

    def end_epoch(self, epoch, logs):
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()})
            self._bar.close()
            self._bar = None
        else:
            print(f"epoch {epoch + 1}/{self.epochs}  {_fmt(logs)}", file=self.stream, flush=True)
