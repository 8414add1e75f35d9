"""CPU train-step measurements shared by ``cpu_table.py`` and ``test_bench_cpu.py``.

A "train step" is one forward pass, cross-entropy loss, backward pass and plain SGD
update (lr 0.01, no momentum) in float32, ReLU hidden layers, 10 classes, on a
fixed random batch. Each ``*_step`` factory below builds a model and its batch and
returns a zero-argument callable that runs exactly one step, so the same bodies are
timed by ``measure_case`` (the table) and by pytest-benchmark (the tests).

    ours              Trainer(model, opt).step(ws) on a workspace loaded once: what
                      MLP.fit runs per batch, minus the batch gather
    ours_train_step   model.train_step(X, y, opt): the public call, with input
                      validation, one-hot encoding and copy-in every step
    torch             nn.Sequential(Linear, ReLU, ...), F.cross_entropy, optim.SGD
    sklearn           MLPClassifier(solver="sgd", ...).partial_fit on the batch

Implementations of one case are timed interleaved (bench.common.time_interleaved):
after warm-up, each repeat runs one ~0.5 s loop of every implementation in turn
(after a short pause that lets the previous library's threads stop spinning), and
the best repeat is kept.

The sgemm ceiling is the best GFLOP/s of the best BLAS here (NumPy's, or MKL's where
the mkl extra is installed) on 4096x4096 float32 matrices: the most BLAS gives this
process, against which a step's useful FLOPs are set.
"""

import statistics

import numpy as np

import gpubackprop as gb
from gpubackprop.backend import cpu_blas
from gpubackprop.train.trainer import Trainer
from bench.common import REPEATS, TARGET_S, have, n_cores, settle, time_call, time_interleaved

LR = 0.01
N_CLASSES = 10
DTYPE = np.float32
SEED = 0
# (layer sizes, batch size)
CASES = (
    ((784, 1024, 1024, 10), 256),
    ((784, 1024, 1024, 10), 4096),
    ((784, 128, 10), 64),
)
IMPLS = ("ours", "ours_train_step", "torch", "sklearn")
CEILING_N = 4096


def case_id(sizes, batch):
    return f"{'-'.join(map(str, sizes))}_b{batch}"


def make_batch(n_in, batch, seed=SEED):
    """A fixed random batch: X uniform in [0, 1) (like scaled pixels), labels 0..9."""
    rng = np.random.default_rng(seed)
    X = rng.random((batch, n_in), dtype=DTYPE)
    y = rng.integers(0, N_CLASSES, batch).astype(np.int64)
    return X, y


def step_flops(sizes, batch):
    """Useful FLOPs of one step: 2 B (3 P_w - n0 n1).

    Forward, weight gradient and input gradient are one B x in x out GEMM each
    (2 B in out FLOPs) for every layer, except that the first layer needs no input
    gradient. Bias, activation, loss and update work is not counted.
    """
    p_w = sum(i * o for i, o in zip(sizes[:-1], sizes[1:]))
    return 2 * batch * (3 * p_w - sizes[0] * sizes[1])


# ---- the steps -------------------------------------------------------------------------

def ours_model(sizes):
    return gb.MLP(list(sizes), activation="relu", loss="cross_entropy", dtype="float32", seed=SEED)


def ours_step(sizes, batch):
    """A Trainer's step on a workspace loaded once (fit's per-batch work minus the gather)."""
    X, y = make_batch(sizes[0], batch)
    model = ours_model(sizes)
    trainer = Trainer(model, gb.optim.SGD(lr=LR))
    ws = model.load_batch(X, y)

    def step():
        return trainer.step(ws)

    return step


def ours_train_step(sizes, batch):
    """The public model.train_step(X, y, opt): validation, one-hot and copy-in included."""
    X, y = make_batch(sizes[0], batch)
    model = ours_model(sizes)
    opt = gb.optim.SGD(lr=LR)

    def step():
        return model.train_step(X, y, opt)

    return step


def torch_step(sizes, batch, threads=None):
    """PyTorch CPU, same sizes and starting weights (copied from ours at seed 0)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.set_num_threads(threads or n_cores())
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    net = nn.Sequential(*layers)
    state = ours_model(sizes).state_dict()
    linears = [m for m in net if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for i, lin in enumerate(linears):
            lin.weight.copy_(torch.from_numpy(state[f"layers.{i}.weight"]))
            lin.bias.copy_(torch.from_numpy(state[f"layers.{i}.bias"]))
    X, y = make_batch(sizes[0], batch)
    x, t = torch.from_numpy(X), torch.from_numpy(y)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.0)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), t)
        loss.backward()
        opt.step()
        return loss

    return step


def sklearn_step(sizes, batch):
    """MLPClassifier.partial_fit on the one batch: one call is one SGD step.

    shuffle=False so that partial_fit slices the batch instead of gathering a
    shuffled copy of it every call (one batch, so the order does not matter).
    """
    from sklearn.neural_network import MLPClassifier

    X, y = make_batch(sizes[0], batch)
    clf = MLPClassifier(
        hidden_layer_sizes=tuple(sizes[1:-1]), activation="relu", solver="sgd",
        learning_rate_init=LR, momentum=0.0, batch_size=batch, alpha=0.0,
        shuffle=False, random_state=SEED,
    )
    classes = np.arange(N_CLASSES)

    def step():
        return clf.partial_fit(X, y, classes=classes)

    return step


STEPS = {"ours": ours_step, "ours_train_step": ours_train_step, "torch": torch_step, "sklearn": sklearn_step}
NEEDS = {"torch": "torch", "sklearn": "sklearn"}


def available_impls():
    """The implementations whose library is installed."""
    return [name for name in IMPLS if name not in NEEDS or have(NEEDS[name])]


# ---- the ceiling ---------------------------------------------------------------------------

def sgemm_libraries():
    """{name: matmul(a, b, out)} of the BLAS libraries this process can multiply with:
    NumPy's, and MKL where the mkl extra is installed (gpubackprop's cpu_blas)."""
    found = {"numpy": cpu_blas.numpy_matmul}
    if cpu_blas.mkl() is not None:
        found["mkl"] = cpu_blas.mkl().matmul
    return found


def sgemm_call(n=CEILING_N, seed=SEED, library="numpy"):
    """(callable running one n x n x n float32 product of ``library`` into a fixed output, its FLOPs)."""
    matmul = sgemm_libraries()[library]
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n), dtype=DTYPE)
    B = rng.standard_normal((n, n), dtype=DTYPE)
    C = np.empty((n, n), dtype=DTYPE)

    def call():
        matmul(A, B, C)

    return call, 2 * n ** 3


def sgemm_ceiling(n=CEILING_N, target_s=TARGET_S, repeats=REPEATS):
    """(best GFLOP/s of the best BLAS here on n x n float32, its Timing)."""
    best = None
    for library in sgemm_libraries():
        call, flops = sgemm_call(n, library=library)
        settle()
        timing = time_call(call, target_s=target_s, repeats=repeats)
        if best is None or flops / timing.best > best[0]:
            best = flops / timing.best, timing
    return best[0] / 1e9, best[1]


# ---- one case ---------------------------------------------------------------------------------

NOISY = 1.15  # median / best above this marks a cell whose repeats disagree


def measure_case(sizes, batch, ceiling_gflops=None, impls=None, target_s=TARGET_S, repeats=REPEATS):
    """Every number of one table row, as a dict (None where an implementation is missing).

    The implementations are timed interleaved (see time_interleaved). Without a
    ceiling the fractions stay None until ``set_ceiling``.
    """
    impls = [name for name in IMPLS if name in (available_impls() if impls is None else impls)]
    flops = step_flops(sizes, batch)
    row = {"case": "-".join(map(str, sizes)), "sizes": list(sizes), "batch": batch, "step_flops": flops}
    steps = {name: STEPS[name](sizes, batch) for name in impls}
    timings = time_interleaved(steps, target_s=target_s, repeats=repeats)
    for name in IMPLS:
        if name not in impls:
            row[name] = None
            continue
        timing = timings[name]
        gflops = flops / timing.best / 1e9
        row[name] = {
            "step_s": timing.best,
            "samples_per_s": batch / timing.best,
            "gflops": gflops,
            "ceiling_fraction": None,
            "noisy": timing.median / timing.best > NOISY,
            "timing": timing.as_dict(),
            "last_loss": loss_value(steps[name]()),
        }
    ours, torch_ = row.get("ours"), row.get("torch")
    row["ours_over_torch"] = ours["samples_per_s"] / torch_["samples_per_s"] if ours and torch_ else None
    if ceiling_gflops:
        set_ceiling(row, ceiling_gflops)
    return row


def merge_rows(a, b):
    """One row from two measurements of the same case: each cell keeps its faster
    measurement, with the repeats of both in its timing."""
    out = dict(a)
    for name in IMPLS:
        ca, cb_ = a.get(name), b.get(name)
        if not (ca and cb_):
            continue
        best, other = (ca, cb_) if ca["step_s"] <= cb_["step_s"] else (cb_, ca)
        cell = dict(best)
        cell["timing"] = dict(best["timing"], repeat_means_s=ca["timing"]["repeat_means_s"] + cb_["timing"]["repeat_means_s"])
        cell["timing"]["median_s"] = statistics.median(cell["timing"]["repeat_means_s"])
        cell["noisy"] = cell["timing"]["median_s"] / cell["step_s"] > NOISY
        out[name] = cell
    ours, torch_ = out.get("ours"), out.get("torch")
    out["ours_over_torch"] = ours["samples_per_s"] / torch_["samples_per_s"] if ours and torch_ else None
    return out


def set_ceiling(row, ceiling_gflops):
    """Fill in each cell's fraction of the sgemm ceiling."""
    for name in IMPLS:
        if row.get(name):
            row[name]["ceiling_fraction"] = row[name]["gflops"] / ceiling_gflops


def loss_value(result):
    """The step's loss as a float (a sanity check that training did not blow up)."""
    if hasattr(result, "loss_curve_"):  # sklearn returns the estimator
        return float(result.loss_)
    if hasattr(result, "item"):
        return float(result.item())
    return float(result)
