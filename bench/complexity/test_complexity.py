"""The cost study of issue 8 (complexity.py): its methods agree, its fits are right,
and the script runs end to end. Fast: tiny networks only.

    pytest bench/complexity                      bodies once (pyproject: --benchmark-disable)
    pytest bench/complexity --benchmark-enable   each method timed by pytest-benchmark at n = 8
"""

import json
import math
import types

import numpy as np
import pytest

from bench.complexity import complexity as cx
from gpubackprop.nn.parameters import layout, names

BENCH_N = 8


@pytest.fixture(scope="module", params=[3, 4])
def problem(request):
    return cx.Problem(request.param)


def test_the_network_has_n_cubed_plus_n_squared_parameters():
    prob = cx.Problem(5)
    assert prob.model.sizes == [5] * 6 and prob.P == cx.n_params(5) == 5 ** 3 + 5 ** 2
    assert [t[0] for t in prob.targets()] == list(range(prob.P))  # every parameter once, in the flat layout


@pytest.mark.parametrize("method", cx.PER_PARAMETER)
def test_every_method_agrees_with_backprop(problem, method):
    reference = problem.backprop_grad()
    grad = cx.full_gradient(problem, method)()
    assert np.all(grad != 0)  # tanh and a random target: no parameter without effect
    err = cx.agreement(problem, grad, reference)
    assert err <= cx.tolerance(method)
    if method != "finite_diff":
        assert err < 1e-13
    np.testing.assert_allclose(grad, reference, rtol=1e-5 if method == "finite_diff" else 1e-12, atol=1e-12)


def test_the_methods_agree_with_each_other(problem):
    grads = [cx.full_gradient(problem, m)() for m in cx.PER_PARAMETER] + [cx.path_grad(problem)[0]]
    for g in grads[1:]:
        np.testing.assert_allclose(g, grads[0], rtol=1e-5, atol=1e-11)


def test_the_backprop_reference_is_the_public_gradient(problem):
    _, named = problem.model.loss_and_grad(problem.x[None, :], problem.y[None, :])
    flat = np.concatenate([np.concatenate([named[w].ravel(), named[b]]) for w, b in names(problem.model.sizes)])
    np.testing.assert_array_equal(flat, problem.backprop_grad())


def test_paths_are_counted_and_summed(problem):
    n = problem.n
    grad, paths = cx.path_grad(problem)
    # a parameter of layer l (0-based, L = n layers) has n^(L - 1 - l) paths to the output
    assert paths == sum((n * n + n) * n ** (n - 1 - l) for l in range(n))
    assert cx.agreement(problem, grad, problem.backprop_grad()) < 1e-13


def test_agreement_is_per_tensor_and_sees_a_wrong_entry():
    prob = cx.Problem(3)
    ref = prob.backprop_grad()
    bad = ref.copy()
    w0 = next(layout(prob.model.sizes))[0]
    bad[w0.start] += 1e-3 * np.abs(ref[w0]).max()
    assert cx.agreement(prob, bad, ref) == pytest.approx(1e-3)
    # a sample is held to the scale of its whole tensor
    idx = np.array([w0.start, prob.P - 1])
    assert cx.agreement(prob, bad[idx], ref, idx) == pytest.approx(1e-3)
    assert cx.agreement(prob, ref[idx], ref, idx) == 0


def test_a_sample_estimate_agrees_and_scales_to_P():
    prob = cx.Problem(12)
    reference = prob.backprop_grad()
    for method in cx.PER_PARAMETER:
        est, values, order = cx.estimate(prob, method, 0.002)
        assert est is not None and cx.MIN_SAMPLE <= est["sample"] == len(order) <= prob.P / 4
        assert cx.agreement(prob, values, reference, order) <= cx.tolerance(method)
        assert est["seconds"] == pytest.approx(est["setup_s"] + prob.P * est["per_parameter_s"])
    spread = cx.sample_indices(prob.P, 13)
    assert spread[0] == 0 and spread[-1] == prob.P - 1 and len(spread) == 13
    layers = {t[1] for t in prob.targets(spread)}
    assert layers == set(range(12))  # a sample reaches every layer


# ---- fitting ----------------------------------------------------------------------------------

def test_the_fit_recovers_an_exact_power_law():
    n = np.array([8, 16, 32, 64])
    fit = cx.fit_exponent(n, 3e-9 * n ** 6.0)
    assert fit["slope"] == pytest.approx(6.0, abs=1e-12)
    assert math.exp(fit["intercept"]) == pytest.approx(3e-9)
    assert fit["ci"][0] == pytest.approx(6.0, abs=1e-9) and fit["ci"][1] == pytest.approx(6.0, abs=1e-9)


def test_the_interval_covers_the_true_slope_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    n = np.array([16, 24, 32, 48, 64])
    trials, covered, widths = 2000, 0, []
    for _ in range(trials):
        t = 1e-6 * n ** 3.0 * np.exp(rng.normal(0, 0.1, n.size))
        fit = cx.fit_exponent(n, t)
        covered += fit["ci"][0] <= 3.0 <= fit["ci"][1]
        widths.append(fit["ci"][1] - fit["ci"][0])
    # binomial sd at p = 0.95, 2000 trials: ~0.005
    assert 0.93 <= covered / trials <= 0.97
    assert fit["dof"] == 3 and fit["interval"].startswith("student-t")


def test_the_interval_matches_the_textbook_formula():
    x = np.array([10.0, 20, 40, 80])
    t = np.array([1.0, 7.5, 70, 500])
    fit = cx.fit_exponent(x, t)
    lx, lt = np.log(x), np.log(t)
    slope, intercept = np.polyfit(lx, lt, 1)
    resid = lt - (intercept + slope * lx)
    se = math.sqrt((resid ** 2).sum() / 2 / ((lx - lx.mean()) ** 2).sum())
    assert fit["slope"] == pytest.approx(slope) and fit["se"] == pytest.approx(se)
    assert fit["ci"] == pytest.approx([slope - 4.302652729911275 * se, slope + 4.302652729911275 * se])


def test_two_points_give_a_slope_without_an_interval():
    fit = cx.fit_exponent([2, 4], [1.0, 8.0])
    assert fit["slope"] == pytest.approx(3.0) and fit["ci"] is None


def test_a_series_is_fitted_over_its_largest_sizes():
    rows = [{"n": n, "P": cx.n_params(n), "seconds": 1e-5 * (1 + n ** 3 / 50)} for n in (2, 4, 8, 16, 32, 64, 128)]
    fits = cx.fit_series(rows, 4)
    assert fits["top"]["n"]["x"] == [16, 32, 64, 128]
    assert fits["all"]["n"]["slope"] < fits["top"]["n"]["slope"] < 3.0  # overhead flattens the small sizes
    assert fits["top"]["P"]["slope"] == pytest.approx(fits["top"]["n"]["slope"] / 3, rel=0.05)
    assert cx.fit_series(rows[:2], 4) is None


# ---- the script ------------------------------------------------------------------------------------

def test_the_script_writes_its_results(tmp_path, capsys):
    result = cx.main(["--sizes", "2", "3", "4", "5", "--max-seconds", "5", "--sample-seconds", "0",
                      "--path-sizes", "2", "3", "--repeats", "1", "--loop-seconds", "0.002", "--device", "both",
                      "--out", str(tmp_path)])
    [js] = tmp_path.glob("complexity-*.json")
    data = json.loads(js.read_text())
    assert data["agreement_ok"] and result["agreement_ok"]
    assert {"machine", "date", "versions", "settings", "results", "paths", "agreement_worst"} <= set(data)
    cpu = data["results"]["cpu"]
    for method in cx.METHODS:
        rows = cpu["methods"][method]["full"]
        assert [r["n"] for r in rows] == [2, 3, 4, 5] and all(r["seconds"] > 0 for r in rows)
        fit = cpu["fits"][method]["full"]["top"]["n"]
        assert fit["x"] == [2, 3, 4, 5] and fit["ci"][0] <= fit["slope"] <= fit["ci"][1]
    assert data["versions"]["blas_threads"].startswith("1")
    cuda = data["results"]["cuda"]  # measured, or skipped with the reason
    assert "methods" in cuda or "CuPy" in cuda["skipped"] or "CUDA" in cuda["skipped"]
    png = js.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000
    log = js.with_suffix(".log").read_text()
    assert "| n | P |" in log and "gradient agreement" in log and "time over one forward pass" in log
    for method in cx.PER_PARAMETER:  # the ratios the log states are there (their values are timings: not held)
        assert len(list(cx.per_forward(cpu["methods"], method))) == 4
    assert "fitted exponents" in capsys.readouterr().out


def test_the_per_parameter_methods_do_p_passes(monkeypatch):
    """The claim the timings illustrate, counted: finite differences run the engine's
    forward pass twice per parameter, and every per-parameter method does one sweep
    per parameter after one preparation, where backprop does one pass each way."""
    prob = cx.Problem(4)
    forwards = []
    real_forward = prob.model.forward_pass
    monkeypatch.setattr(prob.model, "forward_pass", lambda *a, **k: forwards.append(1) or real_forward(*a, **k))
    cx.full_gradient(prob, "finite_diff")()
    assert len(forwards) == 2 * prob.P
    forwards.clear()
    cx.engine_backprop(prob)()
    assert len(forwards) == 1
    for method, make in cx.PER_PARAMETER_METHODS.items():
        counts = {"prepare": 0, "one": 0}

        def counted(prob, make=make, counts=counts):
            prepare, one = make(prob)
            return (lambda: counts.__setitem__("prepare", counts["prepare"] + 1) or prepare(),
                    lambda *a: counts.__setitem__("one", counts["one"] + 1) or one(*a))

        monkeypatch.setitem(cx.PER_PARAMETER_METHODS, method, counted)
        cx.full_gradient(prob, method)()
        assert counts == {"prepare": 1, "one": prob.P}, method


def test_a_cold_first_call_counts_only_when_it_is_the_only_loop(monkeypatch):
    """median_time: the first (cold) call joins the runs only when calls are
    timed one at a time and there are fewer than three of them. (A clock of our own:
    each call advances it by its duration, so nothing here depends on the machine.)"""
    clock = {"t": 0.0}
    monkeypatch.setattr(cx, "time", types.SimpleNamespace(perf_counter=lambda: clock["t"]))

    def taking(seconds):
        return lambda: clock.__setitem__("t", clock["t"] + seconds)

    _, details, _ = cx.median_time(taking(2.0**-20), loop_s=2.0**-10, long_s=10, repeats=2, budget_s=1e9)
    assert details["loop"] == 1024 and len(details["runs_s"]) == 2  # loops of many calls: the cold one left out
    _, details, _ = cx.median_time(taking(0.5), loop_s=0.1, long_s=10, repeats=2, budget_s=1e9)
    assert details["loop"] == 1 and details["runs_s"] == [0.5, 0.5, 0.5]  # two repeats and the first call
    _, details, _ = cx.median_time(taking(0.5), loop_s=0.1, long_s=10, repeats=3, budget_s=1e9)
    assert details["runs_s"] == [0.5, 0.5, 0.5]  # three repeats: the first call is not needed


def test_a_method_stops_growing_past_the_time_cap(tmp_path, monkeypatch):
    """The cap's logic on made-up times (n^3 for a pass, n^6 for a per-parameter
    gradient), so that no machine's speed decides it."""
    def measured(prob, method, reference, device, log):
        return {"n": prob.n, "P": prob.P, "seconds": 1e-7 * prob.n ** cx.THEORY[method], "timing": {},
                "max_rel_err": None}

    monkeypatch.setattr(cx, "measure_full", measured)
    result = cx.main(["--sizes", "2", "4", "8", "--max-seconds", "0.001", "--sample-seconds", "0",
                      "--path-sizes", "--repeats", "1", "--loop-seconds", "0.002", "--device", "cpu",
                      "--out", str(tmp_path)])
    methods = result["results"]["cpu"]["methods"]
    for method in cx.PER_PARAMETER:  # 4^6 1e-7 = 4e-4 s, and n = 8 predicted at 64x that
        assert [r["n"] for r in methods[method]["full"]] == [2, 4]
        assert methods[method]["stopped"].startswith("n=8 predicted") and "max-seconds" in methods[method]["stopped"]
    for method in ("forward", "backprop"):
        assert [r["n"] for r in methods[method]["full"]] == [2, 4, 8] and methods[method]["stopped"] is None


# ---- pytest-benchmark: each method's full gradient at n = 8 ------------------------------------------

@pytest.fixture(scope="module")
def bench_problem():
    return cx.Problem(BENCH_N)


@pytest.mark.parametrize("method", cx.METHODS)
def test_bench_method(benchmark, bench_problem, method):
    if method == "forward":
        fn = cx.engine_forward(bench_problem)
    elif method == "backprop":
        fn = cx.engine_backprop(bench_problem)
    else:
        fn = cx.full_gradient(bench_problem, method)
    fn()
    benchmark.group = f"complexity-n{BENCH_N}"
    benchmark.extra_info.update(n=BENCH_N, P=bench_problem.P)
    result = benchmark(fn)
    if method in cx.PER_PARAMETER:
        assert cx.agreement(bench_problem, result, bench_problem.backprop_grad()) <= cx.tolerance(method)
    elif method == "forward":  # the MSE of the problem's sample, the forward pass written out
        a = bench_problem.x
        for l, (W, b) in enumerate(zip(bench_problem.W, bench_problem.b)):
            a = W @ a + b
            a = a if l == len(bench_problem.W) - 1 else np.tanh(a)
        assert result == pytest.approx(np.mean((a - bench_problem.y) ** 2), rel=1e-12)
    else:  # backprop leaves the engine's gradient in the model's buffer
        np.testing.assert_array_equal(bench_problem.model.backend.to_host(bench_problem.model.grads),
                                      bench_problem.backprop_grad())
