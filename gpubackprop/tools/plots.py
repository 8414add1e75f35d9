"""Figures, drawn with matplotlib's object API (no pyplot global state) and written
atomically: training curves, and a bar chart of a benchmark result file."""

from io import BytesIO

import numpy as np

from ..state import atomic_write

_HINT = "pip install 'gpubackprop[plot]'"


def figure(size):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(f"drawing figures needs matplotlib: {_HINT}") from None
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path):
    png = BytesIO()
    fig.savefig(png, format="png", dpi=120)
    atomic_write(path, png.getvalue())


def training_curves(history, path, title="", loss="cross-entropy loss"):
    """The loss per epoch, and the accuracy where the history has one (a classifier's),
    training and held-out, side by side; ``loss`` names the loss on its axis. Returns
    the panels' titles."""
    panels = [("loss", loss)] + ([("accuracy", "accuracy")] if history.get("accuracy") else [])
    fig = figure((5 * len(panels), 4))
    for ax, (key, label) in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels):
        for name, style in ((key, "-"), (f"val_{key}", "--")):
            values = history.get(name)
            if values:
                ax.plot(range(1, len(values) + 1), values, style, marker=".",
                        label="held-out" if name.startswith("val_") else "training (mean during the epoch)")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.suptitle(title)
    save_png(fig, path)
    return [label for _, label in panels]


def benchmark_series(result):
    """(case labels, {series: samples/s per case}) from any bench/results JSON with
    throughputs: step_bench.py's and cpu_table.py's rows, fit_bench.py's, one_pool.py's
    modes, allreduce_bench.py's ranks, and pytest-benchmark's runs (its sgemm runs,
    FLOPs and not samples, are left out). complexity_bench.py's seconds-per-size files
    are complexity_chart's."""
    if "benchmarks" in result:
        return _pytest_benchmark_series(result["benchmarks"])
    if "samples_per_s" in result:  # one_pool: {mode: {case: samples/s}}
        modes = result["samples_per_s"]
        cases = list(next(iter(modes.values()), {}))
        return _checked(cases, {mode: [rates.get(c) for c in cases] for mode, rates in modes.items()})
    if "measured" in result:  # allreduce_bench: a step's seconds per case and rank count
        def label(r):
            return f"{r['case']} {'-'.join(map(str, r['net']))}\nb{r['batch']}"

        cases = list(dict.fromkeys(map(label, result["measured"])))
        series = {}
        for r in result["measured"]:
            series.setdefault(f"{r['ranks']} rank(s)", [None] * len(cases))[cases.index(label(r))] = \
                r["batch"] / r["step_s"]
        return _checked(cases, series)
    rows = result.get("rows") or []
    if rows and "ours_samples_per_s" in rows[0]:
        impls = {"gpubackprop": "ours", "PyTorch eager": "torch_eager", "PyTorch CUDA graph": "torch_graph"}
        labels = [f"{'-'.join(map(str, r['net']))}\nb{r['batch']} {r['precision']}" for r in rows]
        return _checked(labels, {name: [r.get(f"{key}_samples_per_s") for r in rows] for name, key in impls.items()})
    names = {"ours": "gpubackprop", "ours_train_step": "gpubackprop train_step", "torch": "PyTorch",
             "sklearn": "scikit-learn", "jax": "JAX jit", "ours_numpy": "gpubackprop, NumPy backend",
             "ours_sklearn": "gpubackprop estimator"}
    impls = [k for k in names if any(isinstance(r.get(k), dict) for r in rows)]
    labels = [f"{r['case']}" + (f"\nb{r['batch']}" if "batch" in r and f"b{r['batch']}" not in r["case"] else "")
              for r in rows]
    return _checked(labels, {names[k]: [(r.get(k) or {}).get("samples_per_s") for r in rows] for k in impls})


def _pytest_benchmark_series(benchmarks):
    labels, series = [], {}
    for b in benchmarks:
        info, params = b.get("extra_info", {}), b.get("params") or {}
        samples = info.get("batch") or (info.get("rows", 0) * info.get("epochs", 0))
        if not samples or "impl" not in params:
            continue
        label = f"{b['group']}\n{'fit' if b['name'].startswith('test_fit') else 'step'}"
        if label not in labels:
            labels.append(label)
        series.setdefault(params["impl"], {})[label] = samples / b["stats"]["min"]
    return _checked(labels, {impl: [values.get(label) for label in labels] for impl, values in series.items()})


def _checked(labels, series):
    series = {k: v for k, v in series.items() if any(x is not None for x in v)}
    if not labels or not series:
        raise ValueError("the result file has no rows to plot")
    return labels, series


def benchmark_chart(result, path):
    """A grouped bar chart of samples/s per case (log scale), one bar per implementation;
    complexity_chart for a complexity_bench file."""
    if isinstance(result.get("results"), dict) and any(isinstance(r, dict) and "methods" in r
                                                       for r in result["results"].values()):
        return complexity_chart(result, path)
    labels, series = benchmark_series(result)
    fig = figure((max(6.0, 1.6 * len(labels)), 4.5))
    ax = fig.subplots()
    width = 0.8 / len(series)
    x = np.arange(len(labels))
    for i, (name, values) in enumerate(series.items()):
        heights = [np.nan if v is None else v for v in values]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=name)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("samples / s trained")
    ax.set_title(_where_and_when(result))
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    save_png(fig, path)


def _where_and_when(result):
    """A result file's device or machine (a dict with "cpu", or a line) and date, as a title."""
    machine = result.get("machine", "")
    where = result.get("device") or (machine.get("cpu", "") if isinstance(machine, dict) else machine)
    return f"{where}, {result.get('date', '')}"[:120]


def complexity_chart(result, path):
    """complexity_bench's seconds per gradient against the parameter count P, one line
    per method and path, log-log, a panel per device."""
    devices = [d for d, r in result["results"].items() if isinstance(r, dict) and r.get("methods")]
    if not devices:
        raise ValueError("the result file has no measurements to plot")
    fig = figure((6 * len(devices), 4.5))
    for ax, device in zip(np.atleast_1d(fig.subplots(1, len(devices))), devices):
        for method, paths in result["results"][device]["methods"].items():
            for name, points in paths.items():
                if not isinstance(points, list):  # "stopped": why a method was not taken further
                    continue
                points = [p for p in points if p.get("seconds") and p.get("P")]
                if points:
                    ax.plot([p["P"] for p in points], [p["seconds"] for p in points], marker=".",
                            label=f"{method} ({name})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters P")
        ax.set_ylabel("seconds per gradient")
        ax.set_title(device)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(_where_and_when(result))
    save_png(fig, path)
