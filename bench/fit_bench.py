"""Whole training runs on the CPU, the path users run: ``fit`` against PyTorch's and
JAX's idiomatic loops, and our scikit-learn estimator against scikit-learn's.

Every implementation trains the same network (ReLU hidden layers, or tanh with
``--activation tanh``; softmax cross entropy, float32, plain SGD at lr 0.01, the
same starting weights) for ``EPOCHS``
epochs of shuffled mini-batches over the same N rows, and reports samples per
second (N x epochs / time):

    ours          MLP.fit(X, y, epochs, batch_size, SGD(lr), progress=False): checks
                  the data once, reshuffles per epoch, keeps loss and accuracy; on
                  the CPU's backend (fused loops where numba is installed)
    ours_numpy    the same on the NumPy backend alone (no fused loops)
    torch         the idiomatic eager loop: randperm per epoch, index the batch,
                  zero_grad, forward, F.cross_entropy, backward, step; the epoch's
                  loss summed on tensors, read once
    jax           jax.jit of one step that gathers its batch by index from the
                  device-resident data (the fast JAX idiom), SGD by tree_map; a
                  permutation drawn per epoch
    ours_sklearn  gpubackprop.sklearn.MLPClassifier(solver="sgd", max_iter=epochs).fit
    sklearn       sklearn.neural_network.MLPClassifier with the same settings

Implementations are timed interleaved, best of several passes (bench.common).
N is a multiple of the batch, so no implementation compiles or allocates for a
partial last batch. Run: ``python -m bench.fit_bench`` (``--help``).
"""

import argparse
import datetime
import json
import os
import sys
import warnings

import numpy as np

import gpubackprop as gb
from gpubackprop.backend import NumpyBackend
from bench.common import have, machine, n_cores, time_interleaved, versions

LR = 0.01
EPOCHS = 2
SEED = 0
# (layer sizes, batch, steps per epoch): an epoch of ~0.1-1 s on two cores.
CASES = (
    ((784, 128, 10), 64, 96),
    ((784, 128, 10), 256, 48),
    ((784, 1024, 1024, 10), 256, 8),
    ((784, 1024, 1024, 10), 4096, 2),
    ((64, 64, 64, 64, 64, 16), 4096, 8),
)
IMPLS = ("ours", "ours_numpy", "torch", "jax", "ours_sklearn", "sklearn")
NEEDS = {"torch": "torch", "jax": "jax", "ours_sklearn": "sklearn", "sklearn": "sklearn"}
ACTIVATIONS = ("relu", "tanh")  # the hidden layers' g: a name in gpubackprop, scikit-learn and jax.nn


def case_id(sizes, batch):
    return f"{'-'.join(map(str, sizes))}_b{batch}"


def make_data(sizes, rows, seed=SEED):
    rng = np.random.default_rng(seed)
    return rng.random((rows, sizes[0]), dtype=np.float32), rng.integers(0, sizes[-1], rows)


def start_weights(sizes, activation):
    """Our seed-0 initialisation, as (W, b) per layer: every implementation starts here."""
    state = gb.MLP(list(sizes), activation=activation, seed=SEED).state_dict()
    return [(state[f"layers.{i}.weight"], state[f"layers.{i}.bias"]) for i in range(len(sizes) - 1)]


def ours(sizes, batch, X, y, epochs, activation="relu", device="cpu"):
    model = gb.MLP(list(sizes), activation=activation, seed=SEED, device=device)
    opt = gb.optim.SGD(LR)
    return lambda: model.fit(X, y, epochs=epochs, batch_size=batch, optimizer=opt, progress=False)["loss"][-1]


def torch_loop(sizes, batch, X, y, epochs, activation="relu"):
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.set_num_threads(n_cores())
    layers = []
    g = {"relu": nn.ReLU, "tanh": nn.Tanh}[activation]
    for i, (W, b) in enumerate(start_weights(sizes, activation)):
        lin = nn.Linear(W.shape[1], W.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W))
            lin.bias.copy_(torch.from_numpy(b))
        layers += [lin, g()] if i < len(sizes) - 2 else [lin]
    net = nn.Sequential(*layers)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(SEED)

    def run():
        for _ in range(epochs):
            perm, total = torch.randperm(len(Xt), generator=gen), torch.zeros(())
            for start in range(0, len(Xt), batch):
                idx = perm[start:start + batch]
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(net(Xt[idx]), yt[idx])
                loss.backward()
                opt.step()
                total += loss.detach()
        return float(total) / (len(Xt) // batch)

    return run


def jax_loop(sizes, batch, X, y, epochs, activation="relu"):
    import jax
    import jax.numpy as jnp

    params = [(jnp.asarray(W), jnp.asarray(b)) for W, b in start_weights(sizes, activation)]
    g = getattr(jax.nn, activation)

    def loss_fn(params, xb, yb):
        a = xb
        for i, (W, b) in enumerate(params):
            a = a @ W.T + b
            if i < len(params) - 1:
                a = g(a)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(a), yb[:, None], axis=1))

    @jax.jit
    def step(params, X, y, idx):
        loss, grads = jax.value_and_grad(loss_fn)(params, X[idx], y[idx])
        return jax.tree_util.tree_map(lambda p, g: p - LR * g, params, grads), loss

    Xj, yj = jnp.asarray(X), jnp.asarray(y)
    rng, state = np.random.default_rng(SEED), {"params": params}

    def run():
        p = state["params"]
        for _ in range(epochs):
            total = 0.0
            for idx in rng.permutation(len(X)).reshape(-1, batch):
                p, loss = step(p, Xj, yj, idx)
                total = total + loss
        state["params"] = p
        return float(total) / (len(X) // batch)

    return run


def estimator(cls, sizes, batch, X, y, epochs, activation, **extra):
    est = cls(hidden_layer_sizes=tuple(sizes[1:-1]), activation=activation, solver="sgd", batch_size=batch,
              learning_rate_init=LR, momentum=0.0, alpha=0.0, max_iter=epochs, shuffle=True, random_state=SEED, tol=0.0,
              n_iter_no_change=10**6, **extra)

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # max_iter reached: the point here
            return est.fit(X, y).loss_curve_[-1]

    return run


def ours_sklearn(sizes, batch, X, y, epochs, activation="relu"):
    from gpubackprop.sklearn import MLPClassifier

    return estimator(MLPClassifier, sizes, batch, X, y, epochs, activation, dtype="float32")


def sklearn(sizes, batch, X, y, epochs, activation="relu"):
    from sklearn.neural_network import MLPClassifier

    return estimator(MLPClassifier, sizes, batch, X, y, epochs, activation)


def ours_numpy(sizes, batch, X, y, epochs, activation="relu"):
    return ours(sizes, batch, X, y, epochs, activation, device=NumpyBackend())


FACTORIES = {"ours": ours, "ours_numpy": ours_numpy, "torch": torch_loop, "jax": jax_loop, "ours_sklearn": ours_sklearn,
             "sklearn": sklearn}


def available_impls():
    return [name for name in IMPLS if name not in NEEDS or have(NEEDS[name])]


def measure_case(sizes, batch, steps, impls, epochs=EPOCHS, repeats=3, activation="relu"):
    """One row: samples/s of every implementation, and ours over the faster peer."""
    X, y = make_data(sizes, batch * steps)
    runs = {name: FACTORIES[name](sizes, batch, X, y, epochs, activation) for name in impls}
    timings = time_interleaved(runs, target_s=1e-9, repeats=repeats)  # one run per repeat: a run is long
    row = {"case": case_id(sizes, batch), "sizes": list(sizes), "batch": batch, "rows": len(X), "epochs": epochs}
    for name in impls:
        t = timings[name]
        row[name] = {"run_s": t.best, "samples_per_s": len(X) * epochs / t.best, "timing": t.as_dict(),
                     "last_loss": float(runs[name]())}
    rate = {name: row[name]["samples_per_s"] for name in impls}
    peers = [rate[p] for p in ("torch", "jax") if p in rate]
    row["ours_over_faster_peer"] = rate["ours"] / max(peers) if "ours" in rate and peers else None
    if "ours_sklearn" in rate and "sklearn" in rate:
        row["estimator_over_sklearn"] = rate["ours_sklearn"] / rate["sklearn"]
    return row


def markdown(rows, impls):
    head = ["net @ batch"] + [f"{name} samples/s" for name in impls] + ["fit / faster of torch, jax",
                                                                         "estimator / sklearn"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['case'].rsplit('_b', 1)[0].replace('-', ', ')} @ {r['batch']}"]
        cells += [f"{r[name]['samples_per_s']:,.0f}" if r.get(name) else "" for name in impls]
        cells += [f"{r[k]:.2f}x" if r.get(k) else "" for k in ("ours_over_faster_peer", "estimator_over_sklearn")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="folder for fit-cpu-<date>.json (default bench/results)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each, interleaved; the best is kept")
    p.add_argument("--epochs", type=int, default=EPOCHS, help=f"epochs per timed run (default {EPOCHS})")
    p.add_argument("--cases", nargs="*", help="case ids to run (default all), e.g. 784-128-10_b64")
    p.add_argument("--activation", default="relu", choices=ACTIVATIONS, help="the hidden layers' (default relu)")
    args = p.parse_args(argv)
    impls = available_impls()
    cases = [c for c in CASES if not args.cases or case_id(c[0], c[1]) in args.cases]
    facts = machine()
    print(f"# fit on the CPU: {facts['cpu']}, {facts['cores']} cores; float32, {args.activation}, SGD lr {LR}, "
          f"{args.epochs} epochs, best of {args.repeats}", file=sys.stderr)
    rows = []
    for sizes, batch, steps in cases:
        print(f"measuring {case_id(sizes, batch)} ...", file=sys.stderr)
        rows.append(measure_case(sizes, batch, steps, impls, args.epochs, args.repeats, args.activation))
    table = markdown(rows, impls)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    name = "fit-cpu" if args.activation == "relu" else f"fit-cpu-{args.activation}"
    path = os.path.join(args.out, f"{name}-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"date": stamp, "machine": facts, "versions": versions(), "lr": LR,
                   "activation": args.activation, "rows": rows,
                   "table": table}, f, indent=1)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
