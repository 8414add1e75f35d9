"""Data-parallel training: N ranks under mpiexec end where one process ends on the
same global batches; rank 0's start wins; shards are disjoint and cover the data;
a rank that fails ends the job instead of hanging it."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import gpubackprop as gb
from gpubackprop import cli, distributed

from . import mpi_worker
from .conftest import require_tool

WORKER = os.path.join(os.path.dirname(__file__), "mpi_worker.py")
HANG = 90  # seconds: a job still running then is hung


def launch(n, *command, timeout=HANG):
    """Run ``command`` on n ranks under mpiexec; (returncode, stdout, stderr, seconds)."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        require_tool("mpi4py (pip install 'gpubackprop[mpi]')")
    bin_dir = os.path.dirname(sys.executable)
    launcher = shutil.which("mpiexec", path=os.pathsep.join([bin_dir, os.environ["PATH"]]))
    if launcher is None:
        require_tool("mpiexec (pip install 'gpubackprop[mpi]' brings MPICH's)")
    env = dict(os.environ)
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers: Open MPI's mpiexec refuses root without these
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    start = time.monotonic()
    proc = subprocess.Popen([launcher, "-n", str(n), *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"mpiexec -n {n} {' '.join(command)} hung for {timeout} s")
    return proc.returncode, out, err, time.monotonic() - start


def mpiexec(n, scenario, out, *opts):
    """tests/mpi_worker.py on n ranks; (returncode, stderr, seconds)."""
    code, _, err, seconds = launch(n, sys.executable, WORKER, scenario, str(out), *opts)
    return code, err, seconds


def ranks(out, n):
    return [np.load(out / f"rank{r}.npz") for r in range(n)]


def one_process(opts, epochs=None, **fit):
    """What a single process trains, from rank 0's seed, on the same global batches."""
    o = mpi_worker.options(opts)
    X, y = mpi_worker.data(o["n"], o["dtype"])
    model = gb.MLP(mpi_worker.SIZES, seed=0, dtype=o["dtype"], dropout=o["dropout"])
    history = model.fit(X, y, epochs=epochs or o["epochs"], batch_size=o["batch"],
                        optimizer=mpi_worker.optimizer(o["optimizer"]), progress=False,
                        validation_data=mpi_worker.validation(X, y), **fit)
    return model.state_dict(), history


def assert_close(result, params, history, rtol):
    """Each tensor within rtol of the reference, relative to its largest entry."""
    for k, v in params.items():
        err = np.abs(result[f"param.{k}"] - v).max() / np.abs(v).max()
        assert err <= rtol, f"{k}: relative error {err:.2e} > {rtol:.0e}"
    for k, v in history.items():
        np.testing.assert_allclose(result[f"history.{k}"], v, rtol=max(rtol, 1e-12), err_msg=k)


# ---- shards -----------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 2, 3, 4, 7, 8])
def test_shards_are_disjoint_cover_the_batch_and_differ_by_at_most_one(size):
    for rows in range(0, 40):
        bounds = [distributed.shard(rows, r, size) for r in range(size)]
        assert bounds[0][0] == 0 and bounds[-1][1] == rows
        assert all(hi == lo for (_, hi), (lo, _) in zip(bounds, bounds[1:]))  # contiguous, no overlap
        counts = [hi - lo for lo, hi in bounds]
        assert min(counts) >= 0 and max(counts) - min(counts) <= 1


# ---- two ranks against one process ------------------------------------------------------
CASES = {
    "float32-adam": ((), 1e-6),
    "float64-sgd-momentum-dropout": (("dtype=float64", "optimizer=sgd", "dropout=0.2"), 1e-12),
    # 7 rows in batches of 3: the last batch has one row, so rank 0's shard is empty.
    "empty-shards": (("n=7", "batch=3", "epochs=4", "dtype=float64"), 1e-12),
    "memmap": (("memmap=1", "dtype=float64"), 1e-12),
    # Rank 1 brings SGD(0.5) without momentum: rank 0's SGD(0.05, momentum=0.9) must win.
    "rank-0-optimizer-wins": (("optimizer=sgd", "rank1_lr=0.5", "dtype=float64"), 1e-12),
}


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_end_where_one_process_ends(tmp_path, case):
    opts, rtol = CASES[case]
    code, err, _ = mpiexec(2, "train", tmp_path, *opts)
    assert code == 0, err
    r0, r1 = ranks(tmp_path, 2)
    params, history = one_process(opts)
    for k in params:
        np.testing.assert_array_equal(r0[f"param.{k}"], r1[f"param.{k}"], err_msg=f"ranks differ in {k}")
        # Each rank was made from its own seed: rank 0's parameters must have won.
        assert not np.array_equal(r0[f"initial.{k}"], r1[f"initial.{k}"]) or k.endswith("bias")
    assert_close(r0, params, history, rtol)
    # Two CPU ranks on one machine share its cores rather than each taking them all.
    if not any(os.environ.get(v) for v in distributed.THREAD_VARS):
        share = max(1, len(os.sched_getaffinity(0)) // 2)
        for r in (r0, r1):
            assert len(r["blas_threads"]) and (r["blas_threads"] == share).all()


def test_ranks_leave_a_thread_count_the_user_set_alone():
    environ = {"OMP_NUM_THREADS": "3"}
    assert distributed.share_cores(4, environ) is None and environ == {"OMP_NUM_THREADS": "3"}
    assert distributed.share_cores(1, {}) is None  # one rank: its cores are all its own


def test_each_epoch_the_shards_are_disjoint_and_cover_the_data(tmp_path):
    opts = ("n=50", "batch=8", "epochs=3")
    code, err, _ = mpiexec(2, "train", tmp_path, *opts)
    assert code == 0, err
    r0, r1 = ranks(tmp_path, 2)
    steps_per_epoch = -(-50 // 8)
    assert len(r0["steps"]) == len(r1["steps"]) == 3 * steps_per_epoch
    per_epoch = []
    for r in (r0, r1):
        ends = np.cumsum(r["steps"])[steps_per_epoch - 1::steps_per_epoch]
        per_epoch.append(np.split(r["rows"], ends[:-1]))
    for mine, theirs in zip(*per_epoch):
        assert not set(mine) & set(theirs)
        assert sorted([*mine, *theirs]) == list(range(50))
    assert not all(np.array_equal(a, b) for a, b in zip(per_epoch[0], per_epoch[0][1:])), "reshuffled every epoch"


# ---- checkpoints across rank counts -----------------------------------------------------
def test_a_run_resumes_on_a_different_number_of_ranks(tmp_path):
    """2 ranks train 2 epochs with checkpoints (the newest is mid-epoch), 1 process
    resumes to 4; and the other way round. Both end where 4 epochs in one go end."""
    opts = ("epochs=2", "checkpoint_every=5")
    params, history = one_process(opts, epochs=4)

    two_then_one = tmp_path / "two-then-one"
    two_then_one.mkdir()
    code, err, _ = mpiexec(2, "train", two_then_one, *opts)
    assert code == 0, err
    resumed, resumed_history = one_process(opts, epochs=4, checkpoint_dir=str(two_then_one / "checkpoints"),
                                           resume=True)
    assert_close({**{f"param.{k}": v for k, v in resumed.items()},
                  **{f"history.{k}": np.array(v) for k, v in resumed_history.items()}}, params, history, 1e-6)

    one_then_two = tmp_path / "one-then-two"
    one_process(opts, checkpoint_dir=str(one_then_two / "checkpoints"), checkpoint_every=5)
    code, err, _ = mpiexec(2, "train", one_then_two, "epochs=4", "resume=1")
    assert code == 0, err
    assert_close(ranks(one_then_two, 2)[0], params, history, 1e-6)


# ---- faults -----------------------------------------------------------------------------
def said(out, rank):
    """What a rank wrote to stderr (mpi_worker keeps a copy: mpiexec may drop it at an abort)."""
    return (out / f"stderr.{rank}").read_text()


def test_a_rank_that_raises_aborts_every_rank_with_its_error(tmp_path):
    code, err, seconds = mpiexec(2, "raise", tmp_path)
    assert code != 0
    assert "rank 1 of 2 failed (RuntimeError: injected failure); aborting all 2 ranks" in said(tmp_path, 1)
    assert not (tmp_path / "rank0.npz").exists()
    assert seconds < HANG


def test_bad_data_on_one_rank_aborts_the_job_before_training(tmp_path):
    code, err, seconds = mpiexec(2, "bad-data", tmp_path)
    assert code != 0
    assert "rank 1 of 2 failed (ValueError: X has 6 features but the model's input size is 7" in said(tmp_path, 1)
    assert seconds < HANG


def test_a_killed_rank_ends_the_job_instead_of_hanging_it(tmp_path):
    code, err, seconds = mpiexec(2, "kill", tmp_path)
    assert code != 0, err
    assert not (tmp_path / "rank0.npz").exists()
    assert seconds < HANG


# ---- the command line ---------------------------------------------------------------------
def test_cli_trains_on_two_ranks_as_on_one_and_only_rank_0_speaks_and_writes(tmp_path):
    command = os.path.join(os.path.dirname(sys.executable), "gpubackprop")
    args = ["train", "--dataset", "digits", "--hidden", "32", "--epochs", "2", "--batch-size", "50", "--no-progress"]
    code, out, err, _ = launch(2, command, *args, "--distributed", "--out", str(tmp_path / "two"))
    assert code == 0, err
    assert out.count("device: cpu") == 1 and "distributed: 2 ranks (MPICommunicator); global batch 50" in out
    assert sorted(os.listdir(tmp_path / "two")) == ["checkpoints", "curves.png", "history.json", "model.safetensors"]
    assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    two, one = gb.load(str(tmp_path / "two" / "model.safetensors")), gb.load(str(tmp_path / "one" / "model.safetensors"))
    assert_close({f"param.{k}": v for k, v in two.state_dict().items()}, one.state_dict(), {}, 1e-6)


def test_cli_error_on_two_ranks_ends_the_job(tmp_path):
    code, err, seconds = mpiexec(2, "cli", tmp_path, "train", "--dataset", str(tmp_path / "missing.csv"),
                                 "--distributed")
    told = said(tmp_path, 0) + said(tmp_path, 1)
    assert code != 0 and "missing.csv" in told and "aborting all 2 ranks" in told
    assert seconds < HANG


# ---- the communicators in one process ----------------------------------------------------
def test_one_process_is_the_default_and_its_collectives_change_nothing(monkeypatch):
    for var in distributed.LAUNCHER_SIZE_VARS:
        monkeypatch.delenv(var, raising=False)
    comm = distributed.init()
    assert isinstance(comm, distributed.SingleProcess) and (comm.rank, comm.size) == (0, 1)
    buf = np.arange(5, dtype=np.float32)
    comm.allreduce_mean(buf)
    comm.allreduce_sum(buf)
    comm.bcast_params(buf)
    np.testing.assert_array_equal(buf, np.arange(5, dtype=np.float32))
    comm.allreduce_mean(buf, weight=0.5)  # the one rank's weight
    np.testing.assert_array_equal(buf, np.arange(5, dtype=np.float32) / 2)
    assert comm.bcast({"a": 1}) == {"a": 1}
    with pytest.raises(ValueError, match="boom"):
        comm.abort(ValueError("boom"))


def test_a_launcher_without_mpi4py_names_the_extra(monkeypatch):
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ImportError, match=r"gpubackprop\[mpi\]"):
        distributed.init()


def test_bad_transport_and_bad_comm_are_refused(rng):
    with pytest.raises(ValueError, match="transport must be one of"):
        distributed.init("gloo")
    X, y = rng.standard_normal((10, 3)), rng.integers(0, 2, 10)
    model = gb.MLP([3, 4, 2], seed=0)
    before = model.state_dict()
    with pytest.raises(TypeError, match="distributed communicator"):
        model.fit(X, y, epochs=1, comm="mpi", progress=False)
    nccl = object.__new__(distributed.NCCLCommunicator)
    nccl.device = "cuda:1"
    with pytest.raises(ValueError, match=r"bound to cuda:1 but the model is on cpu; make the model with device=comm"):
        model.fit(X, y, epochs=1, comm=nccl, progress=False)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


# ---- the GPU paths (a lent GPU) ----------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("transport", ["nccl", "mpi"])
def test_one_gpu_rank_over_nccl_or_staged_mpi_matches_one_process(tmp_path, transport):
    """NCCL's bootstrap (unique id over MPI) and reduction, and MPI's host staging of
    CuPy buffers, on one rank: they must leave the gradients as they are."""
    try:
        gb.get_backend("cuda")
    except gb.DeviceUnavailableError as e:
        pytest.skip(str(e))
    opts = ("dtype=float64", f"transport={transport}", "device=cuda:0")
    code, err, _ = mpiexec(1, "train", tmp_path, *opts)
    assert code == 0, err
    params, history = one_process(opts)
    assert_close(ranks(tmp_path, 1)[0], params, history, 1e-9)
