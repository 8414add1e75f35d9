"""gb.trace and ``gpubackprop explain``: one training step with every intermediate,
checked against the textbook's formulas written out unit by unit in float64."""

import math
import re

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop.cli import main

from ..helpers import dense_targets, random_batch

PNG = b"\x89PNG\r\n\x1a\n"

# The network `gpubackprop explain` shows by default (--sizes 4 2 2 1 --seed 0): the
# seed's weights rounded to 2 decimals, biases 0, and x and y drawn by the seed.
W1 = [[0.89, -0.37, 0.44, -0.75], [-0.15, 0.30, -0.89, 0.64]]
W2 = [[-0.57, 0.44], [0.87, -1.00]]
W3 = [[1.16, 1.19]]
X1 = [[0.27, -0.46, -0.92, -0.97]]
Y1 = [[0.81]]

G = {  # g(z) and g'(z) given z and a = g(z)
    "sigmoid": (lambda z: 1.0 / (1.0 + math.exp(-z)), lambda z, a: a * (1.0 - a)),
    "tanh": (math.tanh, lambda z, a: 1.0 - a * a),
    "relu": (lambda z: max(z, 0.0), lambda z, a: 1.0 if z > 0 else 0.0),
    "leaky_relu": (lambda z: z if z > 0 else 0.01 * z, lambda z, a: 1.0 if z > 0 else 0.01),
    "identity": (lambda z: z, lambda z, a: 1.0),
}


# The element-wise losses by the textbook: (f(o, t), df/do), huber with delta 1.
ELEMENTWISE = {
    "mse": (lambda o, t: (o - t) ** 2, lambda o, t: 2.0 * (o - t)),
    # -[t log p + (1 - t) log(1 - p)], p = 1 / (1 + e^-o), as log(1 + e^o) - t o: log(1 - p) loses digits near p = 1
    "binary_cross_entropy": (lambda o, t: math.log1p(math.exp(o)) - t * o, lambda o, t: 1 / (1 + math.exp(-o)) - t),
    "huber": (lambda o, t: (o - t) ** 2 / 2 if abs(o - t) <= 1 else abs(o - t) - 0.5, lambda o, t: max(-1.0, min(1.0, o - t))),
    "mae": (lambda o, t: abs(o - t), lambda o, t: math.copysign(1.0, o - t) if o != t else 0.0),
    "poisson": (lambda o, t: math.exp(o) - t * o, lambda o, t: math.exp(o) - t),
}


def reference_step(Ws, bs, X, Y, activation, loss, lr):
    """One SGD step by the textbook, in Python floats: z, a, delta per sample and
    layer (index [i][l], l = 0 the input), dW, db, the loss and the new parameters.
    Y holds target rows (one-hot for cross entropy)."""
    g, g_prime = G[activation]
    L, B, n_out = len(Ws), len(X), len(Y[0])
    z, a, delta = ([[None] * (L + 1) for _ in X] for _ in range(3))
    loss_value = 0.0
    for i in range(B):
        a[i][0] = [float(v) for v in X[i]]
        for l in range(1, L + 1):
            W, b = Ws[l - 1], bs[l - 1]
            z[i][l] = [sum(W[j][k] * a[i][l - 1][k] for k in range(len(W[j]))) + b[j] for j in range(len(W))]
            a[i][l] = [g(v) for v in z[i][l]] if l < L else list(z[i][l])
        out = a[i][L]
        if loss in ELEMENTWISE:
            f, f_prime = ELEMENTWISE[loss]
            loss_value += sum(f(o, t) for o, t in zip(out, Y[i])) / (B * n_out)
            delta[i][L] = [f_prime(o, t) / (B * n_out) for o, t in zip(out, Y[i])]
        else:
            e = [math.exp(o - max(out)) for o in out]
            q = [v / sum(e) for v in e]
            loss_value -= sum(t * math.log(p) for t, p in zip(Y[i], q)) / B
            delta[i][L] = [(p - t) / B for p, t in zip(q, Y[i])]
        for l in range(L - 1, 0, -1):
            W_next = Ws[l]
            delta[i][l] = [sum(W_next[j][k] * delta[i][l + 1][j] for j in range(len(W_next)))
                           * g_prime(z[i][l][k], a[i][l][k]) for k in range(len(z[i][l]))]
    dW, db, W_new, b_new = [None], [None], [None], [None]
    for l in range(1, L + 1):
        W, b = Ws[l - 1], bs[l - 1]
        dW.append([[sum(delta[i][l][j] * a[i][l - 1][k] for i in range(B)) for k in range(len(W[0]))]
                   for j in range(len(W))])
        db.append([sum(delta[i][l][j] for i in range(B)) for j in range(len(W))])
        W_new.append([[W[j][k] - lr * dW[l][j][k] for k in range(len(W[0]))] for j in range(len(W))])
        b_new.append([b[j] - lr * db[l][j] for j in range(len(W))])
    return {"z": z, "a": a, "delta": delta, "dW": dW, "db": db, "W_new": W_new, "b_new": b_new, "loss": loss_value}


def model_with(Ws, bs, activation="sigmoid", loss="mse", device="cpu", dtype="float64"):
    sizes = [len(Ws[0][0])] + [len(W) for W in Ws]
    model = gb.MLP(sizes, activation=activation, loss=loss, device=device, dtype=dtype)
    state = {}
    for l, (W, b) in enumerate(zip(Ws, bs)):
        state[f"layers.{l}.weight"], state[f"layers.{l}.bias"] = np.array(W, float), np.array(b, float)
    model.load_state_dict(state)
    return model


def assert_matches(t, ref, tol=1e-12):
    close = dict(rtol=0, atol=tol)
    L = len(t.layers) - 1
    assert t.loss == pytest.approx(ref["loss"], abs=tol)
    np.testing.assert_allclose(t.layers[0].a, [ref["a"][i][0] for i in range(len(ref["a"]))], **close)
    for l in range(1, L + 1):
        for name in ("z", "a", "delta"):
            expected = [ref[name][i][l] for i in range(len(ref[name]))]
            np.testing.assert_allclose(getattr(t.layers[l], name), expected, err_msg=f"{name}^({l})", **close)
        for name in ("dW", "db", "W_new", "b_new"):
            np.testing.assert_allclose(getattr(t.layers[l], name), ref[name][l], err_msg=f"{name}^({l})", **close)


def random_params(rng, sizes):
    Ws = [rng.uniform(-1, 1, (o, i)).round(2).tolist() for i, o in zip(sizes[:-1], sizes[1:])]
    bs = [rng.uniform(-0.5, 0.5, o).round(2).tolist() for o in sizes[1:]]
    return Ws, bs


# ---- the numbers -------------------------------------------------------------------------
def test_the_4_2_2_1_step_matches_the_textbook_by_hand():
    model = model_with([W1, W2, W3], [[0, 0], [0, 0], [0]])
    t = gb.trace(model, X1, Y1)
    assert_matches(t, reference_step([W1, W2, W3], [[0, 0], [0, 0], [0]], X1, Y1, "sigmoid", "mse", 0.1))
    # Two numbers worked on paper: z^(1)_1 = 0.89 * 0.27 - 0.37 * -0.46 + 0.44 * -0.92 - 0.75 * -0.97,
    # and the output's delta^(3)_1 = 2 (a^(3)_1 - y_1) with a^(3)_1 = 1.16 a^(2)_1 + 1.19 a^(2)_2.
    assert t.layers[1].z[0, 0] == pytest.approx(0.7332, abs=1e-15)
    a2 = t.layers[2].a[0]
    assert t.layers[3].delta[0, 0] == pytest.approx(2 * (1.16 * a2[0] + 1.19 * a2[1] - 0.81), abs=1e-15)
    assert t.sizes == [4, 2, 2, 1]


@pytest.mark.parametrize("sizes, activation, loss, batch", [
    ([4, 2, 2, 1], "sigmoid", "mse", 3),
    ([5, 8, 6, 3], "relu", "cross_entropy", 4),
    ([3, 7, 4], "leaky_relu", "cross_entropy", 1),
    ([3, 5, 5, 2], "tanh", "mse", 2),
    ([2, 3, 2], "identity", "mse", 5),
    ([3, 4, 2], "tanh", "binary_cross_entropy", 3),
    ([3, 4, 2], "tanh", "huber", 3),
    ([3, 4, 2], "sigmoid", "mae", 2),
    ([3, 4, 2], "tanh", "poisson", 3),
])
def test_every_intermediate_matches_the_textbook(rng, sizes, activation, loss, batch):
    Ws, bs = random_params(rng, sizes)
    X, y = random_batch(rng, sizes, loss, batch)
    t = gb.trace(model_with(Ws, bs, activation, loss), X, y, gb.optim.SGD(0.05))
    assert_matches(t, reference_step(Ws, bs, X, dense_targets(y, loss, sizes[-1]), activation, loss, 0.05))
    np.testing.assert_array_equal(t.y, dense_targets(y, loss, sizes[-1]))
    if loss == "cross_entropy":
        np.testing.assert_allclose(t.q.sum(axis=1), 1.0)
    L = len(sizes) - 1
    loss_formula, delta_formula = (f.format(a=f"a^({L})", n=f"n_{L}", d="1") for f in gb.nn.losses.LOSSES[loss].formula)
    assert loss_formula in t.to_text() and f"delta^({L}) = dL/dz^({L}) = {delta_formula}" in t.to_text()


@pytest.mark.parametrize("activation, loss", [("relu", "cross_entropy"), ("gelu", "mse"), ("sigmoid", "mse")])
def test_the_trace_is_a_train_step(rng, activation, loss):
    """Its gradients are loss_and_grad's and its update is train_step's, bit for bit,
    and it leaves the model and the optimizer where train_step would."""
    sizes = [6, 9, 5, 3]
    X, y = random_batch(rng, sizes, loss, 7)
    traced, stepped, graded = (gb.MLP(sizes, activation, loss, dtype="float64", seed=3) for _ in range(3))
    _, grads = graded.loss_and_grad(X, y)
    adam = gb.optim.Adam(0.01)
    t = gb.trace(traced, X, y, adam)
    loss_value = stepped.train_step(X, y, gb.optim.Adam(0.01))
    assert t.loss == loss_value
    for name, value in graded.state_dict().items():
        np.testing.assert_array_equal(t.params_before[name], value, err_msg=name)
    for l in range(1, len(sizes)):
        np.testing.assert_array_equal(t.layers[l].dW, grads[f"layers.{l - 1}.weight"])
        np.testing.assert_array_equal(t.layers[l].db, grads[f"layers.{l - 1}.bias"])
    for name, value in stepped.state_dict().items():
        np.testing.assert_array_equal(t.params_after[name], value, err_msg=name)
        np.testing.assert_array_equal(traced.state_dict()[name], value, err_msg=name)
    assert adam.steps == 1
    for l in range(1, len(sizes)):  # z, formed on the side, is the GEMM plus the bias
        np.testing.assert_allclose(t.layers[l].z, t.layers[l - 1].a @ t.layers[l].W.T + t.layers[l].b, atol=1e-14)


def test_a_float32_trace_is_close_to_the_float64_one():
    t32 = gb.trace(model_with([W1, W2, W3], [[0, 0], [0, 0], [0]], dtype="float32"), X1, Y1)
    ref = reference_step([W1, W2, W3], [[0, 0], [0, 0], [0]], X1, Y1, "sigmoid", "mse", 0.1)
    assert t32.layers[3].dW.dtype == np.float32
    assert_matches(t32, ref, tol=1e-6)


def test_the_kernels_trace_the_same_step(kernel_backend, rng):
    """The CUDA backend's code path (its kernels through the host harness, and on a
    GPU where there is one) gives the CPU's numbers."""
    sizes = [5, 8, 6, 3]
    Ws, bs = random_params(rng, sizes)
    X, y = random_batch(rng, sizes, "cross_entropy", 4)
    cpu = gb.trace(model_with(Ws, bs, "relu", "cross_entropy"), X, y)
    kernels = gb.trace(model_with(Ws, bs, "relu", "cross_entropy", device=kernel_backend), X, y)
    for l, (a, b) in enumerate(zip(cpu.layers, kernels.layers)):
        for name in ("z", "a", "delta", "dW", "db", "W_new", "b_new"):
            if getattr(a, name) is not None:
                np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=0, atol=1e-12,
                                           err_msg=f"{name}^({l})")
    assert kernels.loss == pytest.approx(cpu.loss, abs=1e-12)


def test_bad_input_is_refused_by_the_models_own_checks():
    model = gb.MLP([4, 2, 1], loss="mse")
    with pytest.raises(ValueError, match="X has 3 features but the model's input size is 4"):
        gb.trace(model, np.zeros((1, 3)), [[0.0]])
    with pytest.raises(TypeError, match="optimizer must be"):
        gb.trace(model, np.zeros((1, 4)), [[0.0]], optimizer="sgd")
    with pytest.raises(ValueError, match="dropout"):
        gb.trace(gb.MLP([4, 2, 1], loss="mse", dropout=0.5), np.zeros((1, 4)), [[0.0]])


# ---- the reports -------------------------------------------------------------------------
def default_trace():
    return gb.trace(model_with([W1, W2, W3], [[0, 0], [0, 0], [0]]), X1, Y1)


def test_text_shows_every_number_in_the_textbooks_notation():
    t = default_trace()
    text = t.to_text()
    ref = reference_step([W1, W2, W3], [[0, 0], [0, 0], [0]], X1, Y1, "sigmoid", "mse", 0.1)

    def row(name, *values):
        cells = r"\s+".join(re.escape(f"{v:.6g}") for v in values)
        assert re.search(rf"^  {re.escape(name)}\s+{cells}$", text, re.M), f"no row {name} {values} in\n{text}"

    row("a^(0)_1 = x_1", 0.27)
    row("z^(1)_1", 0.7332)
    for l in (1, 2, 3):
        for j, (z, a, d) in enumerate(zip(ref["z"][0][l], ref["a"][0][l], ref["delta"][0][l]), 1):
            row(f"z^({l})_{j}", z)
            row(f"a^({l})_{j}", a)
            row(f"delta^({l})_{j}", d)
        W = [W1, W2, W3][l - 1]
        for j in range(len(W)):
            for k in range(len(W[0])):
                row(f"w^({l})_{{{j + 1},{k + 1}}}", W[j][k], ref["dW"][l][j][k], ref["W_new"][l][j][k])
            row(f"b^({l})_{j + 1}", 0, ref["db"][l][j], ref["b_new"][l][j])
    row("L (batch mean)", ref["loss"])
    assert "after = before - 0.1 gradient" in text and "g' = a (1 - a)" in text


def test_markdown_holds_the_same_tables():
    md = default_trace().to_markdown()
    assert "| $z^{(1)}_{1}$ | 0.7332 |" in md
    assert "| $w^{(1)}_{1,1}$ | 0.89 | 0.00381771 | 0.889618 |" in md
    assert "| $\\delta^{(3)}_{1}$ | 0.684977 |" in md
    assert md.count("|:--|") == 4  # forward, loss, backward, update


def test_large_batches_show_their_first_samples(rng):
    X, y = random_batch(rng, [3, 4, 2], "cross_entropy", 9)
    text = gb.trace(gb.MLP([3, 4, 2], dtype="float64", seed=0), X, y).to_text()
    assert "9 samples (the first 4 shown)" in text and "sample 4" in text and "sample 5" not in text


def test_plot_writes_a_png(tmp_path, rng):
    pytest.importorskip("matplotlib")
    default_trace().plot(tmp_path / "step.png")
    assert (tmp_path / "step.png").read_bytes().startswith(PNG)
    X, y = random_batch(rng, [20, 30, 10], "cross_entropy", 2)  # too many to label: just the shape
    gb.trace(gb.MLP([20, 30, 10], seed=0), X, y).plot(tmp_path / "big.png")
    assert (tmp_path / "big.png").read_bytes().startswith(PNG)


# ---- gpubackprop explain ----------------------------------------------------------------
def test_explain_prints_the_worked_4_2_2_1_step(capsys):
    assert main(["explain", "--sizes", "4", "2", "2", "1", "--seed", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out == default_trace().to_text()  # the network and the numbers written out above
    assert out.startswith("One training step of MLP([4, 2, 2, 1], activation='sigmoid', loss='mse', device='cpu', "
                          "dtype='float64'")


def test_explain_markdown_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "step.png"
    assert main(["explain", "--device", "cpu", "--format", "markdown", "--png", str(png),
                 "--sizes", "3", "4", "2", "--loss", "cross_entropy", "--activation", "relu", "--samples", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("**One training step of MLP([3, 4, 2], activation='relu'")
    assert "sample 2" in captured.out and "$q_{2}$" in captured.out
    assert png.read_bytes().startswith(PNG) and f"wrote {png}" in captured.err


@pytest.mark.parametrize("args, message", [
    (["--sizes", "4"], "sizes needs at least an input and an output size"),
    (["--sizes", "4", "0", "1"], "every layer size must be >= 1"),
    (["--sizes", "100", "20", "1"], "explain prints every weight: --sizes 100 20 1 has 2041 parameters"),
    (["--loss", "cross_entropy"], "cross_entropy needs at least 2 output units"),
    (["--samples", "0"], "--samples must be >= 1"),
    (["--lr", "-1"], "lr must be in"),
    (["--device", "tpu"], "unknown device 'tpu'"),
])
def test_explain_bad_input_exits_2_with_a_message(capsys, args, message):
    assert main(["explain", "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpubackprop: error: ") and message in err and "Traceback" not in err


def test_explain_usage_errors_exit_2(capsys):
    assert main(["explain", "--sizes", "four"]) == 2
    assert main(["explain", "--activation", "softplus"]) == 2
    assert "invalid choice" in capsys.readouterr().err
