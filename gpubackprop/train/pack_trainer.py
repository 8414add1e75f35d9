"""One training step of a pack on a shared batch: every member's step at once.

As gpubackprop.train.Trainer's step, with a member axis (gpubackprop.nn.packed):

    gather        the batch's rows once, each member's row weights
    forward, loss, backward   the PackedNetwork's passes (one wide first layer)
    guard         per member: Inf or NaN in its gradients skips its update
    update        per member: its optimizer's rule with its own hyperparameters,
                  its own state and step count (Backend.optimizer_update_members)

Each member's update is its lone optimizer's, element for element, with its
settings; a member whose gradients or parameters go non-finite is flagged
(``flagged``), and the pack stops it alone.

SharedBatches runs a pack's members in groups of PackTrainers, each group's step
after the other's on every batch (``member_groups``: as many members as keep a
layer's activations of the group within GROUP_BYTES).
"""

import numpy as np

from ..backend import MemberUpdate
from ..nn.packed import PackedNetwork
from ..optim import Optimizer

# A group's activations per layer (B rows x its members x the widest layer): within the
# caches, a step's layers pass each other their outputs there. Measured at K = 16 (2-core
# Xeon, 2026-11-30, single-threaded BLAS under load, seconds per epoch): on
# [64,64,64,64,64,16] at batch 4096 (1 MiB a member) groups of 1, 2, 4, 8, 16 members took
# 0.41, 0.33, 0.31, 0.34, 0.43; on [784,128,10] at batch 64 (32 KiB a member) 0.32, 0.25,
# 0.20, 0.21, 0.18: the wide first layer gains with every member while the others fit.
GROUP_BYTES = 4 << 20


class PackTrainer:
    """A PackedNetwork and K optimizers of one class (SGD, Adam or AdamW objects: their
    hyperparameters, read again by ``refresh`` where a callback may have changed them,
    and their state and step counts, taken in and given back with ``load_state`` /
    ``store_state``); ``frozen`` members (stopped) are updated no more."""

    def __init__(self, net, optimizers, frozen=None):
        self.net, self.optimizers, self.rule = net, list(optimizers), check_one_rule(optimizers)
        be, K = net.backend, net.members
        # every member's state buffers (SGD keeps momentum only where it has momentum; a member
        # without reads none of it)
        self.state_names = tuple(dict.fromkeys(n for o in optimizers for n in o.state_names))
        self.state = tuple(be.zeros(net.flat.shape, net.dtype) for _ in self.state_names)
        self.scratch = tuple(be.empty(net.flat.shape, net.dtype) for _ in range(be.update_scratch(self.rule, net.dtype)))
        self.steps = be.zeros((K,), np.uint32)
        self.flagged = be.zeros((K,), np.uint32)  # this step's gradients not finite: skip the member's update
        self.overflowed = be.zeros((K,), np.uint32)  # its parameters not finite after the update
        self.scratch_steps = be.empty((1,), np.uint32)
        self.frozen = np.zeros(K, bool) if frozen is None else np.array(frozen, bool)
        self.hyper = None
        self.refresh()
        self.load_state()

    def refresh(self):
        """The members' hyperparameters for the update, made again only where they changed
        (a callback's schedule sets an optimizer's lr)."""
        settings = self.settings()
        if self.hyper is None or settings != self.hyper.settings:
            self.hyper = self.net.backend.prepare_members(self.rule, self.net.blocks, settings, self.net.dtype)

    def settings(self):
        """Per member, per block: the hyperparameters its update runs with (a bias block
        without the L2 term where the optimizer spares biases, as Optimizer.step does)."""
        out = []
        for o in self.optimizers:
            h = o.settings()
            spared = h._replace(weight_decay=0.0) if o.spares_biases else h
            out.append([h if blk.weight else spared for blk in self.net.blocks])
        return out

    def step(self, ws, running, X, T, W=None):
        """One step of every member on the batch of rows ws.index of (X, T), each member
        weighting them by its row of W (K, n) (None: unweighted)."""
        net, be = self.net, self.net.backend
        be.gather_rows(X, ws.index, ws.x)
        be.gather_rows(T, ws.index, ws.target)
        ws.weighted = W is not None
        if ws.weighted:
            for k in range(net.members):
                be.gather_rows(W[k], ws.index, ws.weight[k])
                be.sum(ws.weight[k], ws.weight_sum[k:k + 1].reshape(()))
        net.forward_pass(ws)
        net.compute_loss(ws, running)
        net.backward_pass(ws)
        be.flag_nonfinite_members(net.grads, net.blocks, self.flagged)
        for k in np.flatnonzero(self.frozen):
            self.flagged[k:k + 1].fill(1)
        self.overflowed.fill(0)
        update = MemberUpdate(net.flat, net.grads, self.state, self.scratch, tuple(net.blocks), self.steps,
                              self.flagged, self.overflowed, self.scratch_steps)
        be.optimizer_update_members(self.rule, update, self.hyper)

    def poll(self):
        """[(member, step, overflowed)] of each member this step flagged, frozen from now
        on: the step its gradients went non-finite (its update skipped), or the step whose
        update overflowed its parameters (``overflowed``), as the lone guard counts them."""
        be = self.net.backend
        flagged, overflowed, steps = (np.asarray(be.to_host(f)) for f in (self.flagged, self.overflowed, self.steps))
        stopped = []  # the flags are this step's: read after every step
        for k in np.flatnonzero((flagged | overflowed) & ~self.frozen):
            overflow_alone = bool(overflowed[k] and not flagged[k])
            stopped.append((int(k), int(steps[k]) if overflow_alone else int(steps[k]) + 1, overflow_alone))
            self.frozen[k] = True
        return stopped

    # ---- the optimizers' own state, in and out ------------------------------------------
    def load_state(self):
        """Each optimizer's state and step count (lone layout) into the pack's buffers."""
        net = self.net
        for i, name in enumerate(self.state_names):
            net.load(np.stack([_host_state(o, name, net) for o in self.optimizers]), self.state[i])
        for o in self.optimizers:
            o.sync_steps()
        net.backend.xp.copyto(self.steps, net.backend.asarray(np.array([o.steps for o in self.optimizers], np.uint32)))

    def store_state(self):
        """The pack's state and step counts back into each optimizer, as its own after
        as many lone steps."""
        steps = np.asarray(self.net.backend.to_host(self.steps))
        states = [self.net.to_members(s) for s in self.state]
        for k, o in enumerate(self.optimizers):
            o.state = {name: state[k].copy() for name, state in zip(self.state_names, states) if name in o.state_names}
            o.steps = int(steps[k])
            o.device_steps = None  # bind() makes it anew from steps
            if o.bound is not None:  # its buffers for a step without a model: the new ones
                o.bind(o.bound)


def check_one_rule(optimizers):
    """The one optimizer class of every member (a pack's update is one rule's loop)."""
    rules = {type(o) for o in optimizers}
    if len(rules) != 1 or not all(isinstance(o, Optimizer) for o in optimizers):
        raise TypeError(f"batches='shared' updates every member by one rule: give every member an optimizer of one "
                        f"class (got {sorted(r.__name__ for r in rules)}), or use batches='own'")
    return rules.pop()


def _host_state(optimizer, name, net):
    """An optimizer's state buffer ``name`` on the host, or zeros where it has none yet."""
    buf = optimizer.state.get(name)
    if buf is None:
        return np.zeros(net.n_params, net.dtype)
    buf = np.asarray(net.backend.to_host(buf), net.dtype)
    if buf.shape != (net.n_params,):
        raise ValueError(f"{optimizer!r} holds state for {buf.shape[0]} parameters, a member has {net.n_params}")
    return buf


def member_groups(members, batch, sizes, dtype, cpu=True):
    """The slices of members SharedBatches trains as one PackedNetwork each: on a GPU
    (``cpu`` False) all of them, the wider the better."""
    if not cpu:
        return [slice(0, members)]
    per_member = batch * max(sizes[1:]) * np.dtype(dtype).itemsize
    size = int(max(1, min(members, GROUP_BYTES // per_member)))
    return [slice(start, min(start + size, members)) for start in range(0, members, size)]


class SharedBatches:
    """A pack's members (K MLPs ``models`` and their ``optimizers``) stepping on the same
    batches, in groups of PackTrainers (``member_groups``); the models' parameters and
    optimizers hold the members' state between fits (``sync``, ``store_state``)."""

    def __init__(self, models, optimizers, batch, frozen):
        lead, self.models = models[0], models
        check_one_rule(optimizers)
        self.groups = [(g, PackTrainer(PackedNetwork(lead.backend, lead.sizes, lead.act, lead.criterion, lead.dtype,
                                                     g.stop - g.start), optimizers[g], frozen[g]))
                       for g in member_groups(len(models), batch, lead.sizes, lead.dtype, lead.backend.name == "cpu")]
        params = np.stack([lead.backend.to_host(m.params) for m in models])
        for g, trainer in self.groups:
            trainer.net.load(params[g])

    def step(self, rows, running, X, T, W=None):
        """Every member's step on the batch of ``rows`` (a device index vector) of (X, T);
        running[k] gains member k's [loss * rows (or * its weights' sum), hits]."""
        for g, trainer in self.groups:
            ws = trainer.net.workspace(rows.shape[0])
            trainer.net.backend.xp.copyto(ws.index, rows)
            trainer.step(ws, running[g], X, T, None if W is None else W[g])

    def flagged(self):
        """[(member, step, overflowed)] of the members newly stopped (PackTrainer.poll)."""
        return [(g.start + k, step, overflowed) for g, trainer in self.groups for k, step, overflowed in trainer.poll()]

    def freeze(self, k):
        """Member k is updated no more (its callbacks stopped it)."""
        for g, trainer in self.groups:
            if g.start <= k < g.stop:
                trainer.frozen[k - g.start] = True

    def refresh(self):
        """The members' hyperparameters read again (after callbacks)."""
        for _, trainer in self.groups:
            trainer.refresh()

    def sync(self):
        """The members' parameters into their models, and their optimizers' state and
        step counts into the optimizers: each member as after its lone fit's steps."""
        for g, trainer in self.groups:
            for model, row in zip(self.models[g], trainer.net.to_members()):
                model.parameters.assign(row)
            trainer.store_state()
