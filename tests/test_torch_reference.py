"""Gradients and optimizer steps against PyTorch autograd and torch.optim (float64)."""

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.nn.activations import ACTIVATIONS
from gpubackprop.nn.losses import LOSSES

from .helpers import random_batch

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch



def torch_activation(name):
    """PyTorch's module for our activation, as the activation table names it."""
    module, kwargs = ACTIVATIONS[name].torch
    return getattr(torch.nn, module)(**kwargs)


def torch_twin(model):
    """An nn.Sequential holding ``model``'s parameters, in float64."""
    layers = []
    L = len(model.sizes) - 1
    for i, (n_in, n_out) in enumerate(zip(model.sizes[:-1], model.sizes[1:])):
        layers.append(torch.nn.Linear(n_in, n_out).double())
        if i < L - 1:
            layers.append(torch_activation(model.activation))
    net = torch.nn.Sequential(*layers)
    net.load_state_dict({k: torch.from_numpy(v.astype(np.float64)) for k, v in _sequential_names(model).items()})
    return net


def _sequential_names(model):
    """state_dict names of ours -> nn.Sequential's (Linear layers sit at even indices)."""
    return {f"{2 * i}.{kind}": v for name, v in model.state_dict().items()
            for i, kind in [(int(name.split(".")[1]), name.split(".")[2])]}


def torch_loss(model, out, y, sample_weight=None):
    """PyTorch's loss of the loss table's row (huber with the model's delta); with
    sample weights, the weighted mean of its per-row losses (reduction="none")."""
    module, kwargs = model.criterion.torch
    if model.loss == "huber":
        kwargs = dict(kwargs, delta=model.criterion.delta)
    if sample_weight is None:
        return getattr(torch.nn, module)(**kwargs)(out, torch.from_numpy(y))
    per_element = getattr(torch.nn, module)(reduction="none", **kwargs)(out, torch.from_numpy(y))
    rows = per_element if per_element.ndim == 1 else per_element.mean(dim=1)
    w = torch.from_numpy(np.asarray(sample_weight, np.float64))
    return (rows * w).sum() / w.sum()


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_gradients_match_autograd(act, loss, rng):
    model = gb.MLP([9, 8, 7, 4], activation=act, loss=loss, dtype="float64", seed=1,
                   **({"huber_delta": 0.3} if loss == "huber" else {}))  # 0.3: both of huber's parts in play
    assert_matches_autograd(model, *random_batch(rng, model.sizes, loss, 13))


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_weighted_gradients_match_autograd(loss, rng):
    """sample_weight: the weighted mean of PyTorch's per-row losses, zero weights included."""
    model = gb.MLP([9, 8, 4], activation="tanh", loss=loss, dtype="float64", seed=1)
    X, y = random_batch(rng, model.sizes, loss, 13)
    w = rng.random(13) * 3
    w[[2, 5]] = 0.0
    assert_matches_autograd(model, X, y, w)


def assert_matches_autograd(model, X, y, sample_weight=None):
    value, grads = model.loss_and_grad(X, y, sample_weight)
    net = torch_twin(model)
    t_loss = torch_loss(model, net(torch.from_numpy(X)), y, sample_weight)
    t_loss.backward()
    assert value == pytest.approx(t_loss.item(), rel=1e-12)
    for name, p in net.named_parameters():
        i, kind = int(name.split(".")[0]) // 2, name.split(".")[1]
        np.testing.assert_allclose(grads[f"layers.{i}.{kind}"], p.grad.numpy(), rtol=1e-10, atol=1e-13)


# Every row of the optimizer table, with its examples, against torch.optim's class of the same name.
OPTIMIZERS = [(name, h) for name, rule in gb.optim.OPTIMIZERS.items() for h in rule.examples]


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 2e-5)])
@pytest.mark.parametrize("name,hyper", OPTIMIZERS, ids=[f"{n}-{h}" for n, h in OPTIMIZERS])
def test_training_steps_match_torch_optim(name, hyper, dtype, tol, rng):
    model = gb.MLP([6, 10, 5, 3], activation="tanh", dtype=dtype, seed=2)
    net = torch_twin(model)
    if dtype == "float32":
        net = net.float()
    ours = getattr(gb.optim, name)(**hyper)
    theirs = getattr(torch.optim, name)(net.parameters(), **hyper)
    for step in range(6):
        X, y = random_batch(rng, model.sizes, "cross_entropy", 16)
        loss = model.train_step(X, y, ours)
        theirs.zero_grad()
        t_loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(X.astype(dtype))), torch.from_numpy(y))
        t_loss.backward()
        theirs.step()
        assert loss == pytest.approx(t_loss.item(), rel=tol, abs=tol)
    for key, value in _sequential_names(model).items():
        np.testing.assert_allclose(value, net.state_dict()[key].numpy(), rtol=tol, atol=tol)


@pytest.mark.parametrize("name,hyper", [("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.05)),
                                        ("Adam", dict(lr=1e-2, weight_decay=0.05))])
def test_decay_biases_false_is_torchs_parameter_group_without_decay_on_biases(name, hyper, rng):
    model = gb.MLP([6, 10, 5, 3], activation="tanh", dtype="float64", seed=2)
    net = torch_twin(model)
    ours = getattr(gb.optim, name)(**hyper, decay_biases=False)
    weights = [p for n, p in net.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in net.named_parameters() if n.endswith("bias")]
    theirs = getattr(torch.optim, name)([{"params": weights}, {"params": biases, "weight_decay": 0.0}], **hyper)
    for step in range(5):
        X, y = random_batch(rng, model.sizes, "cross_entropy", 16)
        model.train_step(X, y, ours)
        theirs.zero_grad()
        torch.nn.functional.cross_entropy(net(torch.from_numpy(X)), torch.from_numpy(y)).backward()
        theirs.step()
    for key, value in _sequential_names(model).items():
        np.testing.assert_allclose(value, net.state_dict()[key].numpy(), rtol=1e-10, atol=1e-12)
