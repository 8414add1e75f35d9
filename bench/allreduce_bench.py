"""Data-parallel cost: the gradient allreduce against the train step, measured on 1
and 2 ranks here, and a ring-allreduce model of N GPUs.

    python -m bench.allreduce_bench [--ranks 1 2] [--cases medium,large] [--repeats 7] [--out bench/results]
    python -m bench.allreduce_bench --model-only --gpu-results bench/results/gpu-2026-11-29.json

Measured (each rank runs what ``fit`` runs per step for its shard of one global
batch, float32, SGD; medians of ``--repeats``, each timed between barriers):

    compute      forward, loss, backward and update of the rank's B / N rows
    allreduce    comm.allreduce_mean of the flat gradient buffer (P float32)
    step         the two together: fit's data-parallel step

With 1 rank the communicator is gb.distributed's SingleProcess (no reduction).
Ranks share the machine's cores (each gets cores / N BLAS threads), so here 2
ranks show the cost of the MPI reduction through shared memory, not a speed-up.

Model (``scaling_model``): a ring allreduce moves 2 (N - 1) / N x P x 4 bytes
through each GPU's link; at link bandwidth beta that takes

    T_ar(N) = 2 (N - 1) / N x 4 P / beta       (latency, 2 (N - 1) alpha, left out)

against the compute time per step T_c (one GPU, the benchmark's batch B):

    weak scaling   (B per GPU, global batch N B):   E = T_c / (T_c + T_ar)
    strong scaling (global batch B, B / N per GPU): E = (T_c / N) / (T_c / N + T_ar)

with no overlap of the allreduce and the backward pass (the bound overlap could
lift it to: min(1, T_c / T_ar) in place of T_c / (T_c + T_ar)). T_c is a GPU's
measured float32 step (``--gpu-results``: a bench/step_bench.py result file),
else estimated as the step's FLOPs at 50% of an H100's float32 peak.
Writes ``<out>/allreduce-<date>.json`` and ``.log``; ``--model-only`` prints the
model's table and measures nothing.
"""

import argparse
import datetime
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

from bench.common import cpu_model, n_cores, versions
from bench.cpu_bench import step_flops
from gpubackprop.nn.parameters import parameter_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout: where -m bench.… resolves

CASES = {  # name -> (sizes, global batch): measured here; the networks of step_bench.py
    "medium": ((784, 1024, 1024, 10), 4096),
    "large": ((4096, 4096, 4096, 4096, 10), 512),  # step_bench's 8192 rows take a minute per step on 2 cores
}
GPU_CASES = {  # name -> (sizes, batch of one GPU): modelled, as step_bench.py runs them
    "medium": ((784, 1024, 1024, 10), 4096),
    "large": ((4096, 4096, 4096, 4096, 10), 8192),
}
LINKS = {  # name -> (bytes / s per GPU per direction, what it is)
    "NVLink 4 (8x H100 SXM, one node)": (450e9, "900 GB/s bidirectional per GPU through NVSwitch"),
    "100 Gb/s network (8 nodes, 1 GPU each)": (12.5e9, "100 Gb/s per node NIC"),
}
# The compute time of one step on one H100 until step_bench.py has measured it: the
# step's FLOPs at 50% of the H100 SXM's 67 TFLOP/s float32 (non-tensor-core) peak.
H100_FLOAT32_FLOPS = 0.5 * 67e12


def measure(cases, repeats):
    """This rank's timings (seconds) per case; run under mpiexec (or alone)."""
    import gpubackprop as gb
    from gpubackprop.train.trainer import Trainer

    comm = gb.distributed.init()
    rows = {}
    for name in cases:
        sizes, batch = CASES[name]
        lo, hi = gb.distributed.shard(batch, comm.rank, comm.size)
        rng = np.random.default_rng(comm.rank)
        model = gb.MLP(sizes, seed=0)
        opt = gb.optim.SGD(0.01)
        X = rng.random((hi - lo, sizes[0]), dtype=np.float32)
        y = rng.integers(0, sizes[-1], hi - lo)
        ws = model.load_batch(X, y)
        trainer = Trainer(model, opt, parallel=comm.parallel)
        reduce = None if comm.size == 1 else functools.partial(comm.allreduce_mean, weight=(hi - lo) / batch)
        runs = {
            "compute_s": lambda: trainer.step(ws),
            "allreduce_s": lambda: reduce and reduce(model.grads),
            "step_s": lambda: trainer.step(ws, reduce=reduce),
        }
        row = {"case": name, "net": list(sizes), "batch": batch, "params": model.n_params,
               "allreduce_bytes": 0 if reduce is None else model.grads.nbytes}
        for key, run in runs.items():
            run()  # warm-up: workspaces, staging buffers, BLAS threads
            times = []
            for _ in range(repeats):
                _barrier(comm)
                t = time.perf_counter()
                run()
                times.append(time.perf_counter() - t)
            row[key] = statistics.median(times)
        rows[name] = row
    return comm, rows


def _barrier(comm):
    if comm.size > 1:
        comm.comm.Barrier()


def gpu_step_seconds(cases, results_path=None):
    """({case: one GPU's float32 step in seconds}, where the numbers come from):
    measured by bench/step_bench.py when ``results_path`` is given, else estimated."""
    if results_path is None:
        return ({name: step_flops(*GPU_CASES[name]) / H100_FLOAT32_FLOPS for name in cases},
                "step FLOPs / (50% of 67 TFLOP/s, H100 SXM float32), an estimate")
    with open(results_path) as f:
        result = json.load(f)
    measured = {(tuple(r["net"]), r["batch"]): r["ours_samples_per_s"] for r in result["rows"]
                if r["precision"] == "float32" and r.get("ours_samples_per_s")}
    seconds = {}
    for name in cases:
        sizes, batch = GPU_CASES[name]
        rate = measured.get((sizes, batch))
        if rate is None:
            raise SystemExit(f"{results_path} has no float32 row of ours for {name} {sizes} at batch {batch}")
        seconds[name] = batch / rate
    return seconds, f"measured: {result['device']}, {result['date']}, float32 (bench/step_bench.py, {results_path})"


def scaling_model(cases, compute_s, n=8):
    """Efficiency rows of the ring model for ``n`` GPUs; compute_s[case] is one GPU's step."""
    out = []
    for name in cases:
        sizes, batch = GPU_CASES[name]
        params = parameter_count(sizes)
        t_c = compute_s[name]
        for link, (beta, _) in LINKS.items():
            t_ar = 2 * (n - 1) / n * 4 * params / beta
            out.append({"case": name, "net": list(sizes), "batch": batch, "params": params, "link": link,
                        "gpus": n, "compute_s": t_c, "allreduce_s": t_ar,
                        "weak_efficiency": t_c / (t_c + t_ar),
                        "strong_efficiency": (t_c / n) / (t_c / n + t_ar)})
    return out


def markdown(measured, model):
    lines = []
    if measured:
        lines += ["| case | ranks | params | rows per rank | compute (ms) | allreduce (ms) | step (ms) | allreduce / step |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in measured:
            lines.append(f"| {r['case']} {'-'.join(map(str, r['net']))} | {r['ranks']} | {r['params']:,} | "
                         f"{r['rows_per_rank']} | {1e3 * r['compute_s']:.1f} | {1e3 * r['allreduce_s']:.1f} | "
                         f"{1e3 * r['step_s']:.1f} | {r['allreduce_s'] / r['step_s']:.1%} |")
        lines.append("")
    lines += ["| case | link | 8 GPUs: allreduce (ms) | compute per step, 1 GPU (ms) | weak-scaling efficiency | "
              "strong-scaling efficiency |", "|---|---|---|---|---|---|"]
    for r in model:
        lines.append(f"| {r['case']} ({r['params'] / 1e6:.1f} M params, batch {r['batch']}) | {r['link']} | "
                     f"{1e3 * r['allreduce_s']:.2f} | {1e3 * r['compute_s']:.2f} | {r['weak_efficiency']:.0%} | "
                     f"{r['strong_efficiency']:.0%} |")
    return "\n".join(lines)


def launch(n, cases, repeats):
    """This script's measure() on n ranks; rank 0's rows."""
    launcher = shutil.which("mpiexec", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))
    if launcher is None:
        raise SystemExit("mpiexec not found: pip install 'gpubackprop[mpi]'")
    threads = str(max(1, n_cores() // n))
    env = dict(os.environ, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    cmd = [launcher, "-n", str(n), sys.executable, "-m", "bench.allreduce_bench",
           "--rank-run", "--cases", ",".join(cases), "--repeats", str(repeats)]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    for r in rows:
        r.update(ranks=n, threads_per_rank=int(threads), rows_per_rank=-(-r["batch"] // n))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cases", default="medium,large")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--gpu-results", metavar="JSON", help="T_c from this step_bench result (float32, ours)")
    p.add_argument("--model-only", action="store_true", help="print the ring model's table; measure nothing")
    p.add_argument("--rank-run", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cases = args.cases.split(",")
    if args.rank_run:
        comm, rows = measure(cases, args.repeats)
        if comm.rank == 0:
            print(json.dumps(list(rows.values())), flush=True)
        return None

    compute, compute_what = gpu_step_seconds(cases, args.gpu_results)
    model = scaling_model(cases, compute)
    if args.model_only:
        print(f"T_c: {compute_what}\n\n{markdown([], model)}")
        return model
    measured = [row for n in args.ranks for row in launch(n, cases, args.repeats)]
    date = datetime.date.today().isoformat()
    result = {
        "date": date, "machine": f"{platform.node()}: {n_cores()} cores, {cpu_model()}",
        "versions": dict(versions(), mpi=_mpi_version()),
        "measured": measured, "model": model,
        "model_assumptions": {"links": {k: {"bytes_per_s": b, "what": w} for k, (b, w) in LINKS.items()},
                              "compute": compute_what,
                              "latency": "left out"},
    }
    table = markdown(measured, model)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"allreduce-{date}.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, f"allreduce-{date}.log"), "w") as f:
        f.write(f"{result['machine']}, {date}, {result['versions']}\n\n{table}\n")
    print(table)
    return result


def _mpi_version():
    try:
        from mpi4py import MPI

        return MPI.Get_library_version().splitlines()[0].strip()
    except ImportError:
        return None


if __name__ == "__main__":
    main()
