"""solver='lbfgs' against scikit-learn's, on the small tabular sets its users pick it
for: wine and breast_cancer (MLPClassifier) and diabetes (MLPRegressor), features
standardized, a 75/25 split (random_state 0), hidden (100,), max_iter 200, alpha
1e-4, float64 both. Reports the held-out score (accuracy, or R^2) and the time of
``fit`` (timed interleaved, best of the repeats; bench.common). Each library draws
its own starting weights from random_state 0, so the scores differ by that too.

Run: ``python -m bench.lbfgs_bench`` (writes bench/results/lbfgs-<date>.json).
"""

import argparse
import datetime
import json
import os
import warnings

from bench.common import machine, time_interleaved, versions

DATASETS = (("wine", "classifier"), ("breast_cancer", "classifier"), ("diabetes", "regressor"))


def measure(name, kind, repeats):
    from sklearn import datasets, neural_network
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    from gpubackprop import sklearn as ours

    X, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(StandardScaler().fit_transform(X), y, random_state=0)
    cls = {"ours": getattr(ours, f"MLP{kind.title()}"), "sklearn": getattr(neural_network, f"MLP{kind.title()}")}
    settings = dict(hidden_layer_sizes=(100,), solver="lbfgs", max_iter=200, alpha=1e-4, random_state=0)
    fitted = {}

    def fit(impl):
        def run():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ConvergenceWarning: max_iter is part of the setting
                fitted[impl] = cls[impl](**settings).fit(X_tr, y_tr)
        return run

    timings = time_interleaved({impl: fit(impl) for impl in cls}, target_s=1e-9, repeats=repeats)
    return {impl: {"fit_s": timings[impl].best, "score": float(fitted[impl].score(X_te, y_te)),
                   "n_iter": int(fitted[impl].n_iter_)} for impl in cls}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    rows = {name: measure(name, kind, args.repeats) for name, kind in DATASETS}
    lines = ["| data set | ours score | scikit-learn score | ours fit s | scikit-learn fit s | ours / scikit-learn "
             "speed |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['ours']['score']:.4f} | {r['sklearn']['score']:.4f} | {r['ours']['fit_s']:.3f} "
                     f"| {r['sklearn']['fit_s']:.3f} | {r['sklearn']['fit_s'] / r['ours']['fit_s']:.2f}x |")
    print("\n".join(lines))
    stamp = datetime.date.today().isoformat()
    path = os.path.join(args.out, f"lbfgs-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"date": stamp, "machine": machine(), "versions": versions(), "rows": rows,
                   "table": "\n".join(lines)}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
