"""One training step: the step ``train_step`` and every step of ``fit`` run.

As tiny-cuda-nn's ``Trainer::training_step``, for a network and an optimizer:

    forward, loss, backward          (network: forward_pass, compute_loss, backward_pass)
    reduce                           data parallel: the global batch's mean gradient
    unscale and check (fp16)         or the divergence guard's check of the gradients
    clip                             g *= min(1, clip_norm / ||g||) where clip_norm is set
    update                           one optimizer launch; skipped where flagged non-finite
    loss scale / guard bookkeeping   and the 16-bit copy of the weights (mixed precision)

Where the backend captures graphs (CUDA) the whole step is captured on its second
run and launched after (gpubackprop.train.capture); the numbers are the same.
"""

from ..nn.workspace import out_of_memory
from ..optim import Optimizer
from .capture import StepGraphs
from .guard import Guard


class Trainer:
    """network + optimizer + the step's settings: ``clip_norm`` (None: no clipping),
    ``guard`` (watch for non-finite gradients and updates; fp16 has its loss scaler
    instead), ``graphs`` (capture where the backend can, and the step has no
    collective in its middle: ``parallel``)."""

    def __init__(self, network, optimizer, clip_norm=None, guard=True, graphs=True, parallel=False):
        self.network = network
        self.optimizer = check_optimizer(optimizer)
        self.clip_norm = check_clip_norm(clip_norm)
        backend = network.backend
        self.guard = Guard(backend) if guard and network.scaler is None else None
        self.graphs = StepGraphs(backend) if graphs and backend.supports_graphs and not parallel else None
        if self.graphs is not None:
            network.workspaces.users.add(self.graphs)
        try:
            optimizer.bind(network)  # its state allocated now, not after a step has begun
        except MemoryError:
            raise out_of_memory(backend, f"the state of {optimizer!r}", optimizer.state_bytes(network),
                                "use SGD without momentum, or a smaller model") from None

    def step(self, ws, running=None, reduce=None, X=None, T=None, W=None):
        """One step on the batch in ``ws`` (None: this rank's share of the global batch
        is empty; its gradients count as zero). Given the data set's rows X and targets
        T (and sample weights W, else unweighted) on the device, the batch's rows
        ws.index are gathered from them first (a capture records that too). ``running``
        gains [loss * batch (or * its weights' sum), hits];
        ``reduce(grads)`` makes the global batch's gradients. Returns the loss, a
        device scalar (None without ws)."""
        net, optimizer = self.network, self.optimizer
        optimizer.bind(net)  # a no-op unless a callback swapped its state

        def run():
            if ws is not None:
                for source, rows in ((X, ws.a[0]), (T, ws.target), (W, ws.weight)):
                    if source is not None:
                        net.backend.gather_rows(source, ws.index, rows)
                if T is not None:  # a batch of the data set: weighted as the data set is
                    ws.set_weights(net.backend, None if W is None else ws.weight)
            self._run(ws, running, reduce)

        if self.graphs is None:
            run()
        else:
            buffers = (*optimizer.buffers(), ws, running, *net.buffers(), self.guard, X, T, W)
            # Weighted or not is Python's choice of the loss's buffers: a step captured one way replays it,
            # so the key holds what this step uses (gathered: W's presence; loaded: the workspace's flag).
            weighted = W is not None if T is not None else ws is not None and ws.weighted
            constants = (optimizer.constants(), self.clip_norm, net.precision, weighted)
            self.graphs.run(run, buffers, constants, on_replay=self._count)
        return None if ws is None else ws.loss

    def _count(self):
        self.optimizer.steps += 1  # the replayed update counts on the device itself

    def _run(self, ws, running, reduce):
        net, optimizer, backend = self.network, self.optimizer, self.network.backend
        steps = optimizer.device_steps
        if ws is None:
            net.grads.fill(0)
        else:
            net.forward_pass(ws, steps)
            net.compute_loss(ws, running)
            net.backward_pass(ws, steps)
        if reduce is not None:
            reduce(net.grads)
        found_inf = None
        if net.scaler is not None:  # fp16: unscale, and skip the update if the gradients overflowed
            net.scaler.unscale_and_check(net.grads)
            found_inf = net.scaler.found_inf
        elif self.guard is not None:  # skip a step with Inf / NaN gradients (see train/guard.py)
            self.guard.check(net.grads)
            found_inf = self.guard.flag
        if self.clip_norm is not None:
            backend.clip_by_global_norm(net.grads, self.clip_norm)
        optimizer.step(found_inf=found_inf, params_flag=None if self.guard is None else self.guard.params.flag)
        if net.scaler is not None:
            net.scaler.update()
        elif self.guard is not None:
            self.guard.after_update(steps)
        net.parameters.cast()


def check_optimizer(optimizer):
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a gpubackprop.optim optimizer such as SGD(lr=0.1), got {optimizer!r}")
    return optimizer


def check_clip_norm(clip_norm):
    if clip_norm is not None and not (isinstance(clip_norm, (int, float)) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a positive number or None, got {clip_norm!r}")
    return clip_norm
