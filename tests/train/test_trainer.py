"""train_step and fit run one step, the Trainer's: the divergence guard and
clip_norm act in both, and train_step captures graphs as fit does."""

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.train.trainer import Trainer

from ..helpers import assert_same_params, params_of, random_batch


def fit_one_step(model, X, y, optimizer, **kw):
    """fit over one full, unshuffled batch: exactly one step on (X, y)."""
    model.fit(X, y, epochs=1, batch_size=len(X), shuffle=False, optimizer=optimizer, progress=False, **kw)


@pytest.mark.parametrize("opt", [gb.optim.SGD(0.5, momentum=0.9), gb.optim.Adam(1e-2)], ids=repr)
def test_train_step_clips_as_fit_does(opt, rng):
    X, y = random_batch(rng, [6, 9, 3], "cross_entropy", 17)
    stepped, fitted, unclipped = (gb.MLP([6, 9, 3], seed=2, dtype="float64") for _ in range(3))
    stepped.train_step(X, y, gb.optim.from_state_dict(opt.state_dict()), clip_norm=0.05)
    fit_one_step(fitted, X, y, gb.optim.from_state_dict(opt.state_dict()), clip_norm=0.05)
    unclipped.train_step(X, y, gb.optim.from_state_dict(opt.state_dict()))
    assert_same_params(params_of(stepped), params_of(fitted))
    clipped, free = params_of(stepped), params_of(unclipped)
    assert any(not np.array_equal(clipped[k], free[k]) for k in free)


def test_clip_norm_scales_the_update_to_the_norm(rng):
    """With SGD(lr), a clipped step moves the parameters by lr * clip_norm in L2."""
    X, y = random_batch(rng, [6, 9, 3], "cross_entropy", 17)
    model = gb.MLP([6, 9, 3], seed=2, dtype="float64")
    before = np.concatenate([p.ravel() for p in params_of(model).values()])
    model.train_step(X, y, gb.optim.SGD(1.0), clip_norm=1e-3)
    after = np.concatenate([p.ravel() for p in params_of(model).values()])
    assert np.linalg.norm(after - before) == pytest.approx(1e-3, rel=1e-5)


def overflowing(seed=0):
    """A float32 model whose first layer overflows to Inf: its gradients are not finite."""
    model = gb.MLP([4, 5, 3], seed=seed)
    state = model.state_dict()
    state["layers.0.weight"][:] = 3e38
    model.load_state_dict(state)
    return model


@pytest.mark.filterwarnings("ignore::RuntimeWarning:numpy")  # the overflow itself
@pytest.mark.parametrize("how", ["train_step", "fit"])
def test_the_guard_skips_and_raises_in_train_step_as_in_fit(how, rng):
    X, y = random_batch(rng, [4, 5, 3], "cross_entropy", 8)
    model, opt = overflowing(), gb.optim.SGD(0.1)
    before = params_of(model)
    with pytest.raises(FloatingPointError, match=r"non-finite gradients .* the first at step 1"):
        if how == "fit":
            fit_one_step(model, X, y, opt)
        else:
            model.train_step(X, y, opt)
    assert_same_params(params_of(model), before)  # the step was skipped whole
    opt.sync_steps()
    assert opt.steps == 0  # and not counted


@pytest.mark.filterwarnings("ignore::RuntimeWarning:numpy")
def test_train_step_on_nonfinite_skip_warns_and_goes_on(rng):
    X, y = random_batch(rng, [4, 5, 3], "cross_entropy", 8)
    model, opt = overflowing(), gb.optim.SGD(0.1)
    before = params_of(model)
    with pytest.warns(RuntimeWarning, match="their updates were skipped"):
        model.train_step(X, y, opt, on_nonfinite="skip")
    assert_same_params(params_of(model), before)
    with pytest.raises(ValueError, match="'restore' needs fit's checkpoints"):
        model.train_step(X, y, opt, on_nonfinite="restore")


def test_train_step_captures_graphs_and_equals_eager_steps(kernel_backend, rng):
    """The second train_step on the same buffers is captured, later ones are graph
    launches: the numbers equal a run with no graphs, and the steps are counted."""
    X, y = random_batch(rng, [9, 33, 3], "cross_entropy", 20)
    runs = []
    for graphs in (True, False):
        model, opt = gb.MLP([9, 33, 3], seed=3, device=kernel_backend), gb.optim.Adam(3e-3)
        trainer = Trainer(model, opt, graphs=graphs)
        with model.context():
            losses = [float(trainer.step(model.load_batch(X, y))) for _ in range(4)]
        runs.append((losses, params_of(model), opt.steps, trainer.graphs))
    (lg, pg, sg, graphs), (le, pe, se, none) = runs
    assert lg == le and sg == se == 4
    assert_same_params(pg, pe)
    assert none is None and len(graphs.captured()) == 1


def test_train_step_switching_between_weighted_and_unweighted_batches_replays_each_as_it_is(kernel_backend, rng):
    """The weighting is chosen in Python, outside a replayed graph: each kind of step is
    captured on its own, and every step's loss is the one an uncaptured step gives."""
    X, y = random_batch(rng, [9, 33, 3], "cross_entropy", 20)
    w = rng.random(20)
    order = [w, w, w, None, None, None, w, None]
    runs = []
    for graphs in (True, False):
        model, opt = gb.MLP([9, 33, 3], seed=3, device=kernel_backend), gb.optim.SGD(0.1)
        model.train_step(X, y, opt)  # the same start for both runs
        runs.append([model.train_step(X, y, opt, sample_weight=weights) if graphs else
                     float(Trainer(model, opt, graphs=False).step(model.load_batch(X, y, weights)))
                     for weights in order])
    assert runs[0] == runs[1]


def test_train_step_keeps_its_trainer_and_its_captured_steps(kernel_backend, rng):
    X, y = random_batch(rng, [5, 7, 2], "cross_entropy", 12)
    model, opt = gb.MLP([5, 7, 2], seed=0, device=kernel_backend), gb.optim.SGD(0.1)
    for _ in range(3):
        model.train_step(X, y, opt)
    [graphs] = model.workspaces.users
    assert len(graphs.captured()) == 1 and opt.steps == 3


def test_fit_names_an_unknown_setting(rng):
    X, y = random_batch(rng, [4, 5, 3], "cross_entropy", 8)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['epoch'\]; its settings are \['epochs'"):
        gb.MLP([4, 5, 3]).fit(X, y, epoch=3)


def test_a_trained_model_is_freed_without_the_garbage_collector(rng):
    """No reference cycle through the model (its trainer, its optimizer, its
    workspaces): dropping the last reference frees it, and on a GPU its memory,
    at once."""
    import gc
    import weakref

    X, y = random_batch(rng, [5, 7, 3], "cross_entropy", 40)
    gc.disable()
    try:
        model, opt = gb.MLP([5, 7, 3], seed=0), gb.optim.Adam()
        model.fit(X, y, epochs=2, batch_size=8, optimizer=opt, progress=False)
        model.train_step(X[:8], y[:8], opt)
        alive = weakref.ref(model)
        del model
        assert alive() is None
    finally:
        gc.enable()
