"""An experiment for the CPU-speed issue: one OpenMP thread pool for the GEMMs and the
fused loops, as PyTorch has it, against today's two (OpenBLAS's pthreads for the
GEMMs, the loops on the calling thread).

Today the fused loops run serially: threaded, numba's pool and OpenBLAS's spin
against each other on the same cores. Here the GEMMs go to MKL on its GNU threading
layer (libgomp) and the ReLU loops to numba's "omp" layer, also libgomp, so both
share one pool. Whole ``fit`` runs of fit_bench's cases (best of 3 per process),
each mode in a fresh process (a process keeps the BLAS and thread layer it started
with), the modes in turn for ``--rounds`` rounds, the best kept:

    openblas-serial   the CPU backend as shipped
    mkl-serial        the GEMMs through MKL's cblas_sgemm (ctypes); loops serial
    mkl-parallel      and the ReLU forward / backward loops on both cores

Needs the mkl wheel (``pip install mkl``: 221 MB, with Intel's OpenMP) and numba.
Run: ``python -m bench.one_pool`` (writes bench/results/one-pool-<date>.json).
"""

import argparse
import ctypes
import datetime
import json
import os
import subprocess
import sys

import numpy as np

MODES = ("openblas-serial", "mkl-serial", "mkl-parallel")
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
MKL_RT = os.path.join(sys.prefix, "lib", "libmkl_rt.so.3")  # where the mkl wheel puts it


def mkl_matmul():
    """out = a @ b through MKL's cblas_sgemm / cblas_dgemm, for 2-D operands that are
    C- or F-ordered (the transposed views the dense layers pass)."""
    lib = ctypes.CDLL(MKL_RT)
    P, I = ctypes.c_void_p, ctypes.c_int
    gemm = {}
    for name, scalar, dtype in (("cblas_sgemm", ctypes.c_float, "float32"),
                                ("cblas_dgemm", ctypes.c_double, "float64")):
        f = getattr(lib, name)
        f.restype = None
        f.argtypes = [I, I, I, I, I, I, scalar, P, I, P, I, scalar, P, I]
        gemm[dtype] = f

    def operand(x):
        return (NO_TRANS, x.strides[0] // x.itemsize) if x.flags.c_contiguous else (TRANS, x.strides[1] // x.itemsize)

    def matmul(a, b, out):
        (ta, lda), (tb, ldb) = operand(a), operand(b)
        gemm[out.dtype.name](ROW_MAJOR, ta, tb, out.shape[0], out.shape[1], a.shape[1], 1.0, a.ctypes.data,
                             max(lda, 1), b.ctypes.data, max(ldb, 1), 0.0, out.ctypes.data, max(out.shape[1], 1))

    return matmul


def parallel_relu_loops(blocks=8):
    """ReLU's two loops over row blocks on numba's pool; db's partial sums are added in
    block order, so the result does not depend on the thread count."""
    from numba import njit, prange

    @njit(parallel=True)
    def forward(z, b, a):
        C = z.dtype.type
        rows, cols = z.shape
        for r in prange(rows):
            for c in range(cols):
                v = z[r, c] + b[c]
                a[r, c] = C(0) if v < C(0) else v

    @njit(parallel=True)
    def backward(g, a, db):
        C = g.dtype.type
        rows, cols = g.shape
        part = np.zeros((blocks, cols), np.float64)
        for k in prange(blocks):
            for r in range(k * rows // blocks, (k + 1) * rows // blocks):
                for c in range(cols):
                    d = g[r, c] * (C(1) if a[r, c] > C(0) else C(0))
                    g[r, c] = d
                    part[k, c] += d
        for c in range(cols):
            total = 0.0
            for k in range(blocks):
                total += part[k, c]
            db[c] = total

    return forward, backward


def measure(mode):
    """samples/s of fit on every fit_bench case, in this process, under ``mode``."""
    from bench import fit_bench as fb
    from bench.common import time_call
    from gpubackprop.backend import FusedCpuBackend, cpu_kernels

    matmul = mkl_matmul() if mode.startswith("mkl") else (lambda a, b, out: np.matmul(a, b, out=out))
    loops = parallel_relu_loops() if mode == "mkl-parallel" else None

    def loops_of(layer):  # the parallel ReLU loops for hidden layers; the output layer's identity as shipped
        return loops if loops and layer.act.name == "relu" else cpu_kernels.DENSE[layer.act.name]

    class Backend(FusedCpuBackend):  # ReLU nets only: the experiment's cases
        def dense_forward(self, layer, buf, dropout=None):
            matmul(buf.input, layer.W.T, buf.out)
            loops_of(layer)[0](buf.out, layer.b, buf.out)

        def dense_backward(self, layer, buf, dropout=None):
            loops_of(layer)[1](buf.grad, buf.out, layer.db)
            matmul(buf.grad.T, buf.input, layer.dW)
            if buf.grad_prev is not None:
                matmul(buf.grad, layer.W, buf.grad_prev)

    backend, rates = Backend(), {}
    for sizes, batch, steps in fb.CASES:
        X, y = fb.make_data(sizes, batch * steps)
        run = fb.ours(sizes, batch, X, y, fb.EPOCHS, device=backend)
        best = time_call(run, target_s=1e-9, repeats=3).best  # warmed up first; one run per repeat
        rates[fb.case_id(sizes, batch)] = len(X) * fb.EPOCHS / best
    return rates


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=MODES, help="measure one mode in this process (print JSON)")
    p.add_argument("--rounds", type=int, default=2, help="processes per mode, taken in turn (default 2)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    if args.mode:
        print(json.dumps(measure(args.mode)))
        return
    results = {}
    for _ in range(args.rounds):  # the modes in turn, round after round; the best of each kept
        for mode in MODES:
            env = dict(os.environ, NUMBA_THREADING_LAYER="omp")
            if mode.startswith("mkl"):
                env["MKL_THREADING_LAYER"] = "GNU"  # libgomp: the pool numba's omp layer uses
            out = subprocess.run([sys.executable, "-m", "bench.one_pool", "--mode", mode], env=env, check=True,
                                 capture_output=True, text=True).stdout
            rates = json.loads(out.strip().splitlines()[-1])
            results[mode] = {k: max(v, results.get(mode, {}).get(k, 0.0)) for k, v in rates.items()}
            print(mode, {k: f"{v:,.0f}" for k, v in rates.items()}, file=sys.stderr)
    from importlib import metadata

    from bench.common import machine, versions

    stamp = datetime.date.today().isoformat()
    path = os.path.join(args.out, f"one-pool-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"date": stamp, "machine": machine(), "versions": {**versions(), "mkl": metadata.version("mkl")},
                   "rounds": args.rounds, "samples_per_s": results}, f, indent=1)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
