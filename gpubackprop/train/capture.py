"""Capture then replay: a train step recorded once as a graph and launched after.

As tinygrad's TinyJit: the first step on a set of buffers runs eagerly (kernels
load, scratch is sized), the second is captured and launched, every later one is
a launch of that capture. A capture holds addresses, not arrays, so a
CapturedStep holds every buffer it reads or writes (the network's, the
optimizer's, the workspace's; the backend's own scratch and cuBLAS workspace live
as long as the backend): none of them can be freed and its memory handed to
another array while the step may still be replayed. Steps are keyed by the
identity of those buffers, never a batch size: a workspace made again after
others pushed it out, or new optimizer state, is a new step, captured anew.
"""

import collections

KEPT = 4  # captured steps of one trainer: the full batch, the partial last one, and spares


class CapturedStep:
    """fn recorded once by ``backend.capture``; ``launch()`` replays it."""

    def __init__(self, backend, fn, buffers):
        self.buffers = buffers
        self.graph = backend.capture(fn)

    def launch(self):
        self.graph.launch()


class StepGraphs:
    """The captured steps of one trainer, least recently used first out."""

    def __init__(self, backend, kept=KEPT):
        self.backend, self.kept = backend, kept
        self._entries = collections.OrderedDict()  # key -> buffers (seen once) or CapturedStep

    def __len__(self):
        return len(self._entries)

    def captured(self):
        """The CapturedSteps held now."""
        return [e for e in self._entries.values() if isinstance(e, CapturedStep)]

    def held(self):
        """The buffers of every step held now, captured or awaiting capture."""
        return [e.buffers if isinstance(e, CapturedStep) else e for e in self._entries.values()]

    def run(self, fn, buffers, constants, on_replay):
        """Run fn (eagerly, or captured, or as a launch: see the module docstring).
        ``constants``: what fn bakes into a capture besides the buffers (a new value
        is a new step). ``on_replay()`` does the host's share of a replayed step."""
        # Ids cannot be reused while this holds the buffers.
        key = tuple(map(id, buffers)) + (constants,)
        entry = self._entries.pop(key, None)
        if entry is None:
            self._entries[key] = buffers  # held, so that no other buffer takes one of their ids meanwhile
            fn()
        elif isinstance(entry, CapturedStep):
            self._entries[key] = entry
            on_replay()
            entry.launch()
        else:
            self._entries[key] = captured = CapturedStep(self.backend, fn, buffers)  # fn's host work ran once
            captured.launch()
        while len(self._entries) > self.kept:
            self._entries.popitem(last=False)

    def forget(self, buffer):
        """Drop every step holding ``buffer`` (a workspace the network evicted)."""
        for key in [k for k, e in self._entries.items() if _holds(e, buffer)]:
            del self._entries[key]


def _holds(entry, buffer):
    buffers = entry.buffers if isinstance(entry, CapturedStep) else entry
    return any(b is buffer for b in buffers)
