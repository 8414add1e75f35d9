"""Dropout: the mask's statistics and determinism, gradients through a fixed mask
against finite differences, and no dropout outside training."""

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.nn.dropout import Dropout, keep_mask

from ..helpers import random_batch


def spec(rate, layer=1, seed=7):
    return Dropout(rate, seed, np.zeros(1, np.uint32), layer, None)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_masks_keep_one_minus_p_and_differ_by_step_and_layer(rate):
    m = keep_mask(spec(rate), (400, 250), step=3)
    assert abs(m.mean() - (1 - rate)) < 4 * np.sqrt(rate * (1 - rate) / m.size)
    np.testing.assert_array_equal(m, keep_mask(spec(rate), (400, 250), step=3))
    for other in (keep_mask(spec(rate), (400, 250), step=4), keep_mask(spec(rate, layer=2), (400, 250), step=3),
                  keep_mask(spec(rate, seed=8), (400, 250), step=3)):
        assert 0.3 < np.mean(other != m) / (2 * rate * (1 - rate)) < 1.7  # independent draws disagree this often


def test_a_shard_draws_its_rows_of_the_global_batch_mask():
    """Data parallel: rows [r, r + k) of a batch, drawn with offset r * cols, get the
    global batch's mask for those rows, not a copy of its first rows."""
    whole = keep_mask(spec(0.5, layer=1), (40, 7), step=3)
    part = keep_mask(spec(0.5, layer=1)._replace(offset=13 * 7), (10, 7), step=3)
    np.testing.assert_array_equal(part, whole[13:23])
    assert not np.array_equal(part, whole[:10])


def test_rate_zero_keeps_everything():
    assert keep_mask(spec(0.0), (7, 9), step=0).all()


@pytest.mark.parametrize("act", ["relu", "tanh", "gelu"])
def test_gradients_through_a_fixed_mask_match_finite_differences(act, rng):
    """With the step fixed the mask is fixed, so the training loss is an ordinary
    function of the parameters, and backprop through the regenerated mask must be
    its gradient."""
    model = gb.MLP([6, 9, 7, 3], activation=act, dtype="float64", seed=0, dropout=0.4)
    X, y = random_batch(rng, model.sizes, "cross_entropy", 11)
    steps = np.array([5], np.uint32)
    ws = model.load_batch(X, y)

    def loss():
        model.forward_pass(ws, steps)
        return float(model.compute_loss(ws))

    loss()
    model.backward_pass(ws, steps)
    analytic = model.grads.copy()
    assert np.count_nonzero(ws.dropped[1] == 0) > np.count_nonzero(ws.a[1] == 0)  # something was dropped
    p, eps = model.params, 1e-6
    numeric = np.empty_like(p)
    for i in range(p.size):
        saved = p[i]
        p[i] = saved + eps
        up = loss()
        p[i] = saved - eps
        down = loss()
        p[i] = saved
        numeric[i] = (up - down) / (2 * eps)
    if act == "relu":  # a perturbation may cross a kink: compare where it did not
        keep = np.abs(analytic - numeric) < 1e-3
        assert keep.mean() > 0.95
        analytic, numeric = analytic[keep], numeric[keep]
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-8)


def test_no_dropout_outside_training(rng):
    X, y = random_batch(rng, [6, 9, 3], "cross_entropy", 20)
    dropped = gb.MLP([6, 9, 3], seed=0, dropout=0.5)
    plain = gb.MLP([6, 9, 3], seed=0)
    np.testing.assert_array_equal(dropped.predict_proba(X), plain.predict_proba(X))
    assert dropped.evaluate(X, y) == plain.evaluate(X, y)
    assert dropped.loss_and_grad(X, y)[0] == plain.loss_and_grad(X, y)[0]


def test_dropout_changes_training_and_is_reproducible(rng):
    X, y = random_batch(rng, [6, 16, 3], "cross_entropy", 64)
    runs = [gb.MLP([6, 16, 3], seed=0, dropout=d).fit(X, y, epochs=3, progress=False)["loss"] for d in (0.3, 0.3, 0.0)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_dropout_rate_is_checked_and_saved(tmp_path):
    with pytest.raises(ValueError, match=r"dropout must be a rate in \[0, 1\)"):
        gb.MLP([2, 2], dropout=1.0)
    gb.MLP([3, 4, 2], dropout=0.25).save(str(tmp_path / "m.safetensors"))
    assert gb.load(str(tmp_path / "m.safetensors")).dropout == 0.25
