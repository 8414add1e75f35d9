"""Capture then replay (gpubackprop.train.capture), on its own: eager first,
captured second, launched after; steps keyed by their buffers; held buffers."""

import numpy as np

from gpubackprop.train.capture import StepGraphs


class Recorder:
    """A backend whose capture records fn's calls and replays them."""

    def __init__(self):
        self.captures = 0

    def capture(self, fn):
        self.captures += 1
        fn()  # what a capture runs: the recorded work, not executed on a real device

        class Graph:
            def launch(self):
                fn()

        return Graph()


def test_eager_then_captured_then_launched():
    backend, runs, replays = Recorder(), [], []
    graphs = StepGraphs(backend)
    buffers = (np.zeros(3), np.zeros(2))
    for _ in range(4):
        graphs.run(lambda: runs.append(1), buffers, "lr=0.1", on_replay=lambda: replays.append(1))
    # eager; recorded and launched; launched; launched (the last two: replays).
    assert backend.captures == 1 and len(runs) == 5 and len(replays) == 2
    assert len(graphs.captured()) == 1


def test_new_buffers_or_constants_are_a_new_step():
    backend = Recorder()
    graphs = StepGraphs(backend)
    a, b = (np.zeros(3),), (np.zeros(3),)
    for buffers, constants in ((a, 1), (a, 1), (b, 1), (b, 1), (a, 2), (a, 2)):
        graphs.run(lambda: None, buffers, constants, on_replay=lambda: None)
    assert backend.captures == 3 and len(graphs) == 3


def test_a_step_awaiting_capture_holds_its_buffers_and_forget_drops_them():
    graphs = StepGraphs(Recorder())
    x = np.zeros(5)
    graphs.run(lambda: None, (x,), 0, on_replay=lambda: None)
    assert graphs.captured() == [] and any(b is x for held in graphs.held() for b in held)
    graphs.forget(x)
    assert len(graphs) == 0


def test_the_least_recently_used_step_goes_first():
    graphs = StepGraphs(Recorder(), kept=2)
    buffers = [(np.zeros(1),) for _ in range(3)]
    for held in buffers:
        graphs.run(lambda: None, held, 0, on_replay=lambda: None)
    assert len(graphs) == 2 and not any(b is buffers[0][0] for held in graphs.held() for b in held)
