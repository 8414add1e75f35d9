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


def training_curves(history, path, title=""):
    """Loss and accuracy per epoch, training and held-out, side by side."""
    fig = figure((10, 4))
    for ax, key, label in zip(fig.subplots(1, 2), ("loss", "accuracy"), ("cross-entropy loss", "accuracy")):
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


def benchmark_series(result):
    """(case labels, {implementation: samples/s per case}) from a bench/results JSON:
    bench/step_bench.py's rows (ours / torch eager / torch graph) or
    bench/cpu_table.py's (ours / ours via train_step / torch / sklearn)."""
    rows = result.get("rows") or []
    if not rows:
        raise ValueError("the result file has no rows to plot")
    if "ours_samples_per_s" in rows[0]:
        impls = {"gpubackprop": "ours", "PyTorch eager": "torch_eager", "PyTorch CUDA graph": "torch_graph"}
        labels = [f"{'-'.join(map(str, r['net']))}\nb{r['batch']} {r['precision']}" for r in rows]
        series = {name: [r.get(f"{key}_samples_per_s") for r in rows] for name, key in impls.items()}
    else:
        impls = {"gpubackprop": "ours", "gpubackprop train_step": "ours_train_step", "PyTorch": "torch",
                 "scikit-learn": "sklearn"}
        labels = [f"{r['case']}\nb{r['batch']}" for r in rows]
        series = {name: [(r.get(key) or {}).get("samples_per_s") for r in rows] for name, key in impls.items()}
    return labels, {k: v for k, v in series.items() if any(x is not None for x in v)}


def benchmark_chart(result, path):
    """A grouped bar chart of samples/s per case (log scale), one bar per implementation."""
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
    ax.set_ylabel("train-step samples / s")
    ax.set_title(f"{result.get('device') or result.get('machine', {}).get('cpu', '')}, {result.get('date', '')}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    save_png(fig, path)
