"""Our MLP against scikit-learn's on the small data sets scikit-learn ships: wine,
breast_cancer and digits (MLPClassifier) and diabetes (MLPRegressor), each with the
solvers adam and lbfgs. Both libraries get the same settings: hidden (100,),
alpha 1e-4, random_state 0, max_iter 200, the solver's other parameters at
scikit-learn's defaults (adam: learning_rate_init 1e-3, batch_size min(200, n),
tol 1e-4, n_iter_no_change 10); features standardized, a 75/25 split
(random_state 0), float64 both, ours on device 'cpu'. Reports the held-out score
(accuracy, or R^2), the time of ``fit`` (timed interleaved, best of the repeats;
bench.common) and the speed-up, scikit-learn's fit time / ours. Each library
draws its own starting weights (and adam its own batch order) from random_state
0, so the scores differ by that too.

Run: ``python -m bench.sklearn_datasets`` (all four data sets, both solvers; writes
bench/results/sklearn-datasets-<date>.json and prints the Markdown table).
``--datasets`` and ``--solvers`` pick a subset, ``--max-iter`` shortens the fits
(the test's tiny setting), ``--repeats`` sets the best-of count.
"""

import argparse
import datetime
import os
import sys
import warnings

from bench.common import machine, time_interleaved, versions, write_result

# name -> (estimator kind, what its score is)
DATASETS = {"wine": ("classifier", "accuracy"), "breast_cancer": ("classifier", "accuracy"),
            "diabetes": ("regressor", "R^2"), "digits": ("classifier", "accuracy")}
SOLVERS = ("adam", "lbfgs")
MAX_ITER = 200
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HEADER = ("| data set | solver | score sklearn | score ours | fit s sklearn | fit s ours | speed-up |",
          "|---|---|---:|---:|---:|---:|---:|")


def settings(solver, max_iter=MAX_ITER):
    """The parameters both libraries' estimators get (the rest at their defaults)."""
    return dict(hidden_layer_sizes=(100,), solver=solver, alpha=1e-4, random_state=0, max_iter=max_iter)


def split(name):
    """``name``'s standardized features and targets, split 75/25 (random_state 0)."""
    from sklearn import datasets
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    return train_test_split(StandardScaler().fit_transform(X), y, random_state=0)


def estimators(kind):
    """{"sklearn": factory, "ours": factory}: kwargs -> an unfitted estimator of ``kind``."""
    from sklearn import neural_network

    from gpubackprop import sklearn as ours

    name = f"MLP{kind.title()}"
    theirs, mine = getattr(neural_network, name), getattr(ours, name)
    return {"sklearn": theirs, "ours": lambda **kw: mine(device="cpu", **kw)}


def measure(name, solver, repeats, max_iter=MAX_ITER):
    """One row: both libraries fitted on ``name`` with ``solver``, timed interleaved."""
    kind, metric = DATASETS[name]
    X_tr, X_te, y_tr, y_te = split(name)
    make = estimators(kind)
    params = settings(solver, max_iter)
    fitted = {}

    def fit(impl):
        def run():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ConvergenceWarning: max_iter is part of the setting
                fitted[impl] = make[impl](**params).fit(X_tr, y_tr)
        return run

    timings = time_interleaved({impl: fit(impl) for impl in make}, target_s=1e-9, repeats=repeats)
    row = {"dataset": name, "solver": solver, "kind": kind, "metric": metric,
           "n_train": len(y_tr), "n_test": len(y_te), "n_features": X_tr.shape[1]}
    for impl in make:
        row[impl] = {"score": float(fitted[impl].score(X_te, y_te)), "fit_s": timings[impl].best,
                     "n_iter": int(fitted[impl].n_iter_), "timing": timings[impl].as_dict()}
    row["speedup"] = row["sklearn"]["fit_s"] / row["ours"]["fit_s"]
    return row


def table(rows):
    """The Markdown table of ``rows`` (HEADER's columns), as a list of lines."""
    lines = list(HEADER)
    for r in rows:
        s, o = r["sklearn"], r["ours"]
        lines.append(f"| {r['dataset']} ({r['metric']}) | {r['solver']} | {s['score']:.4f} | {o['score']:.4f} "
                     f"| {s['fit_s']:.3f} | {o['fit_s']:.3f} | {r['speedup']:.2f}x |")
    return lines


def caption(result):
    """One line saying where and when the table was measured, for above it in the README."""
    m, v = result["machine"], result["versions"]
    commit = (v.get("commit") or "unknown")[:7] + ("+changes" if str(v.get("commit")).endswith("+changes") else "")
    return (f"{m['cores']}-core {m['cpu']}, {result['date']}, commit {commit}, scikit-learn {v.get('sklearn')}, "
            f"max_iter {result['settings']['max_iter']}, fit best of {result['repeats']}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    p.add_argument("--solvers", nargs="+", choices=SOLVERS, default=list(SOLVERS))
    p.add_argument("--repeats", type=int, default=3, help="fit timed best of this many (default 3)")
    p.add_argument("--max-iter", type=int, default=MAX_ITER, help=f"both libraries' max_iter (default {MAX_ITER})")
    p.add_argument("--out", default=RESULTS, help="folder of the JSON result (default bench/results)")
    return p.parse_args(argv)


def main(argv=None):
    """Measures, prints the caption and the table, writes the JSON; returns its path."""
    args = parse_args(argv)
    rows = [measure(name, solver, args.repeats, args.max_iter) for name in args.datasets for solver in args.solvers]
    stamp = datetime.date.today().isoformat()
    result = {"date": stamp, "machine": machine(), "versions": versions(),
              "settings": {**settings("<solver>", args.max_iter), "test_size": 0.25, "split_random_state": 0,
                           "features": "standardized", "dtype": "float64", "ours_device": "cpu"},
              "repeats": args.repeats, "rows": rows}
    result["caption"] = caption(result)
    result["table"] = "\n".join(table(rows))
    print(result["caption"] + ":\n\n" + result["table"])
    return write_result(args.out, "sklearn-datasets", result, sys.stdout)  # the path with the caption and table


if __name__ == "__main__":
    main()
