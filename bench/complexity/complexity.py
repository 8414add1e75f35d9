"""The cost of a gradient: backprop against per-parameter differentiation (issue 8).

    python -m bench.complexity.complexity [--sizes 2 4 8 ...] [--max-seconds 20]
                                          [--sample-seconds 2] [--threads 1] [--out bench/results]

The claim under test: reverse-mode differentiation (backprop) costs a small
constant times a forward pass, while differentiating each parameter on its own
costs a factor of the parameter count more. With n layers of n units on an
n-dimensional input, O(n^3) against O(n^6).

The network of size n (n = l = d)
    sizes [n] * (n + 1): an n-dimensional input and n dense layers of n units
    (n - 1 tanh hidden layers and a linear output layer of n units), MSE loss
    against a fixed target, one sample (batch 1), float64. Every layer is n x n,
    so P = n^3 + n^2 parameters and a forward pass is n matrix-vector products
    of n x n: ~2 n^3 multiply-adds. The n outputs keep every layer the same shape;
    the loss is still a scalar, so reverse mode needs one backward sweep.

The five methods, each giving the full gradient dL/dtheta (P numbers)
    forward       (a) the engine's forward pass and loss: model.forward_pass + compute_loss
    backprop      (b) the engine's forward, loss and backward (_forward, _loss,
                  _backward) on a workspace loaded once. The public
                  model.loss_and_grad adds input validation and a host copy of
                  the gradients; it is timed too, up to n = 128 (public_s in
                  backprop's rows).
    forward_mode  (c) one forward pass of dual numbers (value, tangent) per
                  parameter, the tangent seeded at that parameter: P passes of
                  2 matrix-vector products per layer. The textbook version: every
                  pass runs from the input, although the tangent is zero below the
                  seeded layer (NumPy, written here).
    per_weight    (d) for each parameter on its own, one chain-rule sweep from
                  dL/da_L back to its layer (matrix-vector products through every
                  layer above it), then delta_l[j] a_{l-1}[k]. Nothing is shared
                  between parameters except the forward activations and
                  g'(z), computed once per gradient (NumPy, written here).
    finite_diff   (e) central differences (L(p + h) - L(p - h)) / 2h per parameter,
                  h = 1e-5, each L one pass of the engine's forward with the
                  parameter perturbed in place in model.params: 2P forward passes.
Footnote: paths, the chain rule with every path from a parameter to the output
summed separately (n^(L - l) paths for a weight of layer l), for tiny n only.

Timing: time.perf_counter, BLAS pinned to --threads (default 1) by threadpoolctl.
A call shorter than 0.1 s runs in loops of ~0.1 s; each size reports the median
over up to 5 repeats (one run when a call takes longer than 2 s). A method stops
growing n when its last timing, or the prediction for the next size from its last
two, exceeds --max-seconds. Beyond that, the per-parameter methods are estimated:
P times the mean time per parameter over a sample of k parameters spread evenly
over the flat parameter vector (so over all layers), plus the per-gradient setup;
at the sizes measured in full the estimate is taken too (where the sample is at most
a quarter of P) and its ratio to the full time reported, as a check on it.

Fits: log t = c + k log n by least squares over the largest --fit-points sizes
(default 4) of each series (measured in full; estimated), with a 95% confidence
interval for k from Student's t with (points - 2) degrees of freedom (scipy; a
normal approximation if scipy is missing, said in the output); the same against P.

Gradients: at every size measured in full, each method's gradient is compared
with backprop's, per tensor (each W_l and b_l): max |g - g_bp| / max |g_bp|, as
gpubackprop.tools.gradcheck does. Sampled entries are checked the same way. The run fails
(exit 1) if any exceeds its tolerance (1e-6 for finite differences, 1e-10 else).

On CUDA (when gpubackprop can use a GPU) forward, backprop and finite_diff run
on the device too (synchronised after each call); the NumPy methods stay on the
CPU. Writes <out>/complexity-<date>.json, .log and .png.
"""

import argparse
import contextlib
import datetime
import itertools
import json
import math
import os
import statistics
import sys
import time

import numpy as np

import gpubackprop as gb
from bench.common import machine, versions
from gpubackprop.nn.parameters import layout

HERE = os.path.dirname(os.path.abspath(__file__))

SEED = 0
ACTIVATION = "tanh"
LOSS = "mse"
FD_STEP = 1e-5
TOLERANCE = {"finite_diff": 1e-6}
DEFAULT_TOLERANCE = 1e-10
METHODS = ("forward", "backprop", "forward_mode", "per_weight", "finite_diff")
LABELS = {
    "forward": "(a) forward pass",
    "backprop": "(b) backprop (fwd + bwd)",
    "forward_mode": "(c) forward mode, per parameter",
    "per_weight": "(d) chain rule, per weight",
    "finite_diff": "(e) finite differences",
}
THEORY = {"forward": 3, "backprop": 3, "forward_mode": 6, "per_weight": 6, "finite_diff": 6}
PER_PARAMETER = ("forward_mode", "per_weight", "finite_diff")
ENGINE = ("forward", "backprop", "finite_diff")  # the methods that also run on CUDA
DEFAULT_SIZES = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
PATH_SIZES = (2, 3, 4, 5, 6)
FIT_POINTS = 4
LONG_S = 2.0  # a call this long is timed once
TIMING = {"loop_s": 0.1, "repeats": 5}  # shortest timed loop, repeats (set by --loop-seconds, --repeats)
REPEAT_BUDGET_S = 3.0  # at most this long spent on repeats of one (method, size)
MIN_SAMPLE, MAX_SAMPLE = 8, 4096
PUBLIC_MAX_N = 128


def n_params(n):
    return n ** 3 + n ** 2


def sizes_for(n):
    return [n] * (n + 1)


# ---- the problem ------------------------------------------------------------------------

class Problem:
    """The network of size n on one device, its sample (x, y) loaded into a workspace,
    and host views of its weights for the NumPy methods."""

    def __init__(self, n, device="cpu", seed=SEED):
        self.n = n
        self.model = gb.MLP(sizes_for(n), activation=ACTIVATION, loss=LOSS, dtype="float64", device=device, seed=seed)
        rng = np.random.default_rng(seed + 1)
        self.x = rng.standard_normal(n)
        self.y = rng.standard_normal(n)
        m = self.model
        with m.context():
            self.ws = m.load_batch(self.x[None, :], self.y[None, :])
        self.device = m.device
        self.P = m.n_params
        # Host weights (views of the model's buffer on the CPU; a copy from a GPU).
        host = m.backend.to_host(m.params)
        self.W, self.b = [], []
        for w, bias, n_out, n_in in layout(m.sizes):
            self.W.append(host[w].reshape(n_out, n_in))
            self.b.append(host[bias])
        self.starts = [w.start for w, _, _, _ in layout(m.sizes)]

    def sync(self):
        if self.device != "cpu":
            self.model.backend.xp.cuda.Device().synchronize()

    def targets(self, indices=None):
        """(flat index, layer, j, k) of each parameter: W_l[j, k], or b_l[j] with k = -1."""
        out = []
        for l, (w, bias, n_out, n_in) in enumerate(layout(self.model.sizes)):
            if indices is None:
                out.extend((w.start + j * n_in + k, l, j, k) for j in range(n_out) for k in range(n_in))
                out.extend((bias.start + j, l, j, -1) for j in range(n_out))
            else:
                for i in indices:
                    if w.start <= i < w.stop:
                        j, k = divmod(i - w.start, n_in)
                        out.append((i, l, j, k))
                    elif bias.start <= i < bias.stop:
                        out.append((i, l, i - bias.start, -1))
        return out if indices is None else sorted(out)

    def backprop_grad(self):
        """The engine's gradient (flat, on the host): the reference every method is held to."""
        m = self.model
        with m.context():
            m.forward_pass(self.ws)
            m.compute_loss(self.ws)
            m.backward_pass(self.ws)
            return m.backend.to_host(m.grads).copy()


# ---- the methods ----------------------------------------------------------------------
# Engine methods return a callable doing the work once. Per-parameter methods are a
# (prepare, one) pair: prepare() does the once-per-gradient work and returns its state,
# one(state, target) the derivative with respect to one parameter.

def engine_forward(prob):
    m, ws = prob.model, prob.ws

    def call():
        with m.context():
            m.forward_pass(ws)
            return float(m.compute_loss(ws))  # a host read: synchronises on a GPU

    return call


def engine_backprop(prob):
    m, ws = prob.model, prob.ws

    def call():
        with m.context():
            m.forward_pass(ws)
            m.compute_loss(ws)
            m.backward_pass(ws)
        prob.sync()

    return call


def public_backprop(prob):
    x, y = prob.x[None, :], prob.y[None, :]

    def call():
        return prob.model.loss_and_grad(x, y)

    return call


def forward_mode_method(prob):
    W, b, x, y = prob.W, prob.b, prob.x, prob.y
    last = len(W) - 1

    def prepare():
        return None

    def one(_, target):
        """dL/dp from one forward pass of dual numbers (a, t), t = da/dp, from the input."""
        _, l, j, k = target
        a, t = x, np.zeros_like(x)
        for m in range(last + 1):
            z = W[m] @ a + b[m]
            tz = W[m] @ t  # textbook: computed even where t is still zero (m < l)
            if m == l:  # the seed: dz_l/dp = a_{l-1}[k] e_j (weight), e_j (bias)
                tz[j] += a[k] if k >= 0 else 1.0
            if m < last:
                a = np.tanh(z)
                t = (1.0 - a * a) * tz
            else:
                a, t = z, tz
        return 2.0 / a.size * np.dot(a - y, t)

    return prepare, one


def per_weight_method(prob):
    W, b, x, y = prob.W, prob.b, prob.x, prob.y
    last = len(W) - 1

    def prepare():
        """The forward activations a_0..a_L, g'(z_l), and dL/da_L: once per gradient."""
        acts, slopes = [x], []
        for m in range(last + 1):
            z = W[m] @ acts[-1] + b[m]
            if m < last:
                a = np.tanh(z)
                slopes.append(1.0 - a * a)
            else:
                a = z
                slopes.append(np.ones_like(z))
            acts.append(a)
        return acts, slopes, 2.0 / y.size * (acts[-1] - y)

    def one(state, target):
        """dL/dp by one sweep of the chain rule from the output down to p's layer,
        recomputed from scratch for this parameter."""
        acts, slopes, dL_da = state
        _, l, j, k = target
        g = dL_da
        for m in range(last, l, -1):
            g = W[m].T @ (g * slopes[m])  # dL/da_{m-1} (0-based: the input of layer m)
        delta = g[j] * slopes[l][j]
        return delta * acts[l][k] if k >= 0 else delta

    return prepare, one


def finite_diff_method(prob, h=FD_STEP):
    m, ws = prob.model, prob.ws
    p = m.params

    def loss():
        m.forward_pass(ws)
        return float(m.compute_loss(ws))

    def prepare():
        return m.backend.to_host(p).copy()

    def one(host, target):
        i = target[0]
        saved = host[i]
        up, down = saved + h, saved - h
        with m.context():
            p[i] = up
            l_up = loss()
            p[i] = down
            l_down = loss()
            p[i] = saved
        return (l_up - l_down) / (up - down)  # the step as represented, not 2h

    return prepare, one


def path_grad(prob):
    """The chain rule with every path summed on its own: for W_l[j, k],
    a_{l-1}[k] g'_l[j] sum over (i_{l+1}, ..., i_L) of prod W_m[i_m, i_{m-1}] g'_m[i_m]
    times dL/da_L[i_L]; nothing is shared between parameters or paths. Returns
    (flat gradient, number of paths)."""
    acts, slopes, dL_da = per_weight_method(prob)[0]()
    acts, slopes, dL_da = [v.tolist() for v in acts], [v.tolist() for v in slopes], dL_da.tolist()
    W = [w.tolist() for w in prob.W]
    n, last = prob.n, len(W) - 1
    grad = np.empty(prob.P)
    paths = 0
    for i, l, j, k in prob.targets():
        total = 0.0
        for route in itertools.product(range(n), repeat=last - l):
            prev, term = j, slopes[l][j]
            for m, unit in zip(range(l + 1, last + 1), route):
                term *= W[m][unit][prev] * slopes[m][unit]
                prev = unit
            total += term * dL_da[prev]
            paths += 1
        grad[i] = total * (acts[l][k] if k >= 0 else 1.0)
    return grad, paths


PER_PARAMETER_METHODS = {"forward_mode": forward_mode_method, "per_weight": per_weight_method,
                         "finite_diff": finite_diff_method}


def full_gradient(prob, method):
    """A callable computing ``method``'s whole gradient (flat, host) once."""
    prepare, one = PER_PARAMETER_METHODS[method](prob)
    targets = prob.targets()

    def call():
        state = prepare()
        grad = np.empty(prob.P)
        for target in targets:
            grad[target[0]] = one(state, target)
        return grad

    return call


def sampled_gradient(prob, method, indices):
    """(prepare, loop) for an estimate: loop(state) computes ``method``'s derivative
    for the parameters at ``indices`` and returns them."""
    prepare, one = PER_PARAMETER_METHODS[method](prob)
    targets = prob.targets(indices)

    def loop(state):
        return np.array([one(state, t) for t in targets])

    return prepare, loop, [t[0] for t in targets]


# ---- gradient agreement -----------------------------------------------------------------

def agreement(prob, grad, reference, indices=None):
    """max over tensors (each W_l, b_l) of max |g - ref| / max |ref| (ref over the whole
    tensor, so a sample is held to the same scale as a full gradient)."""
    worst = 0.0
    sel = None if indices is None else np.asarray(indices)
    full = grad if sel is None else None
    if sel is not None:
        full = np.full(prob.P, np.nan)
        full[sel] = grad
    for w, bias, _, _ in layout(prob.model.sizes):
        for sl in (w, bias):
            ref, got = reference[sl], full[sl]
            keep = ~np.isnan(got)
            if not keep.any():
                continue
            scale = np.abs(ref).max()
            err = np.abs(got[keep] - ref[keep]).max()
            worst = max(worst, float(err / scale) if scale > 0 else float(err))
    return worst


def tolerance(method):
    return TOLERANCE.get(method, DEFAULT_TOLERANCE)


# ---- timing ---------------------------------------------------------------------------------

def median_time(fn, loop_s=None, long_s=LONG_S, repeats=None, budget_s=REPEAT_BUDGET_S, warmup=0):
    """(median seconds per call, details, the first timed call's result).

    Not bench.common.time_call (the best of interleaved loops, for comparing
    libraries): here one method is timed across sizes whose calls range from
    microseconds to minutes, so a long call is timed once and a budget caps repeats.

    ``warmup`` untimed calls come first (the engine's: its first call pages in
    freshly allocated buffers, a second at n = 512). The first timed call counts;
    when it took longer than ``long_s`` it is the only run. Calls shorter than
    ``loop_s`` run in loops of ~loop_s; up to ``repeats`` loops within ``budget_s``."""
    loop_s = TIMING["loop_s"] if loop_s is None else loop_s
    repeats = TIMING["repeats"] if repeats is None else repeats
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    result = fn()
    first = time.perf_counter() - t0
    if first >= long_s:
        return first, {"runs_s": [first], "min_s": first, "loop": 1, "first_s": first}, result
    loop = max(1, math.ceil(loop_s / max(first, 1e-9)))
    per_repeat = max(first * loop, 1e-9)
    reps = max(1, min(repeats, int(budget_s // per_repeat)))
    means = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(loop):
            fn()
        means.append((time.perf_counter() - t0) / loop)
    # loop == 1 and few repeats: the first (cold) run counts too, so there are at least two
    runs = means + [first] if loop == 1 and len(means) < 3 else means
    return statistics.median(runs), {"runs_s": runs, "min_s": min(runs), "loop": loop, "first_s": first}, result


def sample_indices(P, k):
    """k flat indices spread evenly over 0..P-1 (so over every layer, in proportion)."""
    return np.unique(np.linspace(0, P - 1, min(k, P)).round().astype(np.int64))


def estimate(prob, method, sample_s):
    """P x the mean seconds per parameter over an even sample, plus the setup's time;
    with the sample's agreement against backprop."""
    prepare, loop, _ = sampled_gradient(prob, method, sample_indices(prob.P, MIN_SAMPLE))
    state = prepare()
    t0 = time.perf_counter()
    loop(state)  # warm-up, and the size of the sample
    per_param = (time.perf_counter() - t0) / MIN_SAMPLE
    k = int(min(MAX_SAMPLE, max(MIN_SAMPLE, sample_s / max(per_param, 1e-9))))
    if 4 * k > prob.P:
        return None, None, None  # the sample would be most of the gradient: nothing to estimate
    indices = sample_indices(prob.P, k)
    prepare, loop, order = sampled_gradient(prob, method, indices)
    repeats = min(3, TIMING["repeats"])
    setup_s, _, state = median_time(prepare, repeats=repeats, budget_s=sample_s / 4)
    loop_s, details, values = median_time(lambda: loop(state), repeats=repeats, budget_s=sample_s)
    k = len(order)
    return {
        "seconds": setup_s + prob.P * loop_s / k,
        "sample": k,
        "per_parameter_s": loop_s / k,
        "setup_s": setup_s,
        "timing": details,
    }, values, order


# ---- fitting -------------------------------------------------------------------------------

def t_quantile(q, dof):
    """(Student's t quantile, how it was obtained)."""
    try:
        from scipy import stats

        return float(stats.t.ppf(q, dof)), "student-t (scipy)"
    except ImportError:
        return statistics.NormalDist().inv_cdf(q), "normal approximation (scipy missing)"


def fit_exponent(x, t, level=0.95):
    """Least squares log t = c + k log x: k, its standard error and a ``level`` interval
    from Student's t with len(x) - 2 degrees of freedom (no interval with 2 points)."""
    lx, lt = np.log(np.asarray(x, float)), np.log(np.asarray(t, float))
    m = len(lx)
    if m < 2:
        raise ValueError("need at least two points to fit an exponent")
    sxx = float(((lx - lx.mean()) ** 2).sum())
    slope = float(((lx - lx.mean()) * (lt - lt.mean())).sum() / sxx)
    intercept = float(lt.mean() - slope * lx.mean())
    out = {"slope": slope, "intercept": intercept, "points": m, "dof": m - 2, "level": level,
           "x": [float(v) for v in x], "se": None, "ci": None, "interval": None}
    if m > 2:
        resid = lt - (intercept + slope * lx)
        se = math.sqrt(float((resid ** 2).sum()) / (m - 2) / sxx)
        q, how = t_quantile(0.5 + level / 2, m - 2)
        out.update(se=se, ci=[slope - q * se, slope + q * se], interval=how)
    return out


def fit_series(rows, fit_points):
    """Fits of a series' seconds against n and against P: over its largest ``fit_points``
    sizes ("top") and over all of them ("all"). None with fewer than 3 points."""
    rows = sorted(rows, key=lambda r: r["n"])
    if len(rows) < 3:
        return None
    top = rows[-fit_points:] if len(rows) >= fit_points else rows
    fits = {}
    for name, sel in (("top", top), ("all", rows)):
        t = [r["seconds"] for r in sel]
        fits[name] = {"n": fit_exponent([r["n"] for r in sel], t), "P": fit_exponent([r["P"] for r in sel], t)}
    return fits


# ---- the study ---------------------------------------------------------------------------------

class Log:
    """Prints and keeps every line (for the .log)."""

    def __init__(self):
        self.lines = []

    def __call__(self, *parts):
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.lines.extend(line.split("\n"))


def predicted(rows, n_next):
    """The next size's time extrapolated from the last two (slope at least 1)."""
    if not rows:
        return 0.0
    if len(rows) == 1:
        return rows[-1]["seconds"] * (n_next / rows[-1]["n"]) ** 3
    a, b = rows[-2], rows[-1]
    slope = max(1.0, math.log(b["seconds"] / a["seconds"]) / math.log(b["n"] / a["n"]))
    return b["seconds"] * (n_next / b["n"]) ** slope


def run_device(device, sizes, methods, args, log):
    """Every method of ``methods`` at every size that fits: {"methods": {...}, "agreement": [...]}."""
    series = {m: {"full": [], "sampled": [], "stopped": None} for m in methods}
    agreements, loads = [], []
    others = OtherLoad()
    for n in sizes:
        P = n_params(n)
        busy = [m for m in methods if series[m]["stopped"] is None or m in PER_PARAMETER]
        if not busy:
            break
        try:
            prob = Problem(n, device)
        except (MemoryError, gb.OutOfMemoryError) as e:
            log(f"  n={n}: no memory for the network ({e}); stopping")
            for m in methods:
                series[m]["stopped"] = series[m]["stopped"] or f"out of memory at n={n}"
            break
        reference = prob.backprop_grad()
        cells = []
        for method in methods:
            s = series[method]
            if s["stopped"] is None:
                guess = predicted(s["full"], n)
                if guess > args.max_seconds:
                    s["stopped"] = f"n={n} predicted {guess:.3g} s > --max-seconds {args.max_seconds:g}"
            if s["stopped"] is None:
                row = measure_full(prob, method, reference, device, log)
                s["full"].append(row)
                if row["max_rel_err"] is not None:
                    agreements.append({"n": n, "method": method, "kind": "full", "max_rel_err": row["max_rel_err"],
                                       "tolerance": tolerance(method), "ok": row["max_rel_err"] <= tolerance(method)})
                cells.append(f"{method} {row['seconds']:.3g}s")
                if row["seconds"] > args.max_seconds:
                    s["stopped"] = f"n={n} took {row['seconds']:.3g} s > --max-seconds {args.max_seconds:g}"
            if method in PER_PARAMETER and args.sample_seconds > 0 and P > MIN_SAMPLE:
                est, values, order = estimate(prob, method, args.sample_seconds)
                if est is None:
                    continue
                err = agreement(prob, values, reference, order)
                est.update(n=n, P=P, max_rel_err=err)
                full = s["full"][-1] if s["full"] and s["full"][-1]["n"] == n else None
                est["full_s"] = full["seconds"] if full else None
                est["estimate_over_full"] = est["seconds"] / full["seconds"] if full else None
                s["sampled"].append(est)
                agreements.append({"n": n, "method": method, "kind": f"sample of {est['sample']}", "max_rel_err": err,
                                   "tolerance": tolerance(method), "ok": err <= tolerance(method)})
                if not full:
                    cells.append(f"{method} ~{est['seconds']:.3g}s (k={est['sample']})")
        load, busy = load_average(), others.read()
        loads.append({"n": n, "load": load, "others_cpu": busy})
        log(f"  n={n:4d} P={P:>11,d}: " + ", ".join(cells)
            + (f"  [other processes: {100 * busy:.0f}% of the CPU]" if busy is not None else ""))
        del prob
    for method in methods:
        if series[method]["stopped"]:
            log(f"  {method}: full runs stopped at {series[method]['stopped']}")
    return {"methods": series, "agreement": agreements, "load": loads}


def measure_full(prob, method, reference, device, log):
    n, P = prob.n, prob.P
    if method == "forward":
        fn = engine_forward(prob)
    elif method == "backprop":
        fn = engine_backprop(prob)
    else:
        fn = full_gradient(prob, method)
    # The engine's calls are warmed up; a per-parameter gradient is P calls of the same
    # small work, so its own first parameters are its warm-up.
    seconds, details, result = median_time(fn, warmup=1 if method in ENGINE and method not in PER_PARAMETER else 0)
    row = {"n": n, "P": P, "seconds": seconds, "timing": details, "max_rel_err": None}
    if method in PER_PARAMETER:
        row["max_rel_err"] = agreement(prob, result, reference)
    elif method == "backprop":
        # The reference itself: a second run must give it again; on a GPU it is held to
        # the CPU's float64 gradient of the same weights too (up to n = 128).
        row["max_rel_err"] = agreement(prob, prob.backprop_grad(), reference)
        if prob.device != "cpu" and n <= PUBLIC_MAX_N:
            row["vs_cpu_rel_err"] = agreement(prob, Problem(n, "cpu").backprop_grad(), reference)
            row["max_rel_err"] = max(row["max_rel_err"], row["vs_cpu_rel_err"])
        if n <= PUBLIC_MAX_N:
            public_s, _, _ = median_time(public_backprop(prob), budget_s=1.0, warmup=1)
            row["public_s"] = public_s
    return row


def run_paths(sizes, log):
    rows = []
    for n in sizes:
        prob = Problem(n)
        reference = prob.backprop_grad()
        t0 = time.perf_counter()
        grad, paths = path_grad(prob)
        seconds = time.perf_counter() - t0
        err = agreement(prob, grad, reference)
        rows.append({"n": n, "P": prob.P, "paths": paths, "seconds": seconds, "max_rel_err": err,
                     "ok": err <= DEFAULT_TOLERANCE})
        log(f"  n={n}: {paths:,} paths, {seconds:.3g} s, max rel err {err:.1e}")
    return rows


def cuda_backend():
    """(backend, None) or (None, why not)."""
    try:
        return gb.get_backend("cuda"), None
    except gb.DeviceUnavailableError as e:
        return None, e.cause
    except ImportError as e:
        return None, f"CuPy cannot be imported ({e})"


# ---- reporting ------------------------------------------------------------------------------------

def fmt_s(s):
    if s is None:
        return ""
    if s < 1e-3:
        return f"{s * 1e6:.3g} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    if s < 600:
        return f"{s:.3g} s"
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.3g} {unit}"
    return f"{s:.3g} s"


def table(result, methods):
    """Markdown: seconds per gradient per size; ~ marks an estimate from a sample."""
    series = result["methods"]
    ns = sorted({r["n"] for m in methods for kind in ("full", "sampled") for r in series[m][kind]})
    lines = ["| n | P | " + " | ".join(LABELS[m] for m in methods) + " |",
             "|---:|---:|" + "---:|" * len(methods)]
    for n in ns:
        cells = []
        for m in methods:
            full = next((r for r in series[m]["full"] if r["n"] == n), None)
            est = next((r for r in series[m]["sampled"] if r["n"] == n), None)
            cells.append(fmt_s(full["seconds"]) if full else (f"~{fmt_s(est['seconds'])}" if est else ""))
        lines.append(f"| {n} | {n_params(n):,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt_fit(fit):
    if fit is None:
        return "n/a"
    f = fit
    ci = f"[{f['ci'][0]:.2f}, {f['ci'][1]:.2f}]" if f["ci"] else "(no interval)"
    return f"{f['slope']:.2f} {ci}"


def fits_table(fits, methods):
    lines = ["| method | theory | exponent in n (95% CI) | over n = | exponent in P | "
             "estimated: exponent in n | over n = |",
             "|---|---:|---|---|---|---|---|"]
    for m in methods:
        f = fits.get(m, {})
        full, est = f.get("full"), f.get("sampled")
        over = lambda fit: ", ".join(str(int(v)) for v in fit["top"]["n"]["x"]) if fit else ""  # noqa: E731
        lines.append(f"| {LABELS[m]} | {THEORY[m]} | {fmt_fit(full['top']['n']) if full else 'n/a'} | {over(full)} | "
                     f"{fmt_fit(full['top']['P']) if full else 'n/a'} | "
                     f"{fmt_fit(est['top']['n']) if est else ''} | {over(est)} |")
    return "\n".join(lines)


def all_fits(result, methods, fit_points):
    out = {}
    for m in methods:
        s = result["methods"][m]
        out[m] = {"full": fit_series(s["full"], fit_points),
                  "sampled": fit_series(s["sampled"], fit_points) if m in PER_PARAMETER else None}
    return out


def plot(path, results, title):
    """Log-log seconds against n: one panel per device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"forward": "#1f77b4", "backprop": "#2ca02c", "forward_mode": "#ff7f0e",
              "per_weight": "#d62728", "finite_diff": "#9467bd"}
    panels = [(dev, r) for dev, r in results.items() if r and "methods" in r]
    fig, axes = plt.subplots(1, len(panels), figsize=(8.5 * len(panels), 6.2), squeeze=False)
    for ax, (dev, r) in zip(axes[0], panels):
        ymin, ymax = math.inf, 0
        for m, s in r["methods"].items():
            fits = r["fits"].get(m, {})
            full, est = s["full"], s["sampled"]
            fit = fits.get("full")
            label = LABELS[m]
            if fit:
                f = fit["top"]["n"]
                label += f": slope {f['slope']:.2f}" + (f" [{f['ci'][0]:.2f}, {f['ci'][1]:.2f}]" if f["ci"] else "")
            if full:
                ns, ts = [x["n"] for x in full], [x["seconds"] for x in full]
                ax.plot(ns, ts, "o-", color=colors[m], label=label, ms=4, lw=1.6)
                ymin, ymax = min(ymin, min(ts)), max(ymax, max(ts))
            extra = [x for x in est if not full or x["n"] >= full[-1]["n"]]
            if extra:
                efit = fits.get("sampled")
                elabel = f"{LABELS[m].split(' ', 1)[0]} estimated from a sample"
                if efit:
                    f = efit["top"]["n"]
                    elabel += f": slope {f['slope']:.2f}" + (f" [{f['ci'][0]:.2f}, {f['ci'][1]:.2f}]" if f["ci"] else "")
                ns, ts = [x["n"] for x in extra], [x["seconds"] for x in extra]
                ax.plot(ns, ts, "o--", color=colors[m], mfc="white", ms=4, lw=1.1, label=elabel)
                ymin, ymax = min(ymin, min(ts)), max(ymax, max(ts))
            for key, style in (("full", ":"), ("sampled", ":")):
                fit = fits.get(key)
                if fit:
                    f = fit["top"]["n"]
                    xs = np.array([f["x"][0], f["x"][-1]])
                    ax.plot(xs, np.exp(f["intercept"]) * xs ** f["slope"], style, color="black", lw=0.9, alpha=0.6)
        # guides: slope 3 through backprop's last point, slope 6 through the costliest last point
        guide = [(3, r["methods"].get("backprop", {}).get("full", [])[-1:])]
        ends = [s["sampled"][-1] if s["sampled"] and s["sampled"][-1]["n"] >= (s["full"] or [{"n": 0}])[-1]["n"]
                else (s["full"] or [None])[-1] for m, s in r["methods"].items() if m in PER_PARAMETER]
        ends = [e for e in ends if e]
        if ends:
            guide.append((6, [max(ends, key=lambda e: (e["n"], e["seconds"]))]))
        for slope, point in guide:
            if point:
                n1, t1 = point[0]["n"], point[0]["seconds"]
                xs = np.array([n1 / 8, n1])
                if xs[0] >= 2:
                    ax.plot(xs, t1 * 3 * (xs / n1) ** slope, color="0.55", lw=0.9, ls=(0, (4, 3)))
                    ax.annotate(rf"$\propto n^{slope}$", (xs[0], t1 * 3 * (1 / 8) ** slope), xytext=(-4, 0),
                                textcoords="offset points", ha="right", va="center", fontsize=8, color="0.4")
        for secs, name in ((1e-3, "1 ms"), (1, "1 s"), (60, "1 min"), (3600, "1 h"), (86400, "1 day"),
                           (365.25 * 86400, "1 year")):
            if ymin / 3 < secs < ymax * 3:
                ax.axhline(secs, color="0.7", lw=0.6, ls="--", zorder=0)
                ax.annotate(name, (1.0, secs), xycoords=("axes fraction", "data"), xytext=(-3, 2),
                            textcoords="offset points", ha="right", va="bottom", fontsize=7, color="0.4")
        ax.set_xscale("log", base=2)
        ns = sorted({x["n"] for s in r["methods"].values() for k in ("full", "sampled") for x in s[k]})
        if ns:
            ticks = [2 ** e for e in range(int(math.log2(ns[0])), int(math.log2(ns[-1])) + 1)]
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.set_xticks([], minor=True)
        ax.set_yscale("log")
        ax.set_xlabel("n  (n layers of n units, n inputs; P = n³ + n² parameters)")
        ax.set_ylabel("seconds per full gradient (batch 1, float64)")
        ax.set_title(f"{title} — {dev}", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.text(0.01, 0.005, "filled: measured in full; open: P x mean time per parameter over a sample of parameters "
             "from every layer\ndotted black: least-squares fits over the largest 4 sizes (slopes in the legend, "
             "95% CI); grey dashed: slopes 3 and 6 for reference", fontsize=7, color="0.3")
    fig.tight_layout(rect=(0, 0.035, 1, 1))
    tmp = path + ".tmp"
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, path)


class OtherLoad:
    """The share of the machine's CPU time that other processes used since the last
    ``read()``: all busy time in /proc/stat minus this process's own (Linux; None
    elsewhere). The timings of a size are only as good as this is small."""

    def __init__(self):
        self.cores = os.cpu_count() or 1
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.last = self._now()

    @staticmethod
    def _busy():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        return sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # all but idle and iowait

    def _now(self):
        t = os.times()
        return time.perf_counter(), self._busy(), t.user + t.system

    def read(self):
        then, self.last = self.last, self._now()
        (w0, b0, o0), (w1, b1, o1) = then, self.last
        if b0 is None or b1 is None or w1 <= w0:
            return None
        others = (b1 - b0) / self.tick - (o1 - o0)
        return round(min(1.0, max(0.0, others / ((w1 - w0) * self.cores))), 3)


def load_average():
    """The 1, 5 and 15 minute load averages (None where the OS has none): other work
    running beside the study slows it, and the results say how much there was."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


@contextlib.contextmanager
def blas_threads(n):
    """BLAS limited to ``n`` threads (threadpoolctl); yields how it was done."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield "not pinned: threadpoolctl is missing (set OPENBLAS_NUM_THREADS / OMP_NUM_THREADS before starting)"
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield f"{n} (threadpoolctl)"


def summarise(result, methods, log):
    notes = []
    fits = result["fits"]
    for m in methods:
        f = fits[m]["full"]
        if not f:
            continue
        top, whole = f["top"]["n"], f["all"]["n"]
        if m in PER_PARAMETER and fits[m].get("sampled"):
            e = fits[m]["sampled"]["top"]["n"]
            notes.append(f"{m}: {top['slope']:.2f} over the largest sizes run in full (n <= {int(top['x'][-1])}), "
                         f"{e['slope']:.2f} over the largest estimated (n <= {int(e['x'][-1])}); theory {THEORY[m]}. "
                         f"Over all sizes {whole['slope']:.2f}.")
        else:
            notes.append(f"{m}: {top['slope']:.2f} over n = {int(top['x'][0])}..{int(top['x'][-1])}, "
                         f"{whole['slope']:.2f} over all sizes; theory {THEORY[m]}.")
    series = result["methods"]
    if "forward" in series and "backprop" in series:
        pairs = [(f["n"], b["seconds"] / f["seconds"]) for f in series["forward"]["full"]
                 for b in series["backprop"]["full"] if b["n"] == f["n"]]
        if pairs:
            notes.append("backprop / forward: " + ", ".join(f"n={n}: {r:.2f}" for n, r in pairs))
    if "backprop" in series:
        pub = [(r["n"], r["public_s"] / r["seconds"]) for r in series["backprop"]["full"] if r.get("public_s")]
        if pub:
            notes.append("loss_and_grad / internal backprop: " + ", ".join(f"n={n}: {r:.2f}" for n, r in pub))
    checks = [(m, r["n"], r["estimate_over_full"]) for m in methods for r in series[m]["sampled"]
              if r.get("estimate_over_full")]
    if checks:
        ratios = [c[2] for c in checks]
        notes.append(f"sample estimate / full time at the sizes run both ways: {min(ratios):.2f}..{max(ratios):.2f} "
                     f"({len(checks)} checks)")
    if "forward" in series:
        fwd = series["forward"]["full"][-fit_points_of(result):]
        if fwd:
            rates = ", ".join(f"n={r['n']}: {8 * r['P'] / r['seconds'] / 1e9:.1f}" for r in fwd)
            notes.append("the forward pass reads every weight once; 8 P / t in GB/s: " + rates
                         + " (a time growing like n^3 keeps this constant)")
    for m in methods:
        if m not in PER_PARAMETER:
            continue
        per = [r["seconds"] / (r["P"] * f) for r, f in per_forward(series, m)]
        if per:
            notes.append(f"{m} / (P x forward): {min(per):.2f}..{max(per):.2f} over n = "
                         f"{per_forward(series, m)[0][0]['n']}..{per_forward(series, m)[-1][0]['n']}")
    for line in notes:
        log("  " + line)
    return notes


def fit_points_of(result):
    fits = result["fits"].get("forward", {}).get("full")
    return fits["top"]["n"]["points"] if fits else FIT_POINTS


def per_forward(series, method):
    """[(row, forward seconds at its n)] of ``method``: its full timings, then its estimates
    beyond them, wherever the forward pass was timed at the same n."""
    fwd = {r["n"]: r["seconds"] for r in series.get("forward", {}).get("full", [])}
    rows = {r["n"]: r for r in series[method]["sampled"]}
    rows.update({r["n"]: r for r in series[method]["full"]})
    return [(rows[n], fwd[n]) for n in sorted(rows) if n in fwd]


def relative_table(result, methods):
    """Markdown: each method's time over one forward pass at the same n, against P."""
    series = result["methods"]
    if "forward" not in series:
        return ""
    others = [m for m in methods if m != "forward"]
    lines = ["| n | P | " + " | ".join(LABELS[m] for m in others) + " |", "|---:|---:|" + "---:|" * len(others)]
    for f in series["forward"]["full"]:
        cells = []
        for m in others:
            row = {r["n"]: r for r, _ in per_forward(series, m)}
            r = row.get(f["n"])
            ratio = r["seconds"] / f["seconds"] if r else None
            mark = "~" if r and r not in series[m]["full"] else ""
            cells.append("" if ratio is None else f"{mark}{ratio:.3g}")
        lines.append(f"| {f['n']} | {f['P']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="n values (each >= 2)")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="stop growing n for a method when a timing (or its prediction) exceeds this (default 20)")
    p.add_argument("--sample-seconds", type=float, default=2.0,
                   help="time spent per sampled estimate of a per-parameter method; 0 turns them off (default 2)")
    p.add_argument("--path-sizes", type=int, nargs="*", default=list(PATH_SIZES),
                   help="n values for the path-enumeration footnote (default 2..6; none to skip)")
    p.add_argument("--fit-points", type=int, default=FIT_POINTS, help="largest sizes per fit (default 4, >= 3)")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per size; the median is kept (default 5)")
    p.add_argument("--loop-seconds", type=float, default=0.1,
                   help="calls shorter than this are timed in loops this long (default 0.1)")
    p.add_argument("--device", choices=("cpu", "cuda", "both"), default="both",
                   help="both: the CPU, and CUDA when a GPU is there (default)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "results"),
                   help="folder for complexity-<date>.json/.log/.png (default bench/results)")
    args = p.parse_args(argv)
    if min(args.sizes) < 2 or args.fit_points < 3 or args.threads < 1 or args.max_seconds <= 0 \
            or args.repeats < 1 or args.loop_seconds <= 0:
        p.error("sizes must be >= 2, --fit-points >= 3, --threads and --repeats >= 1, "
                "--max-seconds and --loop-seconds > 0")
    TIMING.update(loop_s=args.loop_seconds, repeats=args.repeats)
    sizes = sorted(set(args.sizes))
    date = datetime.date.today().isoformat()
    log = Log()
    started = time.perf_counter()
    with blas_threads(args.threads) as threads:
        result = {
            "machine": machine(), "date": date, "versions": versions(blas_threads=threads),
            "settings": {"network": "sizes [n] * (n + 1): n inputs, n - 1 tanh hidden layers of n, a linear output "
                                    "layer of n; MSE; batch 1; float64; P = n^3 + n^2",
                         "seed": SEED, "fd_step": FD_STEP, "sizes": sizes, "max_seconds": args.max_seconds,
                         "sample_seconds": args.sample_seconds, "fit_points": args.fit_points,
                         "repeats": args.repeats, "loop_seconds": args.loop_seconds, "threads": args.threads,
                         "tolerance": {m: tolerance(m) for m in METHODS}, "command": sys.argv if argv is None else argv},
        }
        log(f"# Cost of a gradient: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
            f"BLAS threads {threads}, {date}")
        result["load_before"] = load_average()
        probe = OtherLoad()
        time.sleep(1.0)
        result["others_cpu_before"] = busy = probe.read()
        if busy is not None and busy > 0.1:
            log(f"  warning: other processes are using {100 * busy:.0f}% of the CPU: they will slow these timings")
        results = {}
        if args.device in ("cpu", "both"):
            log("## cpu")
            results["cpu"] = run_device("cpu", sizes, METHODS, args, log)
        cuda_note = None
        if args.device in ("cuda", "both"):
            backend, why = cuda_backend()
            if backend is None:
                cuda_note = f"CUDA skipped: {why}"
                log(f"## cuda\n  {cuda_note}")
                results["cuda"] = {"skipped": why}
            else:
                log(f"## cuda ({backend.name}): forward, backprop and finite_diff through the engine on the GPU")
                results["cuda"] = run_device(backend.name, sizes, ENGINE, args, log)
        result["results"] = results
        for dev, r in results.items():
            if "methods" not in r:
                continue
            methods = list(r["methods"])
            r["fits"] = all_fits(r, methods, args.fit_points)
            log(f"\n## {dev}: seconds per full gradient (~: P x mean per parameter over a sample)\n")
            log(table(r, methods))
            log(f"\n## {dev}: fitted exponents, log t = c + k log n over the largest {args.fit_points} sizes\n")
            log(fits_table(r["fits"], methods))
            log(f"\n## {dev}: time over one forward pass at the same n (P = the parameter count; ~: estimated)\n")
            log(relative_table(r, methods))
            log("")
            r["notes"] = summarise(r, methods, log)
        if args.path_sizes:
            log("\n## footnote: every chain-rule path summed separately (cpu)")
            result["paths"] = run_paths(sorted(set(args.path_sizes)), log)
        agree = [a for r in results.values() for a in r.get("agreement", [])] + \
                [dict(a, method="paths", kind="full") for a in result.get("paths", [])]
        bad = [a for a in agree if not a["ok"]]
        worst = {}
        for a in agree:
            worst[a["method"]] = max(worst.get(a["method"], 0.0), a["max_rel_err"])
        log("\n## gradient agreement with backprop (max over tensors of max|g - g_bp| / max|g_bp|), worst over sizes")
        for m, w in worst.items():
            log(f"  {m}: {w:.2e} (tolerance {tolerance(m) if m != 'paths' else DEFAULT_TOLERANCE:.0e})")
        result["agreement_worst"] = worst
        result["agreement_ok"] = not bad
        if bad:
            log(f"  FAILED: {len(bad)} comparisons beyond tolerance: {bad[:5]}")
        if cuda_note:
            result["cuda_note"] = cuda_note
        result["wall_s"] = time.perf_counter() - started
        result["load_after"] = load_average()
        log(f"load average (1, 5, 15 min) before: {result['load_before']}, after: {result['load_after']}")
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"complexity-{date}")
        plot(stem + ".png", {d: r for d, r in results.items()}, "cost of one gradient, n = l = d")
        log(f"\nwrote {stem}.json, .log, .png in {result['wall_s']:.0f} s")
        with open(stem + ".json.tmp", "w") as f:
            json.dump(result, f, indent=1, default=float)
        os.replace(stem + ".json.tmp", stem + ".json")
        with open(stem + ".log", "w") as f:
            f.write("\n".join(log.lines) + "\n")
    if bad:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
