"""One rank of the data-parallel tests (tests/test_distributed.py), run under mpiexec:

    mpiexec -n 2 python tests/mpi_worker.py SCENARIO OUT_DIR [KEY=VALUE ...]

Every rank builds the model from a different seed (rank 0's must win), trains with
gb.distributed.init(transport) on the data of ``data()``, and writes
OUT_DIR/rank<r>.npz: its final parameters, its history, and the row indices it
trained on per step. Scenarios: "train" (options below), "raise" and "kill" (rank 1
fails after a few steps), "bad-data" (rank 1's X has a column too few), "cli" (the
command line with the remaining arguments). Every rank's stderr is also copied to
OUT_DIR/stderr.<rank>.
"""

import os
import signal
import sys

import numpy as np
from threadpoolctl import threadpool_info

import gpubackprop as gb
from gpubackprop.train import callbacks
from gpubackprop.train.trainer import Trainer

SIZES = [7, 13, 5]


def data(n, dtype):
    rng = np.random.default_rng(1234)
    return rng.standard_normal((n, SIZES[0])).astype(dtype), rng.integers(0, SIZES[-1], n)


def validation(X, y):
    """61 rows (an odd count: the ranks' shards differ) to validate on each epoch."""
    return np.asarray(X[:61]), y[:61]


def options(args):
    opts = {"n": 203, "batch": 37, "epochs": 3, "dtype": "float32", "dropout": 0.0, "optimizer": "adam",
            "checkpoint_every": 0, "resume": 0, "memmap": 0, "transport": "mpi", "device": "cpu",
            "rank1_lr": 0.0}
    for arg in args:
        key, value = arg.split("=", 1)
        opts[key] = type(opts[key])(value) if not isinstance(opts[key], str) else value
    return opts


def optimizer(name, lr=0.0):
    """The run's optimizer; a nonzero ``lr`` replaces its learning rate (and drops SGD's momentum)."""
    if name == "adam":
        return gb.optim.Adam(lr or 1e-2)
    return gb.optim.SGD(lr, momentum=0.0) if lr else gb.optim.SGD(0.05, momentum=0.9)


class Fail(callbacks.Callback):
    """Rank 1 raises, or is killed, at its third step."""

    def __init__(self, how, rank):
        self.how, self.rank = how, rank

    def on_batch_end(self, model, batch, logs):
        if self.rank == 1 and batch == 2:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("injected failure")


def main(scenario, out, *args):
    opts = options(args)
    comm = gb.distributed.init(opts["transport"])
    X, y = data(opts["n"], opts["dtype"])
    if scenario == "bad-data" and comm.rank == 1:
        X = X[:, 1:]
    if opts["memmap"]:
        path = os.path.join(out, f"X-{comm.rank}.npy")
        np.save(path, X)
        X = np.load(path, mmap_mode="r")
    rows = []  # the rows this rank trained on, step by step
    step = Trainer.step

    def spy(self, ws, *a, **kw):
        rows.append([] if ws is None else self.network.backend.to_host(ws.index).tolist())
        return step(self, ws, *a, **kw)

    Trainer.step = spy
    model = gb.MLP(SIZES, seed=comm.rank, dtype=opts["dtype"], dropout=opts["dropout"], device=opts["device"])
    initial = model.state_dict()
    fail = [Fail(scenario, comm.rank)] if scenario in ("raise", "kill") else []
    checkpoints = os.path.join(out, "checkpoints")
    lr = opts["rank1_lr"] if comm.rank == 1 else 0.0  # rank 0's optimizer must win
    history = model.fit(X, y, epochs=opts["epochs"], batch_size=opts["batch"], optimizer=optimizer(opts["optimizer"], lr),
                        progress=False, callbacks=fail, comm=comm, validation_data=validation(X, y),
                        checkpoint_dir=checkpoints if opts["checkpoint_every"] or opts["resume"] else None,
                        checkpoint_every=opts["checkpoint_every"] or None, resume=bool(opts["resume"]))
    np.savez(os.path.join(out, f"rank{comm.rank}.npz"),
             **{f"param.{k}": v for k, v in model.state_dict().items()},
             **{f"initial.{k}": v for k, v in initial.items()},
             **{f"history.{k}": np.array(v) for k, v in history.items()},
             rows=np.array([r for step in rows for r in step], np.int64),
             steps=np.array([len(step) for step in rows], np.int64),
             blas_threads=np.array([p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]))


class _Tee:
    """stderr, and a copy in a file: mpiexec forwards a rank's stderr asynchronously
    and MPI_Abort can end the job before it has (seen under load), so the tests read
    what a rank said from the copy."""

    def __init__(self, stream, path):
        self.stream, self.file = stream, open(path, "w")

    def write(self, text):
        self.file.write(text)
        return self.stream.write(text)

    def flush(self):
        self.file.flush()
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


if __name__ == "__main__":
    scenario, out, *rest = sys.argv[1:]
    rank = os.environ.get("PMI_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or "0"
    sys.stderr = _Tee(sys.stderr, os.path.join(out, f"stderr.{rank}"))
    if scenario == "cli":  # the command line, as `mpiexec -n N gpubackprop ...` runs it
        from gpubackprop.cli import main as cli

        sys.exit(cli(rest))
    main(scenario, out, *rest)
