"""PackedNetwork: a pack's parameters laid out by layer, then member, aligned; one pass
over a shared batch gives each member its lone network's loss and gradients."""

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.nn.packed import ALIGN, PackedNetwork

from ..helpers import random_batch


def packed_twin(models):
    """A PackedNetwork holding ``models``' parameters (K MLPs of one kind)."""
    lead = models[0]
    net = PackedNetwork(lead.backend, lead.sizes, lead.act, lead.criterion, lead.dtype, len(models))
    net.load(np.stack([m.backend.to_host(m.params) for m in models]))
    return net


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_members_parameters_go_in_and_out_unchanged_and_every_block_starts_on_a_cache_line(dtype):
    models = [gb.MLP([7, 5, 3, 2], seed=s, dtype=dtype) for s in range(3)]
    net = packed_twin(models)
    np.testing.assert_array_equal(net.to_members(), np.stack([m.params for m in models]))
    assert net.n_params == models[0].n_params
    for buf in (net.flat, net.grads):
        assert all((buf.ctypes.data + blk.start * buf.itemsize) % ALIGN == 0 for blk in net.blocks)
    first = net.layers[0]  # every member's first layer: one matrix, member after member
    np.testing.assert_array_equal(first.W, np.concatenate([m.state_dict()["layers.0.weight"] for m in models]))


@pytest.mark.parametrize("loss,activation", [("cross_entropy", "relu"), ("mse", "tanh"), ("huber", "gelu")])
@pytest.mark.parametrize("weighted", [False, True])
def test_one_pass_gives_each_member_its_lone_loss_and_gradients(loss, activation, weighted, rng):
    sizes = [6, 9, 5, 4]
    X, y = random_batch(rng, sizes, loss, 11)
    w = rng.random((3, 11)) if weighted else None
    models = [gb.MLP(sizes, activation=activation, loss=loss, dtype="float64", seed=s) for s in range(3)]
    net = packed_twin(models)
    ws = net.workspace(11)
    Xd, T = models[0].prepare(X, y)
    ws.index[...] = np.arange(11)
    ws.x[...], ws.target[...] = Xd, T
    ws.weighted = weighted
    if weighted:
        ws.weight[...], ws.weight_sum[...] = w, w.sum(axis=1)
    running = np.zeros((3, 2))
    net.forward_pass(ws)
    net.compute_loss(ws, running)
    net.backward_pass(ws)
    grads = net.to_members(net.grads)
    for k, model in enumerate(models):
        value, lone = model.loss_and_grad(X, y, sample_weight=None if w is None else w[k])
        np.testing.assert_allclose(ws.loss[k], value, rtol=1e-13)
        flat = np.concatenate([g.ravel() for g in lone.values()])  # state_dict order: the flat layout
        np.testing.assert_allclose(grads[k], flat, rtol=1e-12, atol=1e-14)
