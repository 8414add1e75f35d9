"""The ``gpubackprop`` command: train an MLP on a data set, or describe this install.

    gpubackprop train --dataset digits --hidden 128 64 --epochs 30 --device auto
    gpubackprop train --dataset mnist5k --hidden 128 --device auto   (needs gpubackprop[mnist])
    gpubackprop train --dataset data.csv --label-column species --scale minmax
    mpiexec -n 4 gpubackprop train --dataset mnist5k --distributed   (data parallel: one process per GPU or CPU share)
    gpubackprop bench bench/results/gpu-2026-11-22.json   (a bar chart of a benchmark run)
    gpubackprop explain --sizes 4 2 2 1 --seed 0   (one training step, every number shown)
    gpubackprop selftest --device cuda   (every primitive and mode against NumPy; exit 1 on a failure)
    gpubackprop info

``train`` writes <out>/model.safetensors (model and optimizer state, with the
preprocessing in its metadata), <out>/history.json and <out>/curves.png.
Bad input ends with ``gpubackprop: error: ...`` on stderr and exit code 2.
"""

import argparse
import json
import os
import platform
import sys

import numpy as np

import gpubackprop as gb

from . import data, validation
from .nn.activations import ACTIVATIONS
from .nn.parameters import parameter_count
from .optim.precision import PRECISIONS
from .state import atomic_write
from .tools import plots, selftest

OPTIMIZERS = {name.lower(): rule for name, rule in gb.optim.OPTIMIZERS.items()}
SCALINGS = ("standard", "minmax", "none")
PIXELS = ("digits", "mnist5k", "idx")  # features already in [0, 1]: not scaled by default
EXPLAIN_MAX_PARAMS = 1000  # a line each


def build_parser():
    parser = argparse.ArgumentParser(prog="gpubackprop", description="Backpropagation for multilayer perceptrons.")
    parser.add_argument("--version", action="version", version=f"gpubackprop {gb.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train(commands)
    add_tools(commands)
    return parser


def add_train(commands):
    t = commands.add_parser("train", help="train an MLP classifier and evaluate it on held-out data")
    t.add_argument("--dataset", default="digits",
                   help="'digits', 'mnist5k', or a .npz, .csv, .npy or MNIST IDX images file (default digits)")
    t.add_argument("--labels", metavar="FILE",
                   help="the labels file that goes with an IDX images or a .npy features --dataset")
    t.add_argument("--label-column", metavar="NAME|INDEX",
                   help="a CSV --dataset's label column: a header name or an index, negative from the end "
                        "(default the last column)")
    t.add_argument("--scale", choices=SCALINGS,
                   help="feature scaling fitted on the training split: standard (zero mean, unit variance), "
                        "minmax (training range onto [0, 1]) or none (default standard for .csv, .npz and .npy "
                        "files, none for digits, mnist5k and IDX images, whose pixels are already in [0, 1])")
    t.add_argument("--hidden", type=int, nargs="*", default=[128, 64], metavar="N", help="hidden layer widths (default 128 64)")
    t.add_argument("--activation", default="relu", choices=sorted(ACTIVATIONS))
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--optimizer", default="adam", choices=sorted(OPTIMIZERS))
    t.add_argument("--lr", type=float, help="learning rate (default 1e-3; 0.01 for sgd)")
    t.add_argument("--momentum", type=float, nargs="?", const=0.9, metavar="M",
                   help="SGD momentum (0.9 when given without a value; default none)")
    t.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    t.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    t.add_argument("--precision", default="float32", choices=list(PRECISIONS),
                   help="GEMM / activation precision: tf32, or mixed bf16 / fp16 (CUDA; default float32)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--test-fraction", type=float, default=0.2, help="share of the data held out (default 0.2)")
    t.add_argument("--out", help="output folder (default runs/<dataset name>)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--distributed", nargs="?", const="auto", choices=gb.distributed.TRANSPORTS, metavar="TRANSPORT",
                   help="data parallel across the processes mpiexec started: auto (NCCL on GPUs, else MPI), mpi, "
                        "nccl or single; --batch-size is the global batch; rank 0 prints and writes (needs "
                        "gpubackprop[mpi], or gpubackprop[nccl13] for NCCL)")


def add_tools(commands):
    b = commands.add_parser("bench", help="draw a benchmark result file (bench/results/*.json) as a bar chart")
    b.add_argument("results", help="a JSON file written by bench/step_bench.py or bench/cpu_table.py")
    b.add_argument("--out", help="the PNG to write (default: the results path with .png)")
    e = commands.add_parser("explain", help="one training step of a small network with every intermediate shown "
                                            "(z, a, delta, dW, db, the loss and the updated weights)")
    e.add_argument("--sizes", type=int, nargs="+", default=[4, 2, 2, 1], metavar="N",
                   help="layer widths, input first (default 4 2 2 1)")
    e.add_argument("--seed", type=int, default=0, help="draws the weights, x and y (default 0)")
    e.add_argument("--activation", default="sigmoid", choices=sorted(ACTIVATIONS),
                   help="hidden activation (default sigmoid, the textbook's: g' = a (1 - a) checks by hand)")
    e.add_argument("--loss", default="mse", choices=["mse", "cross_entropy"], help="default mse")
    e.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default 0.1)")
    e.add_argument("--samples", type=int, default=1, help="batch size (default 1)")
    e.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    e.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    e.add_argument("--format", default="text", choices=["text", "markdown"])
    e.add_argument("--png", metavar="PATH", help="also draw the network with its numbers into this PNG")
    s = commands.add_parser("selftest", help="check every primitive, in every dtype and precision mode, and whole "
                                             "training steps on a device against float64 NumPy (exit status 1 on "
                                             "any failure)")
    s.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda: a GPU that cannot be used "
                                                    "is an error, not a silent run on the CPU)")
    s.add_argument("--quick", action="store_true", help="fewer shapes, and no training on digits")
    s.add_argument("--modes", nargs="+", choices=list(selftest.MODES), metavar="MODE",
                   help=f"a subset of {' '.join(selftest.MODES)} (default all)")
    s.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    commands.add_parser("info", help="versions, BLAS, threads and whether a GPU can be used")


def main(argv=None):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (2), --help and --version (0)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    try:
        return {"train": train, "bench": bench, "explain": explain, "selftest": run_selftest,
                "info": lambda args: info()}[args.command](args)
    except (OSError, ValueError, TypeError, ImportError, gb.DeviceUnavailableError) as e:
        print(f"gpubackprop: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gpubackprop: interrupted", file=sys.stderr)
        return 130


# ---- train -----------------------------------------------------------------------------
def _optimizer(args):
    if args.momentum is not None and args.optimizer != "sgd":
        raise ValueError(f"--momentum is for --optimizer sgd; {args.optimizer} keeps its own moments")
    lr = args.lr if args.lr is not None else 0.01 if args.optimizer == "sgd" else 1e-3
    if args.optimizer == "sgd":
        return gb.optim.SGD(lr, momentum=args.momentum or 0.0)
    return OPTIMIZERS[args.optimizer](lr)


def train(args):
    comm = gb.distributed.init(args.distributed) if args.distributed else gb.distributed.SingleProcess()
    if comm.size == 1:
        return _train(args, comm, print)
    try:
        return _train(args, comm, print if comm.rank == 0 else _quiet)
    except Exception as e:  # the other ranks would wait for this one in a collective forever
        comm.abort(e)


def _quiet(*args, **kwargs):
    pass


def _train(args, comm, print):
    optimizer = _optimizer(args)
    device = comm.device if args.device == "auto" and comm.device != "auto" else args.device
    backend = gb.get_backend(device)  # fails fast, before the data is read
    print(f"device: {backend.name}")
    if backend.note:
        print(f"  ({backend.note})")
    if comm.size > 1:
        print(f"distributed: {comm.size} ranks ({type(comm).__name__}); global batch {args.batch_size}, "
              f"about {-(-args.batch_size // comm.size)} rows per rank")

    kind = data.dataset_format(args.dataset)
    X, y = data.load_dataset(args.dataset, labels=args.labels, label_column=args.label_column)
    if y.dtype.kind not in "iu" or y.min() < 0:
        raise ValueError(f"{args.dataset}: labels must be non-negative integer class ids for classification")
    n_classes = int(y.max()) + 1
    if n_classes < 2:
        raise ValueError(f"{args.dataset}: needs at least two classes, found labels {np.unique(y).tolist()}")
    X_train, X_test, y_train, y_test = data.train_test_split(X, y, args.test_fraction, args.seed)
    scale = args.scale or ("none" if kind in PIXELS else "standard")
    standardized = min_max = None
    if scale == "standard":
        X_train, X_test, mean, std = data.standardize(X_train, X_test)
        standardized = {"mean": mean.tolist(), "std": std.tolist()}
    elif scale == "minmax":
        X_train, X_test, low, span = data.min_max_scale(X_train, X_test)
        min_max = {"low": low.tolist(), "span": span.tolist()}
    print(f"data: {args.dataset}: {X.shape[0]} samples, {X.shape[1]} features, {n_classes} classes; "
          f"{len(y_train)} for training, {len(y_test)} held out; scaling: {scale}")

    model = gb.MLP([X.shape[1], *args.hidden, n_classes], activation=args.activation,
                   device=backend, dtype=args.dtype, seed=args.seed, precision=args.precision)
    print(f"model: {model}, {model.n_params} parameters; optimizer: {optimizer}")
    history = model.fit(X_train, y_train, epochs=args.epochs, batch_size=args.batch_size, optimizer=optimizer,
                        validation_data=(X_test, y_test), progress=not args.no_progress, comm=comm)
    accuracy = model.evaluate(X_test, y_test)["accuracy"]
    print(f"held-out accuracy: {accuracy:.4f} ({len(y_test)} samples)")
    if comm.rank != 0:  # every rank holds the same model: rank 0 writes it
        return 0

    out = args.out or os.path.join("runs", _run_name(args.dataset))
    os.makedirs(out, exist_ok=True)
    metadata = {
        "dataset": args.dataset, "labels": args.labels, "label_column": args.label_column,
        "scale": scale, "standardize": standardized, "min_max": min_max,
        "seed": args.seed, "test_fraction": args.test_fraction, "epochs": args.epochs,
        "batch_size": args.batch_size, "held_out_accuracy": accuracy,
    }
    model.save(os.path.join(out, "model.safetensors"), optimizer=optimizer, metadata=metadata)
    atomic_write(os.path.join(out, "history.json"), json.dumps(history, indent=1).encode())
    written = ["model.safetensors", "history.json"]
    try:
        plots.training_curves(history, os.path.join(out, "curves.png"), title=f"{args.dataset}: MLP {model.sizes}")
        written.append("curves.png")
    except ImportError as e:
        print(f"note: no curves.png: {e}")
    print(f"wrote {', '.join(written)} to {out}")
    return 0


# ---- bench -----------------------------------------------------------------------------
def bench(args):
    """A bar chart of a benchmark result file (bench/step_bench.py or bench/cpu_table.py)."""
    with open(args.results) as f:
        result = json.load(f)
    out = args.out or os.path.splitext(args.results)[0] + ".png"
    plots.benchmark_chart(result, out)
    print(f"wrote {out}")
    return 0


# ---- explain ---------------------------------------------------------------------------
def explain(args):
    """One SGD step on a small network, printed with every intermediate (gpubackprop.tools.trace).

    The seed draws the network's initial weights, rounded to 2 decimals, and the
    inputs and targets, also rounded to 2 decimals, so that the step can be checked
    by hand; the biases start at 0, as in every model.
    """
    sizes = validation.check_sizes(args.sizes)
    samples = validation.check_positive_int("--samples", args.samples)
    n_in, n_out = sizes[0], sizes[-1]
    n_params = parameter_count(sizes)
    if n_params > EXPLAIN_MAX_PARAMS:
        raise ValueError(f"explain prints every weight: --sizes {' '.join(map(str, sizes))} has {n_params} parameters, "
                         f"more than {EXPLAIN_MAX_PARAMS}; use gb.trace(model, X, y) on a bigger network")
    if args.loss == "cross_entropy" and n_out < 2:
        raise ValueError(f"cross_entropy needs at least 2 output units, got --sizes {' '.join(map(str, sizes))}")
    backend = gb.get_backend(args.device)
    if backend.note:
        print(backend.note, file=sys.stderr)  # stdout stays the report alone
    model = gb.MLP(sizes, activation=args.activation, loss=args.loss, device=backend, dtype=args.dtype,
                   seed=args.seed)
    model.load_state_dict({name: np.round(v, 2) for name, v in model.state_dict().items()})
    rng = np.random.default_rng(args.seed)
    X = np.round(rng.uniform(-1, 1, (samples, n_in)), 2)
    if args.loss == "cross_entropy":
        y = rng.integers(0, n_out, samples)
    else:
        y = np.round(rng.uniform(0, 1, (samples, n_out)), 2)
    t = gb.trace(model, X, y, gb.optim.SGD(args.lr))
    print(t.to_markdown() if args.format == "markdown" else t.to_text(), end="")
    if args.png:
        t.plot(args.png)
        print(f"wrote {args.png}", file=sys.stderr)
    return 0


# ---- selftest --------------------------------------------------------------------------
def run_selftest(args):
    """The device's primitives and steps against float64 NumPy (gpubackprop.tools.selftest)."""
    backend = gb.get_backend(args.device)
    if backend.note:
        print(backend.note, file=sys.stderr)
    report = selftest.run(backend, quick=args.quick, modes=args.modes)
    if args.json:
        atomic_write(args.json, json.dumps(report.to_dict(), indent=1).encode())
    return 0 if report.passed else 1


def _run_name(dataset):
    name = os.path.basename(os.path.normpath(dataset))
    for ext in (".gz", ".npz", ".npy", ".csv"):
        name = name[: -len(ext)] if name.lower().endswith(ext) else name
    return name or "run"


# ---- info ------------------------------------------------------------------------------
def info():
    print(f"gpubackprop {gb.__version__}")
    print(f"Python {platform.python_version()} ({platform.python_implementation()}, {platform.platform()})")
    print(f"NumPy {np.__version__}, BLAS: {_blas()}")
    print(f"threads: {_threads()}")
    print(f"CUDA: {_cuda()}")
    print(f"torch: {_version('torch') or 'not installed'}")
    return 0


def _blas():
    try:
        deps = np.show_config(mode="dicts")["Build Dependencies"]
        blas = deps["blas"]
    except (TypeError, KeyError):  # NumPy < 1.25 has no mode=; builds without the key
        return "unknown (this NumPy does not report it)"
    return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()


def _threads():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return f"{os.cpu_count()} CPUs (install threadpoolctl to see the BLAS thread pools)"
    pools = [f"{p.get('internal_api')} {p.get('num_threads')}" for p in threadpool_info()]
    return f"{os.cpu_count()} CPUs; pools: {', '.join(pools) or 'none loaded'}"


def _cuda():
    try:
        backend = gb.get_backend("cuda")
    except gb.DeviceUnavailableError as e:
        return f"not available: {e}"
    cupy = backend.xp
    runtime = cupy.cuda.runtime
    props = runtime.getDeviceProperties(backend.index)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    driver = runtime.driverGetVersion()
    return (f"{backend.name} {name} ({props['totalGlobalMem'] / 2**30:.0f} GiB), "
            f"CuPy {cupy.__version__}, driver CUDA {driver // 1000}.{driver % 1000 // 10}")


def _version(package):
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
