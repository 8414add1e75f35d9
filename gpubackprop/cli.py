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
preprocessing in its metadata), <out>/history.json and <out>/curves.png. With
--seeds and / or --grid it trains a pack (gb.MLPPack), prints its members' table
and writes <out>/pack.safetensors, <out>/pack.json and, as those three files, its
best member:

    gpubackprop train --dataset digits --seeds 4 --grid lr=1e-3,3e-3 --val-fraction 0.1
Bad input ends with ``gpubackprop: error: ...`` on stderr and exit code 2.
"""

import argparse
import csv
import io
import itertools
import json
import os
import platform
import sys
import warnings

import numpy as np

import gpubackprop as gb

from . import data, modelfile, tabular, validation
from .nn.activations import ACTIVATIONS
from .nn.losses import HUBER_DELTA, LOSSES
from .nn.pack import OPTIMIZERS as PACK_OPTIMIZERS
from .nn.parameters import parameter_count
from .optim.precision import PRECISIONS
from .state import atomic_write
from .tools import plots, selftest

LOSSES_FOR = {"classification": ("cross_entropy", "binary_cross_entropy"),  # the default first
              "regression": ("mse", "huber", "mae", "poisson")}

OPTIMIZERS = {name.lower(): rule for name, rule in gb.optim.OPTIMIZERS.items()}
SCALINGS = ("standard", "minmax", "none")
PIXELS = ("digits", "mnist5k", "idx")  # features already in [0, 1]: not scaled by default
EXPLAIN_MAX_PARAMS = 1000  # a line each
GRID_KEYS = {"lr": "lr", "momentum": "momentum", "weight-decay": "weight_decay"}  # --grid's key: the args' name


def build_parser():
    parser = argparse.ArgumentParser(prog="gpubackprop", description="Backpropagation for multilayer perceptrons.")
    parser.add_argument("--version", action="version", version=f"gpubackprop {gb.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train(commands)
    add_predict(commands)
    add_tools(commands)
    return parser


def add_train(commands):
    t = commands.add_parser("train", help="train an MLP classifier or regressor and evaluate it on held-out data")
    t.add_argument("--dataset", default="digits",
                   help="'digits', 'mnist5k', or a .npz, .csv, .npy or MNIST IDX images file (default digits)")
    t.add_argument("--labels", metavar="FILE",
                   help="the labels file that goes with an IDX images or a .npy features --dataset")
    t.add_argument("--label-column", metavar="NAME|INDEX",
                   help="a CSV --dataset's label column: a header name or an index, negative from the end "
                        "(default the last column)")
    t.add_argument("--drop", nargs="+", default=[], metavar="COLUMN",
                   help="CSV columns to leave out (header names or indexes), such as an id column")
    t.add_argument("--delimiter", help="a CSV --dataset's delimiter (default: sniffed from the file)")
    add_task_arguments(t)
    t.add_argument("--impute", choices=tabular.IMPUTES, default="none",
                   help="fill missing feature values with the training split's mean or median (text columns: "
                        "their most frequent value); default none: missing values are an error that counts them")
    t.add_argument("--max-categories", type=int, default=tabular.MAX_CATEGORIES, metavar="N",
                   help="the most distinct values a text column may one-hot encode "
                        f"(default {tabular.MAX_CATEGORIES})")
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
    t.add_argument("--weight-decay", type=float, metavar="L2",
                   help="the optimizer's weight decay (default 0; 1e-2 for adamw)")
    t.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    t.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    t.add_argument("--precision", default="float32", choices=list(PRECISIONS),
                   help="GEMM / activation precision: tf32, or mixed bf16 / fp16 (CUDA; default float32)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--test-fraction", type=float, default=0.2, help="share of the data held out (default 0.2)")
    t.add_argument("--val-fraction", type=float, default=0.0,
                   help="share of the training split kept for validation (early stopping, the curves); default 0: "
                        "the curves show the held-out split")
    t.add_argument("--early-stopping", type=int, metavar="PATIENCE",
                   help="stop after PATIENCE epochs without a better validation loss, keeping the best weights "
                        "(a --val-fraction of 0.1 unless given)")
    t.add_argument("--checkpoint-every", metavar="N|epoch",
                   help="checkpoint into <out>/checkpoints every N steps, or every epoch (the default); Ctrl-C "
                        "checkpoints the step it stops at")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest sound checkpoint in <out>/checkpoints")
    t.add_argument("--out", help="output folder (default runs/<dataset name>)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--distributed", nargs="?", const="auto", choices=gb.distributed.TRANSPORTS, metavar="TRANSPORT",
                   help="data parallel across the processes mpiexec started: auto (NCCL on GPUs, else MPI), mpi, "
                        "nccl or single; --batch-size is the global batch; rank 0 prints and writes (needs "
                        "gpubackprop[mpi], or gpubackprop[nccl13] for NCCL)")
    add_pack_arguments(t)


def add_pack_arguments(t):
    """train's flags that make it train a pack of models (gpubackprop.MLPPack) at once."""
    t.add_argument("--seeds", metavar="N|S1,S2,...",
                   help="train a pack: N members seeded --seed .. --seed + N - 1, or the seeds listed; every other "
                        "flag as for one model (the data split stays --seed's); writes <out>/pack.safetensors, "
                        "<out>/pack.json and the best member as <out>/model.safetensors")
    t.add_argument("--shared-batches", action="store_true",
                   help="a pack's members train on the same batches (member 0's shuffle) in one step for all of "
                        "them: faster where the first layer is wide and the batch small (MLPPack.fit's "
                        "batches='shared'); member k then equals a lone run on member 0's order of the rows")
    t.add_argument("--grid", nargs="+", action="extend", metavar="KEY=V1,V2,...",
                   help=f"train a pack over every combination of these values ({', '.join(GRID_KEYS)}: the flags "
                        "of those names), each with every --seeds seed (default --seed alone); the best member "
                        "by the validation metric (--val-fraction; else the training loss) is <out>/model.safetensors")


def add_task_arguments(t):
    """train's flags of what is learned: the task, the loss, the weighting of the classes."""
    t.add_argument("--task", choices=tabular.TASKS,
                   help="classification or regression (default: inferred from the target, and said)")
    t.add_argument("--loss", choices=list(LOSSES),
                   help="classification: cross_entropy (default), or binary_cross_entropy (two classes: one logistic "
                        "unit); regression: mse (default), huber, mae, or poisson "
                        "(counts >= 0: the model predicts their mean, and the target is not standardized)")
    t.add_argument("--huber-delta", type=float, metavar="D",
                   help=f"--loss huber's threshold, in standardized target units (default {HUBER_DELTA})")
    t.add_argument("--class-weight", choices=["balanced"],
                   help="classification: weigh each class by n / (classes * its count), as scikit-learn's "
                        "class_weight='balanced'")


def add_predict(commands):
    p = commands.add_parser("predict", help="a trained model's predictions for the rows of a CSV file")
    e = commands.add_parser("evaluate", help="a trained model's metrics on a labelled CSV file")
    for c in (p, e):
        c.add_argument("--model", required=True, help="a model.safetensors written by train")
        c.add_argument("--data", required=True, help="a CSV file with the training file's feature columns")
        c.add_argument("--delimiter", help="the CSV's delimiter (default: sniffed from the file)")
        c.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--out", help="the CSV to write (default: standard output)")
    x = commands.add_parser("export", help="a trained model as an ONNX file (needs gpubackprop[onnx])")
    x.add_argument("--model", required=True, help="a model.safetensors")
    x.add_argument("--onnx", required=True, metavar="PATH", help="the .onnx file to write")
    x.add_argument("--opset", type=int, help="the ONNX opset (default 17)")
    p.add_argument("--proba", action="store_true", help="class probabilities, a column per class, not labels")
    p.add_argument("--id-column", metavar="NAME", help="a column of --data to copy beside each prediction "
                                                      "(default: the row number, from 1)")
    e.add_argument("--label-column", metavar="NAME|INDEX",
                   help="the label column (default: the one the model was trained on)")


def add_tools(commands):
    b = commands.add_parser("bench", help="draw a benchmark result file (bench/results/*.json) as a bar chart")
    b.add_argument("results", help="a JSON file bench/ wrote (bench/results/*.json): steps, fit runs, pytest-benchmark, "
                                   "allreduce or complexity")
    b.add_argument("--out", help="the PNG to write (default: the results path with .png)")
    e = commands.add_parser("explain", help="one training step of a small network with every intermediate shown "
                                            "(z, a, delta, dW, db, the loss and the updated weights)")
    e.add_argument("--sizes", type=int, nargs="+", default=[4, 2, 2, 1], metavar="N",
                   help="layer widths, input first (default 4 2 2 1)")
    e.add_argument("--seed", type=int, default=0, help="draws the weights, x and y (default 0)")
    e.add_argument("--activation", default="sigmoid", choices=sorted(ACTIVATIONS),
                   help="hidden activation (default sigmoid, the textbook's: g' = a (1 - a) checks by hand)")
    e.add_argument("--loss", default="mse", choices=list(LOSSES), help="default mse")
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
        return {"train": train, "predict": predict, "evaluate": evaluate, "export": export_onnx, "bench": bench,
                "explain": explain, "selftest": run_selftest, "info": lambda args: info()}[args.command](args)
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
    decay = {} if args.weight_decay is None else {"weight_decay": args.weight_decay}  # else the optimizer's default
    if args.optimizer == "sgd":
        return gb.optim.SGD(lr, momentum=args.momentum or 0.0, **decay)
    return OPTIMIZERS[args.optimizer](lr, **decay)


def train(args):
    members = _pack_members(args)  # None for one model; a pack's flags are checked before anything starts
    if members is not None:
        return _train(args, gb.distributed.SingleProcess(), print, members)
    comm = gb.distributed.init(args.distributed) if args.distributed else gb.distributed.SingleProcess()
    if comm.size == 1:
        return _train(args, comm, print)
    try:
        return _train(args, comm, print if comm.rank == 0 else _quiet)
    except Exception as e:  # the other ranks would wait for this one in a collective forever
        comm.abort(e)


def _quiet(*args, **kwargs):
    pass


def _check_flags(args):
    """The numbers among train's flags, checked in the flags' own words."""
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--epochs", args.epochs, 0),
                             ("--max-categories", args.max_categories, 1),
                             ("--early-stopping", args.early_stopping, 1), *(("--hidden", n, 1) for n in args.hidden)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if not 0 < args.test_fraction < 1:
        raise ValueError(f"--test-fraction must be between 0 and 1, got {args.test_fraction}")
    if not 0 <= args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.lr is not None and not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.weight_decay is not None and not args.weight_decay >= 0:
        raise ValueError(f"--weight-decay must be >= 0, got {args.weight_decay}")


def _train(args, comm, print, members=None):
    _check_flags(args)
    optimizer = _optimizer(args)
    device = comm.device if args.device == "auto" and comm.device != "auto" else args.device
    backend = gb.get_backend(device)  # fails fast, before the data is read
    print(f"device: {backend.name}")
    if backend.note:
        print(f"  ({backend.note})")
    if comm.size > 1:
        print(f"distributed: {comm.size} ranks ({type(comm).__name__}); global batch {args.batch_size}, "
              f"about {-(-args.batch_size // comm.size)} rows per rank")

    rows, y, layout = _training_data(args)
    task, loss = _task(args, y, print)
    target, train_rows, val_rows, test_rows = _splits(args, y, task, standardize=loss != "poisson")
    scale = args.scale or ("none" if data.dataset_format(args.dataset) in PIXELS else "standard")
    inputs = tabular.Inputs.fit(rows[train_rows], layout["features"], scale, args.impute, args.max_categories)
    counts = f"{target.n_outputs} classes" if task == "classification" else "a regression target"
    print(f"data: {args.dataset}: {len(y)} samples, {len(inputs.columns)} columns -> {inputs.n_features} features, "
          f"{counts}; {len(train_rows)} for training"
          + (f", {len(val_rows)} for validation" if val_rows is not None else "")
          + f", {len(test_rows)} held out; scaling: {inputs.scale}")

    if loss == "binary_cross_entropy" and target.n_outputs != 2:
        raise ValueError(f"--loss binary_cross_entropy is one logistic unit for two classes; this target has "
                         f"{target.n_outputs}: use --loss cross_entropy")
    outputs = 1 if loss == "binary_cross_entropy" else target.n_outputs
    sizes = [inputs.n_features, *args.hidden, outputs]
    settings = dict(activation=args.activation, loss=loss, device=backend, dtype=args.dtype,
                    huber_delta=HUBER_DELTA if args.huber_delta is None else args.huber_delta)
    out = args.out or os.path.join("runs", _run_name(args.dataset))
    metadata = {**layout, "scale": inputs.scale, "task": task, "seed": args.seed, "test_fraction": args.test_fraction,
                "val_fraction": _val_fraction(args), "epochs": args.epochs, "batch_size": args.batch_size}
    checked = val_rows if val_rows is not None else test_rows  # what the curves' val_ lines show
    splits = (rows[train_rows], y[train_rows]), (rows[checked], y[checked]), (rows[test_rows], y[test_rows])
    if members is not None:
        pack = gb.MLPPack(sizes, seeds=[seed for seed, _, _ in members], **settings)
        return _train_pack(args, members, pack, (inputs, target), splits, out, metadata, print)
    model = gb.MLP(sizes, seed=args.seed, precision=args.precision, **settings)
    model.inputs, model.target = inputs, target
    print(f"model: {model}, {model.n_params} parameters; optimizer: {optimizer}")
    history = _fit(args, model, optimizer, splits[0], splits[1], comm, out, metadata)
    if history is None:
        return 130
    _finish(out, model, optimizer, history, metadata, splits[2], print, write=comm.rank == 0)
    return 0


def _finish(out, model, optimizer, history, metadata, held_out, print, write=True):
    """The trained model's held-out scores printed and put in its metadata; then (where
    ``write``: rank 0) the run's files written."""
    metadata["held_out"] = _scores(model, *held_out)
    print(_held_out_line(metadata["held_out"], len(held_out[1])))
    if write:  # every rank holds the same model: rank 0 writes it
        target = model.target
        _write_run(out, model, optimizer, history, metadata, f"{metadata['dataset']}: MLP {model.sizes} "
                   f"({target.task})", print,
                   f"{model.loss} loss" + (" (of the standardized target)" if target.std != 1 or target.mean else ""))


def _fit(args, model, optimizer, train, validation, comm, out, metadata):
    """model.fit with <out>/checkpoints; on Ctrl-C, the model so far saved (rank 0) and None."""
    checkpoints = os.path.join(out, "checkpoints")
    if not args.resume and gb.train.checkpoint.checkpoints(checkpoints):
        raise ValueError(f"{checkpoints} holds the checkpoints of an earlier run: --resume continues it; give "
                         "another --out, or delete that folder, to start afresh")
    callbacks = [gb.callbacks.EarlyStopping("val_loss", args.early_stopping, restore_best_weights=True)] \
        if args.early_stopping else []
    try:
        return model.fit(*train, epochs=args.epochs, batch_size=args.batch_size, optimizer=optimizer,
                         validation_data=validation, progress=not args.no_progress, comm=comm, callbacks=callbacks,
                         checkpoint_dir=checkpoints, checkpoint_every=_checkpoint_every(args.checkpoint_every),
                         resume=args.resume, class_weight=args.class_weight)
    except gb.train.StepInterrupt as e:  # fit held Ctrl-C to the end of a step, and checkpointed it
        if comm.rank == 0:
            os.makedirs(out, exist_ok=True)
            path = os.path.join(out, "model.safetensors")
            model.save(path, optimizer=optimizer, metadata=metadata)
            print(f"gpubackprop: interrupted after step {e.steps}"
                  + ("; training had finished" if e.finished else f"; it is checkpointed in {e.directory}")
                  + f"; the model so far is in {path}; train again with --resume to continue", file=sys.stderr)
    except KeyboardInterrupt:  # at once: a second Ctrl-C, or a data-parallel run
        found = gb.train.checkpoint.checkpoints(checkpoints)
        if comm.rank == 0:
            print("gpubackprop: interrupted; " + (f"the newest checkpoint is {found[-1]} (--resume continues from "
                                                   "it)" if found else "no checkpoint was written yet"),
                  file=sys.stderr)
    return None


# ---- train: a pack (--seeds, --grid) -----------------------------------------------------
def _pack_members(args):
    """None without --seeds and --grid; else the pack's members as (seed, grid point,
    optimizer) triples: every --grid point (a dict of its keys' values) with every
    seed, its optimizer made as the lone run makes it from those flags."""
    if args.seeds is None and not args.grid:
        if args.shared_batches:
            raise ValueError("--shared-batches is for a pack's members: give --seeds and / or --grid, or drop it")
        return None
    _refuse_for_packs(args)
    _check_flags(args)
    seeds = _seed_list(args)
    members = []
    for point in _grid(args):
        flags = argparse.Namespace(**{**vars(args), **{GRID_KEYS[key]: value for key, value in point.items()}})
        try:  # the lone run's checks and optimizer, in the lone run's words
            _check_flags(flags)
            optimizer = _optimizer(flags)
        except ValueError as e:
            raise ValueError(f"--grid {' '.join(f'{key}={value:g}' for key, value in point.items())}: {e}") from None
        members += [(seed, point, optimizer) for seed in seeds]
    return members


def _refuse_for_packs(args):
    """The lone run's flags a pack (gb.MLPPack) has no counterpart for, refused by name."""
    alone = "or train one model at a time without --seeds and --grid"
    for given, message in (
            (args.optimizer not in PACK_OPTIMIZERS, f"--optimizer {args.optimizer}: a pack's members train with "
                                                    f"{' or '.join(PACK_OPTIMIZERS)}; choose one of those, {alone}"),
            (args.distributed is not None, f"--distributed: a pack trains in one process; drop it, {alone}"),
            (args.early_stopping is not None, "--early-stopping: a pack's members train every --epochs; "
                                              f"--val-fraction chooses the best member; drop it, {alone}"),
            (args.checkpoint_every is not None, f"--checkpoint-every: a pack is not checkpointed; drop it, {alone}"),
            (args.resume, f"--resume: a pack is not checkpointed, so there is nothing to resume; drop it, {alone}"),
            (args.precision != "float32", f"--precision {args.precision}: a pack computes in --dtype; drop it, "
                                          f"{alone}"),
            (args.epochs < 1, f"--epochs {args.epochs}: a pack chooses its best member by the metrics of its "
                              "epochs; give --epochs >= 1")):
        if given:
            raise ValueError(f"{message} (--seeds/--grid)")


def _seed_list(args):
    """--seeds: a count N (--seed .. --seed + N - 1) or comma-separated seeds; [--seed] without it."""
    if args.seeds is None:
        return [args.seed]
    try:
        numbers = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < 0 or "," not in args.seeds and numbers[0] < 1:
        raise ValueError(f"--seeds takes a count N >= 1 (seeds --seed .. --seed + N - 1) or seeds >= 0 separated "
                         f"by commas (3,7,11), got {args.seeds!r}")
    return numbers if "," in args.seeds else list(range(args.seed, args.seed + numbers[0]))


def _grid(args):
    """The points of --grid: every combination of its keys' values, each a dict {key:
    value} (one empty point without --grid)."""
    axes = {}
    keys = f"--grid varies {', '.join(GRID_KEYS)} (each member's optimizer's); the data, --batch-size, --epochs " \
           "and the layers are the whole pack's"
    for item in args.grid or []:
        key, sep, values = item.partition("=")
        key = key.strip().replace("_", "-")
        if key not in GRID_KEYS or not sep:
            raise ValueError(f"--grid {item}: not KEY=V1,V2,... of a setting a member can have its own of; {keys}")
        if key in axes:
            raise ValueError(f"--grid names {key} twice; give its values once, separated by commas")
        if getattr(args, GRID_KEYS[key]) is not None:
            raise ValueError(f"--{key} and --grid {key} both set {key}: give its values in --grid alone")
        try:
            axes[key] = [float(v) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"--grid {item}: its values must be numbers separated by commas; {keys}") from None
    return [dict(zip(axes, point)) for point in itertools.product(*axes.values())]


def _train_pack(args, members, pack, encodings, splits, out, metadata, print):
    """The pack trained on the splits as one model would be, its members' table
    printed; the pack, its members' histories and the best member written."""
    (X, y), checked, held_out = splits
    for model in pack.models:
        model.inputs, model.target = encodings
    lead = pack.member(0)
    grid = {key: [point[key] for _, point, _ in members] for key in members[0][1]}
    print(f"pack: {pack.members} members of {lead}, {lead.n_params} parameters each; optimizer: {members[0][2]}"
          + (" (member 0's); --grid " + ", ".join(f"{key} {sorted(set(values))}" for key, values in grid.items())
             if grid else ""))
    hyperparams = {key: [optimizer.hyperparams[key] for _, _, optimizer in members]
                   for key in members[0][2].hyperparams}
    weights = None if args.class_weight is None else lead.row_weights(y, None, args.class_weight)
    with warnings.catch_warnings(record=True) as caught:  # a stopped member's, said as the command's words
        histories = pack.fit(*lead.encoded(X, y), epochs=args.epochs, batch_size=args.batch_size,
                             optimizer=args.optimizer, sample_weight=weights, validation_data=lead.encoded(*checked),
                             batches="shared" if args.shared_batches else "own", **hyperparams)
    for warning in caught:
        print(f"gpubackprop: warning: {warning.message}", file=sys.stderr)
    validated = metadata["val_fraction"] > 0
    best, chosen_by = _best_member(histories, pack.stopped, validated)
    for line in _pack_table(members, histories, pack.stopped, best, validated):
        print(line)
    print(f"best: member {best} (seed {members[best][0]}"
          + "".join(f", {key}={value:g}" for key, value in members[best][1].items())
          + f") by {chosen_by} {histories[best][chosen_by][-1]:.4f}"
          + ("" if validated else " (no validation split: --val-fraction to choose on held-back rows; the held-out "
                                  "split is not used to choose)"))
    os.makedirs(out, exist_ok=True)
    pack.save(os.path.join(out, "pack.safetensors"))
    summary = {"chosen_by": chosen_by, "best": best,
               "members": [{"member": k, "seed": seed, "grid": point, "stopped": pack.stopped[k],
                            "history": histories[k]} for k, (seed, point, _) in enumerate(members)]}
    atomic_write(os.path.join(out, "pack.json"), json.dumps(summary, indent=1).encode())
    print(f"wrote pack.safetensors, pack.json to {out}")
    seed, point, _ = members[best]
    metadata = {**metadata, "seed": seed, "pack": {"member": best, "members": pack.members, "grid": point,
                                                   "chosen_by": chosen_by, "file": "pack.safetensors"}}
    _finish(out, pack.member(best), pack.member(best).optimizer, histories[best], metadata, held_out, print)
    return 0


def _best_member(histories, stopped, validated):
    """(index, history key): the member of the best final validation metric (the loss's
    where it has none), or of the lowest training loss without a validation split;
    accuracies up, losses and errors down (EarlyStopping's rule), ties to the first.
    A stopped member is not chosen: it diverged, and the epochs after its stop hold the
    metrics of no step."""
    metric = next((key for key in histories[0] if key != "loss" and not key.startswith("val_")), "loss")
    key = f"val_{metric}" if validated else "loss"
    sign = -1.0 if "acc" in key else 1.0
    scores = [(sign * h[key][-1], k) for k, h in enumerate(histories) if stopped[k] is None]
    scores = [(score, k) for score, k in scores if np.isfinite(score)]
    if not scores:
        raise ValueError(f"every member was stopped (its gradients went non-finite) or ends with a non-finite {key}: "
                         "no member to choose; lower the learning rates")
    return min(scores)[1], key


def _pack_table(members, histories, stopped, best, validated):
    """The members' table, a line each: index (* the best), seed, grid values, the final
    epoch's metrics (val_ ones named held-out_ where they are of the held-out split)."""
    keys = list(histories[0])
    header = ["member", "seed", *members[0][1], *(k if validated else k.replace("val_", "held-out_") for k in keys)]
    lines = [[f"{k}{'*' if k == best else ''}", str(seed), *(f"{value:g}" for value in point.values()),
              *(f"{histories[k][key][-1]:.4f}" for key in keys)] for k, (seed, point, _) in enumerate(members)]
    if any(step is not None for step in stopped):
        header.append("stopped_at_step")
        for line, step in zip(lines, stopped):
            line.append("" if step is None else str(step))
    widths = [max(len(line[j]) for line in [header, *lines]) for j in range(len(header))]
    return ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in [header, *lines]]


def _task(args, y, print):
    """(task, loss): --task, else inferred from y (and said); --loss checked against it."""
    task, why = (args.task, "as --task says") if args.task else tabular.infer_task(y)
    other = "regression" if task == "classification" else "classification"
    print(f"task: {task} ({why}; --task {other} to change)")
    fitting = LOSSES_FOR[task]
    loss = args.loss or fitting[0]
    if loss not in fitting:
        raise ValueError(f"--loss {loss} does not fit a {task} task; use --loss {' or '.join(fitting)}")
    if args.class_weight and task != "classification":
        raise ValueError("--class-weight weighs classes; this is a regression task")
    if args.huber_delta is not None and loss != "huber":
        raise ValueError(f"--huber-delta is --loss huber's; this run's loss is {loss}")
    if args.huber_delta is not None and not args.huber_delta > 0:
        raise ValueError(f"--huber-delta must be > 0, got {args.huber_delta}")
    return task, loss


def _splits(args, y, task, standardize=True):
    """(target, training, validation or None, held-out row indices): split stratified
    by class for classification; the target encoding fitted (a regression's mean and
    std on the training rows only, unless not ``standardize``)."""
    target = tabular.Target.fit(y, task) if task == "classification" else None

    def split(index, fraction):
        strata = target.encode(y[index]) if target else np.zeros(len(index))  # floats: an unstratified split
        return data.train_test_split(index, strata, fraction, args.seed)[:2]

    train_rows, test_rows = split(np.arange(len(y)), args.test_fraction)
    val_rows = None
    if _val_fraction(args):
        train_rows, val_rows = split(train_rows, _val_fraction(args))
    return target or tabular.Target.fit(y, task, train=train_rows, standardize=standardize), train_rows, val_rows, \
        test_rows


def _val_fraction(args):
    """--val-fraction, 0.1 by default where --early-stopping needs a validation split."""
    return args.val_fraction or (0.1 if args.early_stopping else 0.0)


def _write_run(out, model, optimizer, history, metadata, title, print, loss):
    os.makedirs(out, exist_ok=True)
    model.save(os.path.join(out, "model.safetensors"), optimizer=optimizer, metadata=metadata)
    atomic_write(os.path.join(out, "history.json"), json.dumps(history, indent=1).encode())
    written = ["model.safetensors", "history.json"]
    try:
        plots.training_curves(history, os.path.join(out, "curves.png"), title=title, loss=loss)
        written.append("curves.png")
    except ImportError as e:
        print(f"note: no curves.png: {e}")
    print(f"wrote {', '.join(written)} to {out}")


def _training_data(args):
    """(rows, y, layout): the feature rows (a float array, or an object array of a CSV's
    cells), the targets as given, and the file's layout the model keeps: its column
    names, the label column's name and the feature columns' names."""
    if data.dataset_format(args.dataset) != "csv":
        for flag, value in (("--drop", args.drop), ("--delimiter", args.delimiter)):
            if value:
                raise ValueError(f"{flag} is for CSV files; {args.dataset} is not one")
        X, y = data.load_dataset(args.dataset, labels=args.labels, label_column=args.label_column)
        names = tabular.numbered_names(X.shape[1])
        return X, y, {"dataset": args.dataset, "columns": names, "label": None, "features": names, "header": False}
    names, table = data.read_table(args.dataset, args.delimiter)
    header = names is not None
    names = names if header else tabular.numbered_names(table.shape[1])
    label = data.label_index(args.dataset, args.label_column, names if header else None, table.shape[1])
    dropped = {data.label_index(args.dataset, d, names if header else None, table.shape[1], "dropped")
               for d in args.drop}
    if label in dropped:
        raise ValueError(f"--drop names the label column {names[label]!r}")
    keep = [j for j in range(table.shape[1]) if j != label and j not in dropped]
    if not keep:
        raise ValueError(f"{args.dataset} has no feature column left beside the label")
    for j in keep:  # before the split, so that a message names the file's row
        tabular.column_kind(table[:, j], names[j], first_row=1 + header)
    layout = {"dataset": args.dataset, "columns": names, "label": names[label],
              "features": [names[j] for j in keep], "header": header, "label_column": args.label_column}
    return table[:, keep], table[:, label], layout


def _checkpoint_every(value):
    if value is None or value.strip().lower() == "epoch":
        return "epoch"
    try:
        steps = int(value)
    except ValueError:
        steps = 0
    if steps < 1:
        raise ValueError(f"--checkpoint-every must be a number of steps >= 1 or 'epoch', got {value!r}")
    return steps


def _scores(model, rows, y, confusion=False):
    """The metrics in the target's own terms (and, with ``confusion``, a classifier's
    confusion matrix: rows the true class, columns the predicted), from one forward pass."""
    target = model.target
    if target.task == "classification":
        ids = target.encode(y)
        proba = np.asarray(model.predict_proba(rows), np.float64)
        predicted = proba.argmax(axis=1)
        scores = {"accuracy": float(np.mean(predicted == ids)),
                  "log_loss": float(-np.mean(np.log(np.clip(proba[np.arange(len(ids)), ids], 1e-15, None))))}
        if confusion:
            matrix = np.zeros((target.n_outputs, target.n_outputs), np.int64)
            np.add.at(matrix, (ids, predicted), 1)
            scores["confusion"] = matrix.tolist()
        return scores
    predicted = np.asarray(model.predict(rows), np.float64)
    truth = target.decode(target.encode(y))
    error = predicted - truth
    total = float(np.sum((truth - truth.mean()) ** 2))
    return {"r2": 1.0 - float(np.sum(error ** 2)) / total if total else float("nan"),
            "rmse": float(np.sqrt(np.mean(error ** 2))), "mae": float(np.mean(np.abs(error)))}


def _held_out_line(scores, n, what="held-out"):
    if "accuracy" in scores:
        return f"{what} accuracy: {scores['accuracy']:.4f} ({n} samples)"
    return f"{what} R^2: {scores['r2']:.4f}, RMSE {scores['rmse']:.4g}, MAE {scores['mae']:.4g} ({n} samples)"


# ---- predict and evaluate ------------------------------------------------------------------
def _model_and_rows(args, with_labels=False):
    """(model, feature rows, label cells or None, --data's names and cells): the model
    at --model and --data's rows, matched to the model's input columns by name where
    --data has a header naming them all, else by position (a file laid out as the
    training file, or holding just the feature columns); ``with_labels`` (evaluate):
    the label column too, --label-column or the one the model was trained on."""
    model = gb.load(args.model, device=args.device)
    if model.inputs is None or model.target is None:
        raise ValueError(f"{args.model} has no input transform and target encoding (gpubackprop train writes them "
                         "in its model files); use it from Python: gb.load(path).predict(X)")
    layout = modelfile.load_metadata(args.model)
    layout = layout if isinstance(layout, dict) else {}
    names, table = data.read_table(args.data, args.delimiter)
    width, wanted, trained = table.shape[1], model.inputs.names, layout.get("columns") or []
    as_trained = names is None and width == len(trained)  # headerless, laid out as the training file
    label = None
    if with_labels:
        if args.label_column is not None:
            label = data.label_index(args.data, args.label_column, names, width)
        elif names is not None and layout.get("label") in names:
            label = names.index(layout["label"])
        elif as_trained and layout.get("label") in trained:
            label = trained.index(layout["label"])
        else:
            raise ValueError(f"give --label-column: {args.data} has no column the model knows as its labels"
                             + (f" ({layout['label']!r})" if layout.get("label") else ""))
    if names is not None and all(n in names for n in wanted):
        features = [names.index(n) for n in wanted]
    elif names is not None and layout.get("header"):
        raise ValueError(f"{args.data} lacks the column(s) {[n for n in wanted if n not in names]} the model was "
                         "trained on")
    elif as_trained:
        features = [trained.index(n) for n in wanted]
    elif width - (label is not None) == len(wanted):
        features = [j for j in range(width) if j != label]
    else:
        raise ValueError(f"{args.data} has {width} columns; the model takes {len(wanted)} features "
                         f"({', '.join(wanted)})" + (" and a label column" if label is not None else ""))
    return model, table[:, features], None if label is None else table[:, label], names, table


def predict(args):
    model, rows, _, names, table = _model_and_rows(args)
    if args.proba and model.target.task != "classification":
        raise ValueError("--proba is for classification models; this one is a regression")
    if args.id_column:
        if names is None or args.id_column not in names:
            raise ValueError(f"--id-column {args.id_column!r}: {args.data} has no such column"
                             + (f" (its columns: {names})" if names else " (it has no header row)"))
        ids, id_name = table[:, names.index(args.id_column)], args.id_column
    else:
        ids, id_name = np.arange(1, len(rows) + 1), "row"
    if args.proba:
        values = model.predict_proba(rows)
        header = [id_name] + [f"proba_{c}" for c in model.target.classes]
        lines = ([i, *(f"{p:.6g}" for p in row)] for i, row in zip(ids, values))
    else:
        header = [id_name, "prediction"]
        lines = ([i, _cell(v)] for i, v in zip(ids, model.predict(rows)))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(lines)
    if args.out:
        atomic_write(args.out, text.getvalue().encode())
        print(f"wrote {len(rows)} predictions to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text.getvalue())
    return 0


def _cell(value):
    return f"{value:.6g}" if isinstance(value, (float, np.floating)) else value


def evaluate(args):
    model, rows, labels, _, _ = _model_and_rows(args, with_labels=True)
    scores = _scores(model, rows, labels, confusion=True)
    print(_held_out_line(scores, len(rows), what=os.path.basename(args.data)))
    if model.target.task == "classification":
        print(f"log-loss: {scores['log_loss']:.4f}")
        classes = [str(c) for c in model.target.classes]
        width = max(5, *map(len, classes))
        print("confusion matrix (rows: true class, columns: predicted)")
        print(" " * width + "".join(f" {c:>{width}}" for c in classes))
        for c, line in zip(classes, scores["confusion"]):
            print(f"{c:>{width}}" + "".join(f" {v:>{width}}" for v in line))
    return 0


def export_onnx(args):
    gb.load(args.model).to_onnx(args.onnx, args.opset)
    print(f"wrote {args.onnx}")
    return 0


# ---- bench -----------------------------------------------------------------------------
def bench(args):
    """A bar chart of a benchmark result file (bench/step_bench.py or bench/cpu_table.py)."""
    try:
        with open(args.results) as f:
            result = json.load(f)
    except ValueError as e:
        raise ValueError(f"{args.results} is not a JSON result file ({e})") from None
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
