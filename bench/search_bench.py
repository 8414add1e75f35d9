"""MLPSearchCV (the fits as members of MLPPacks) against scikit-learn's GridSearchCV
with our MLPClassifier (n_jobs 1 and 2) and with scikit-learn's MLPClassifier (n_jobs
1 and 2), on load_digits (X / 16): 12 configurations (learning_rate_init 1e-3, 3e-3,
1e-2 x alpha 1e-4, 1e-3, 1e-2, 1e-1) x 5 stratified folds, hidden (64,), adam,
max_iter 30, random_state 0, float64, the other parameters at scikit-learn's
defaults. Reports each search's wall time (best of the repeats, the searches timed
interleaved after a warm-up of each: imports, compilation, joblib's workers) and its
best_score_ and best_params_, and whether MLPSearchCV's cv_results_ scores equal
GridSearchCV's with our estimator (they should, bit for bit). The machine's load
average is recorded before and after: on a shared machine it moves the times.

Run: ``python -m bench.search_bench`` (writes bench/results/search-<date>.json and
prints the Markdown table); ``--rows``, ``--max-iter``, ``--folds`` and
``--repeats`` shrink it (the smoke test's tiny setting).
"""

import argparse
import datetime
import os
import sys
import time
import warnings

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.neural_network import MLPClassifier as SkMLPClassifier

from bench.common import machine, settle, versions, write_result
from gpubackprop.sklearn import MLPClassifier, MLPSearchCV

GRID = {"learning_rate_init": [1e-3, 3e-3, 1e-2], "alpha": [1e-4, 1e-3, 1e-2, 1e-1]}
MAX_ITER, FOLDS = 30, 5
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
IMPLS = ("MLPSearchCV, ours", "GridSearchCV n_jobs=1, ours", "GridSearchCV n_jobs=2, ours",
         "GridSearchCV n_jobs=1, scikit-learn's", "GridSearchCV n_jobs=2, scikit-learn's")
HEADER = ("| search, estimator | wall s | over MLPSearchCV | best score | best params |",
          "|---|---:|---:|---:|---|")


def settings(max_iter=MAX_ITER):
    """The estimator's parameters, for ours and scikit-learn's alike."""
    return dict(hidden_layer_sizes=(64,), solver="adam", max_iter=max_iter, random_state=0)


def searches(max_iter, folds, grid=GRID):
    """{name: a factory of the unfitted search} for IMPLS."""
    cv = StratifiedKFold(folds)
    ours, theirs = MLPClassifier(**settings(max_iter)), SkMLPClassifier(**settings(max_iter))
    return {IMPLS[0]: lambda: MLPSearchCV(ours, grid, cv=cv),
            IMPLS[1]: lambda: GridSearchCV(ours, grid, cv=cv, n_jobs=1),
            IMPLS[2]: lambda: GridSearchCV(ours, grid, cv=cv, n_jobs=2),
            IMPLS[3]: lambda: GridSearchCV(theirs, grid, cv=cv, n_jobs=1),
            IMPLS[4]: lambda: GridSearchCV(theirs, grid, cv=cv, n_jobs=2)}


def data(rows=None):
    X, y = load_digits(return_X_y=True)
    return (X / 16.0)[:rows], y[:rows]


def run(make, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: max_iter is part of the setting
        return make().fit(X, y)


def measure(X, y, max_iter, folds, repeats):
    """Each search warmed up (a one-epoch search of 2 configurations), then fitted
    ``repeats`` times, the searches interleaved; {name: (seconds of each fit, the last fitted search)}."""
    warm = {"learning_rate_init": [1e-3], "alpha": [1e-4, 1e-3]}
    for make in searches(1, folds, warm).values():
        run(make, X, y)
    times, fitted = {name: [] for name in IMPLS}, {}
    for _ in range(repeats):
        for name, make in searches(max_iter, folds).items():
            settle()
            start = time.perf_counter()
            fitted[name] = run(make, X, y)
            times[name].append(time.perf_counter() - start)
    return times, fitted


def rows_of(times, fitted):
    packed = min(times[IMPLS[0]])
    return [{"impl": name, "wall_s": min(times[name]), "times_s": times[name],
             "over_packed": min(times[name]) / packed, "best_score": float(fitted[name].best_score_),
             "best_params": {k: float(v) for k, v in fitted[name].best_params_.items()}} for name in IMPLS]


def table(rows):
    lines = list(HEADER)
    for r in rows:
        params = ", ".join(f"{k} {v:g}" for k, v in sorted(r["best_params"].items()))
        lines.append(f"| {r['impl']} | {r['wall_s']:.1f} | {r['over_packed']:.2f}x | {r['best_score']:.4f} "
                     f"| {params} |")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=None, help="the first ROWS of digits (default all 1797)")
    p.add_argument("--max-iter", type=int, default=MAX_ITER, help=f"the estimators' max_iter (default {MAX_ITER})")
    p.add_argument("--folds", type=int, default=FOLDS, help=f"stratified folds (default {FOLDS})")
    p.add_argument("--repeats", type=int, default=2, help="each search timed best of this many (default 2)")
    p.add_argument("--out", default=RESULTS, help="folder of the JSON result (default bench/results)")
    return p.parse_args(argv)


def main(argv=None):
    """Measures, prints the caption and table, writes the JSON; returns its path."""
    args = parse_args(argv)
    X, y = data(args.rows)
    load_before = os.getloadavg()
    times, fitted = measure(X, y, args.max_iter, args.folds, args.repeats)
    load_after = os.getloadavg()
    ours, grid = fitted[IMPLS[0]].cv_results_, fitted[IMPLS[1]].cv_results_
    same = all(np.array_equal(ours[k], grid[k]) for k in grid if k.startswith(("split", "mean_test", "rank")))
    stamp = datetime.date.today().isoformat()
    result = {"date": stamp, "machine": machine(), "versions": versions(),
              "settings": {**settings(args.max_iter), "grid": GRID, "folds": args.folds, "rows": len(y),
                           "X": "load_digits / 16", "dtype": "float64", "repeats": args.repeats},
              "load_average_before": load_before, "load_average_after": load_after,
              "packed_scores_equal_gridsearch_ours": bool(same), "rows": rows_of(times, fitted)}
    result["table"] = "\n".join(table(result["rows"]))
    m = result["machine"]
    commit = (result["versions"].get("commit") or "?")[:7]
    result["caption"] = (f"{m['cores']}-core {m['cpu']}, {stamp}, commit {commit}, "
                         f"load average {load_before[0]:.1f} before / {load_after[0]:.1f} after, "
                         f"best of {args.repeats}; MLPSearchCV's scores equal GridSearchCV's with ours: {same}")
    print(result["caption"] + ":\n\n" + result["table"])
    return write_result(args.out, "search", result, sys.stdout)  # the path with the caption and table


if __name__ == "__main__":
    main()
