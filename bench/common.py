"""What every benchmark in bench/ shares: the machine's facts, the versions of the
engine and its peers, and the interleaved best-of timing.

    machine facts   n_cores(), cpu_model(), numpy_blas(), machine(), have(module)
    versions        versions(device=None, blas_threads=None), commit(), git_state()
    timing          time_call(fn) and time_interleaved({name: fn}) -> Timing,
                    built of calibrate, loop_mean and settle
    results         write_result(out, name, result): bench/results/<name>-<date>.json

Timing: implementations of one case are timed interleaved. Each is warmed up and
its loop sized to ~``target_s``; then each repeat runs one loop of every
implementation in turn (after a short pause that lets the previous library's
threads stop spinning), and the best repeat is kept.
"""

import contextlib
import datetime
import functools
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from gpubackprop.backend import cpu_blas
from gpubackprop.backend.cpu_blas import cpu_name as cpu_model  # noqa: F401 (bench's name for it)
from gpubackprop.backend.cpu_blas import usable_cores as n_cores

TARGET_S = 0.5  # length of one timed repeat
# Pause before timing one library after another. Thread pools spin for a while
# after their last call (OpenBLAS ~0.1 s) and on 2 cores a spinning pool takes a
# core from the next library's: without the pause torch ran up to 2x slower when
# timed right after ours.
SETTLE_S = 0.3
REPEATS = 5
# The peers whose versions a result records (None when not installed): module names.
PEERS = ("scipy", "sklearn", "torch", "jax", "cupy", "mpi4py")


# ---- the machine ------------------------------------------------------------------------

def have(module):
    """Whether ``module`` (torch, sklearn, jax) can be imported."""
    return importlib.util.find_spec(module) is not None


def numpy_blas():
    """numpy's BLAS as built (show_config) and, when threadpoolctl is there, as loaded."""
    info = {}
    try:
        deps = np.show_config(mode="dicts").get("Build Dependencies", {})
        blas = deps.get("blas", {})
        info = {k: blas.get(k) for k in ("name", "version", "openblas configuration") if blas.get(k) is not None}
    except Exception as e:  # show_config's layout is not a stable API
        info = {"error": repr(e)}
    try:
        from threadpoolctl import threadpool_info

        for lib in threadpool_info():
            if lib.get("user_api") == "blas" and "numpy" in lib.get("filepath", ""):
                info["runtime"] = {k: lib.get(k) for k in ("internal_api", "version", "architecture", "num_threads", "threading_layer")}
                break
    except ImportError:
        pass
    return info


def machine():
    """{"cpu", "cores", "platform"}: what a result file says it ran on."""
    return {"cpu": cpu_model(), "cores": n_cores(), "platform": platform.platform()}


# ---- versions ---------------------------------------------------------------------------

def versions(device=None, blas_threads=None):
    """Python, NumPy (and its BLAS), gpubackprop, its commit (``commit``) and where it
    was imported from (``git``), and every peer of PEERS (None when not installed;
    torch_threads once torch is in use). With ``device``, the selftest's facts of
    that backend too (CuPy, CUDA runtime and driver, the GPU); with ``blas_threads``,
    that (how the BLAS was pinned)."""
    import gpubackprop as gb

    v = {"python": platform.python_version(), "numpy": np.__version__, "numpy_blas": numpy_blas(),
         "gpubackprop": gb.__version__, "numba": peer_version("numba"),
         "cpu_backend": type(gb.get_backend("cpu")).__name__, "mkl": cpu_blas.mkl_version(),
         "cpu_blas": os.environ.get("GPUBACKPROP_CPU_BLAS", "auto")}
    for module in PEERS:
        v[module] = peer_version(module)
    if "torch" in sys.modules:
        v["torch_threads"] = sys.modules["torch"].get_num_threads()
    if device is not None:
        from gpubackprop.tools import selftest

        v.update(selftest.versions(gb.get_backend(device)))
    if blas_threads is not None:
        v["blas_threads"] = blas_threads
    v["commit"] = commit()
    v["git"] = git_state()
    return v


@functools.lru_cache(maxsize=None)
def _distributions():
    from importlib import metadata

    return metadata.packages_distributions()


def peer_version(module):
    """``module``'s version, None when it is not installed. Read from the module when
    it is imported already, else from its distribution's metadata: asking does not
    import torch or jax into a process that is timing something else."""
    if module in sys.modules:
        return getattr(sys.modules[module], "__version__", None)
    if not have(module):
        return None
    from importlib import metadata

    for dist in _distributions().get(module, []):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return None


def _git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)


def commit():
    """The checkout's git commit (with '+changes' when its tracked files differ), or
    None. BENCH_COMMIT overrides it where the checkout was copied without its history."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = _git("rev-parse", "HEAD", cwd=here)
        dirty = _git("status", "--porcelain", "--untracked-files=no", cwd=here)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode or dirty.returncode:
        return None
    return sha.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def git_state():
    """Which engine was measured: the imported gpubackprop's folder, the commit it is
    checked out at, and whether its sources differ from that commit. Outside a git
    checkout (a ``git archive`` snapshot), the commit the environment variable
    GPUBACKPROP_SOURCE_COMMIT names, if any."""
    import gpubackprop as gb

    package = os.path.dirname(os.path.abspath(gb.__file__))
    root = os.path.dirname(package)
    state = {"gpubackprop": package, "head": None, "gpubackprop_changes": None}
    try:
        head = _git("rev-parse", "--show-toplevel", "HEAD", cwd=root)
        lines = head.stdout.split()
        if head.returncode == 0 and len(lines) == 2 and os.path.samefile(lines[0], root):
            dirty = _git("status", "--porcelain", "--", "gpubackprop", cwd=root).stdout.split("\n")
            state.update(head=lines[1], gpubackprop_changes=[line.strip() for line in dirty if line.strip()])
            return state
    except (OSError, subprocess.SubprocessError):
        pass
    if os.environ.get("GPUBACKPROP_SOURCE_COMMIT"):
        state.update(head=os.environ["GPUBACKPROP_SOURCE_COMMIT"], source="a snapshot of that commit")
    return state


# ---- timing -----------------------------------------------------------------------------

@dataclass
class Timing:
    """Seconds per call: ``best`` of the per-repeat means, each over ``loop`` calls."""

    best: float
    loop: int
    means: list = field(default_factory=list)

    @property
    def median(self):
        return statistics.median(self.means)

    def as_dict(self):
        return {"best_s": self.best, "median_s": self.median, "loop": self.loop, "repeat_means_s": self.means}


def _no_sync():
    pass


def calibrate(fn, target_s=TARGET_S, warmup_s=None, sync=_no_sync):
    """Warm ``fn`` up (at least twice, at least ``warmup_s``, default target_s / 2) and
    return how many calls make a loop of ~``target_s``. ``sync`` waits for work
    ``fn`` queued on a device (GPU calls return before their work is done)."""
    warmup_s = target_s / 2 if warmup_s is None else warmup_s
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        sync()
        calls += 1
        elapsed = time.perf_counter() - t0
        if calls >= 2 and elapsed >= warmup_s:
            break
    # A steady-state loop: the warm-up average still holds the first, cold calls.
    per_call = min(elapsed / calls, loop_mean(fn, 3, sync))
    return max(1, round(target_s / per_call))


def loop_mean(fn, loop, sync=_no_sync):
    """Mean seconds per call over ``loop`` back-to-back calls, from a synced device
    to a synced device."""
    sync()
    t0 = time.perf_counter()
    for _ in range(loop):
        fn()
    sync()
    return (time.perf_counter() - t0) / loop


def settle(seconds=SETTLE_S):
    """Let the thread pools of whatever ran last go idle (see SETTLE_S)."""
    time.sleep(seconds)


def time_call(fn, target_s=TARGET_S, repeats=REPEATS, sync=_no_sync):
    """Best-of-``repeats`` mean time of ``fn()``, each repeat a loop of ~``target_s``: a Timing."""
    return time_interleaved({"fn": fn}, target_s, repeats, sync=sync)["fn"]


def time_interleaved(fns, target_s=TARGET_S, repeats=REPEATS, sync=_no_sync, settle_s=SETTLE_S, around=None):
    """Timings of several callables ({name: fn} -> {name: Timing}), repeats interleaved.

    Each is warmed up and its loop sized first; then every repeat runs one loop of
    each in turn, so a burst of load from elsewhere hits all of them alike instead
    of only the one being timed at the moment. Each loop starts after ``settle()``
    and one untimed call. ``sync`` (a device's synchronize) closes every loop, so a
    loop's time is its device work's; GPUs have no spinning CPU pools: settle_s=0.
    ``around`` ({name: a context manager factory}) is entered around each of that
    callable's loops: what a training loop sets up once, not per step.
    """
    several = len(fns) > 1
    around = around or {}
    loops = {}
    for name, fn in fns.items():
        if several:
            settle(settle_s)
        with around.get(name, contextlib.nullcontext)():
            loops[name] = calibrate(fn, target_s, sync=sync)
    means = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            if several:
                settle(settle_s)
            with around.get(name, contextlib.nullcontext)():
                if several:
                    fn()  # its own threads and caches warm again after the pause
                means[name].append(loop_mean(fn, loops[name], sync))
    return {name: Timing(best=min(m), loop=loops[name], means=m) for name, m in means.items()}


def write_result(out, name, result, stream=None):
    """``result`` as the JSON file <out>/<name>-<today>.json (the folder made where
    missing), said on ``stream`` (stderr by default: stdout holds a table alone); returns
    the path."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}-{datetime.date.today().isoformat()}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}", file=stream or sys.stderr)
    return path
