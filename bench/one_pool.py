"""An experiment for the CPU-speed issue: one OpenMP thread pool for the GEMMs and the
fused loops, as PyTorch has it, against the CPU backend as shipped.

As shipped, the GEMMs go to NumPy's OpenBLAS or to MKL (cpu_blas chooses by
measurement) and the fused loops run serially: threaded, numba's pool and the BLAS's
spin against each other on the same cores. Here MKL runs on its GNU threading layer
(libgomp) and the ReLU loops on numba's "omp" layer, also libgomp, so both share one
pool. Whole ``fit`` runs of fit_bench's cases (best of 3 per process), each mode in a
fresh process (a process keeps the BLAS and thread layer it started with), the modes
in turn for ``--rounds`` rounds, the best kept:

    numpy-blas      the CPU backend with NumPy's BLAS (GPUBACKPROP_CPU_BLAS=numpy)
    shipped         the CPU backend as users get it (the BLAS chosen by measurement)
    mkl-parallel    MKL on libgomp for every GEMM, and the ReLU loops on both cores

Needs the mkl extra and numba. Run: ``python -m bench.one_pool`` (writes
bench/results/one-pool-<date>.json).
"""

import argparse
import datetime
import json
import os
import subprocess
import sys

import numpy as np

MODES = ("numpy-blas", "shipped", "mkl-parallel")
ENVIRONMENTS = {  # what each mode's process starts with
    "numpy-blas": {"GPUBACKPROP_CPU_BLAS": "numpy"},
    "shipped": {"GPUBACKPROP_CPU_BLAS": "auto"},
    "mkl-parallel": {"GPUBACKPROP_CPU_BLAS": "mkl", "MKL_THREADING_LAYER": "GNU", "NUMBA_THREADING_LAYER": "omp"},
}


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
    from gpubackprop.backend import FusedCpuBackend, cpu_blas, cpu_kernels

    backend = FusedCpuBackend()
    if mode == "mkl-parallel":
        matmul, loops = cpu_blas.mkl().matmul, parallel_relu_loops()

        def loops_of(layer):  # the parallel ReLU loops for hidden layers; the output layer's identity as shipped
            return loops if layer.act.name == "relu" else cpu_kernels.DENSE[layer.act.name]

        class Backend(FusedCpuBackend):  # ReLU nets only: the experiment's cases
            def dense_forward(self, layer, buf, dropout=None):
                matmul(buf.input, layer.W.T, buf.out)
                loops_of(layer)[0](buf.out, layer.b, buf.out)

            def dense_backward(self, layer, buf, dropout=None):
                loops_of(layer)[1](buf.grad, buf.out, layer.db)
                matmul(buf.grad.T, buf.input, layer.dW)
                if buf.grad_prev is not None:
                    matmul(buf.grad, layer.W, buf.grad_prev)

        backend = Backend()
    rates = {}
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
            env = dict(os.environ, **ENVIRONMENTS[mode])
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
