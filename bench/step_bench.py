"""Train-step throughput side by side: gpubackprop against PyTorch, eager and graphed,
per precision mode, with the matmul ceiling and peak memory measured in the same run.

    python bench/step_bench.py [--device cuda|cpu] [--cases small,medium,...]
                               [--precisions float32,tf32,bf16,fp16] [--steps 50] [--out bench/results]

A step is what ``fit`` does per batch: gather the batch from a data set already on
the device, forward, cross-entropy loss, backward, SGD update (lr 0.01), ReLU
hidden layers. For gpubackprop on CUDA that is one graph launch (``fit``'s path);
PyTorch runs nn.Sequential + F.cross_entropy + optim.SGD eagerly, and captured
whole with torch.cuda.graph ("torch_graph"), in the same precision:
tf32 = allow_tf32 on both sides; bf16 / fp16 = torch.autocast (fp16 with a
GradScaler, which is not captured: its graph column is left empty) against our
mixed precision, float32 master weights on both sides.

Times are CUDA-event medians over ``--repeats`` loops of ``--steps`` steps after
warm-up (on the CPU: perf_counter). ``ceiling_fraction`` is our useful FLOP/s
(cpu_bench.step_flops) over a large GEMM's FLOP/s in the same precision, timed in
the same run (cuBLAS through torch; np.matmul on the CPU). Peak bytes: PyTorch's
max_memory_allocated; ours, the CuPy pool's bytes in use after the timed steps
(a step allocates nothing after the first of its size, so that is the peak).
Writes ``<out>/gpu-<date>.json`` (``cpu-steps-<date>.json`` on the CPU) and prints
a Markdown table. The CPU half exists so that this script is exercised in CI.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_bench import have, step_flops  # noqa: E402

import gpubackprop as gb  # noqa: E402

LR = 0.01
SEED = 0
CASES = {  # name -> [(sizes, batch)]
    "small": [((784, 128, 10), 64), ((784, 128, 10), 256)],
    "medium": [((784, 1024, 1024, 10), 4096)],
    "large": [((4096, 4096, 4096, 4096, 10), 8192)],
    "narrow-deep": [((64, 64, 64, 64, 64, 16), 262144)],
}
CEILING_N = {"cuda": 8192, "cpu": 2048}
TORCH_AUTOCAST = {"bf16": "bfloat16", "fp16": "float16"}


def make_data(sizes, batch, rng):
    X = rng.random((batch, sizes[0]), dtype=np.float32)
    return X, rng.integers(0, sizes[-1], batch)


# ---- the steps: each factory returns (step, peak_bytes) ------------------------------

def ours(sizes, batch, precision, device):
    """fit's per-batch path: indices into a fixed buffer, then gather + step (one
    graph launch on CUDA, from the third call on)."""
    model = gb.MLP(list(sizes), seed=SEED, device=device, precision=precision)
    X, y = make_data(sizes, batch, np.random.default_rng(SEED))
    opt = gb.optim.SGD(LR)
    b = model.backend
    with model._context():
        Xd, T = model._prepare(X, y)
        opt._bind(model)
        running = b.zeros((2,), np.float64)
        order = b.asarray(np.random.default_rng(1).permutation(batch))
        ws = model._workspace(batch)
        graphs = {} if b.supports_graphs else None

    def step():
        with model._context():
            b.xp.copyto(ws.index, order)
            model._fit_step(ws, Xd, T, opt, running, graphs)

    def peak():
        return b.xp.get_default_memory_pool().used_bytes() if device == "cuda" else None

    return step, peak


def torch_step(sizes, batch, precision, device, graph):
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    torch.manual_seed(SEED)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(n_in, n_out)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    net = nn.Sequential(*layers).to(device)
    X, y = make_data(sizes, batch, np.random.default_rng(SEED))
    data, labels = torch.from_numpy(X).to(device), torch.from_numpy(y).to(device)
    order = torch.from_numpy(np.random.default_rng(1).permutation(batch)).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    autocast = TORCH_AUTOCAST.get(precision)
    amp_dtype = getattr(torch, autocast) if autocast else None
    scaler = torch.amp.GradScaler(device) if precision == "fp16" else None
    if graph and scaler is not None:
        return None, None

    def body():
        x, t = data.index_select(0, order), labels.index_select(0, order)
        with torch.autocast(device, dtype=amp_dtype, enabled=autocast is not None):
            loss = F.cross_entropy(net(x), t)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return loss

    def eager():
        opt.zero_grad(set_to_none=False)
        body()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if not graph:
        return eager, lambda: torch.cuda.max_memory_allocated() if device == "cuda" else None
    # Whole-step capture, as PyTorch's CUDA graphs notes show: warm up on a side stream first.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            eager()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=False)
    with torch.cuda.graph(g):
        body()
    return g.replay, lambda: torch.cuda.max_memory_allocated()


# ---- timing -------------------------------------------------------------------------

def time_steps(step, device, steps, repeats, warmup=5):
    """Median seconds per step over ``repeats`` loops of ``steps`` steps."""
    for _ in range(warmup):
        step()
    per_step = []
    if device == "cuda":
        import cupy
        import torch

        for _ in range(repeats):
            torch.cuda.synchronize()
            # Events on the null stream bracket both libraries' work: torch's default
            # stream is the null stream, and ours joins it when a call returns.
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(cupy.cuda.Stream.null)
            for _ in range(steps):
                step()
            end.record(cupy.cuda.Stream.null)
            end.synchronize()
            per_step.append(cupy.cuda.get_elapsed_time(start, end) / 1e3 / steps)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            per_step.append((time.perf_counter() - t0) / steps)
    return statistics.median(per_step)


def ceiling_flops(device, precision):
    """FLOP/s of an n x n x n GEMM in ``precision`` (the best of 5)."""
    n = CEILING_N[device]
    if device == "cpu":
        a, b = np.ones((n, n), np.float32) * 0.5, np.ones((n, n), np.float32) * 0.25
        best = min(_time(lambda: np.matmul(a, b)) for _ in range(5))
        return 2 * n**3 / best
    import torch

    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / 10)
    return 2 * n**3 / min(times)


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---- the run -------------------------------------------------------------------------

def measure(device, cases, precisions, steps, repeats, log=print):
    torch_ok = have("torch")
    rows = []
    for precision in precisions:
        ceiling = ceiling_flops(device, precision)
        log(f"{precision}: GEMM ceiling {ceiling / 1e12:.2f} TFLOP/s")
        for name in cases:
            for sizes, batch in CASES[name]:
                row = {"case": name, "net": list(sizes), "batch": batch, "precision": precision}
                step, peak = ours(sizes, batch, precision, device)
                t = time_steps(step, device, steps, repeats)
                row["ours_samples_per_s"] = batch / t
                row["ours_peak_bytes"] = peak()
                row["ceiling_fraction"] = step_flops(sizes, batch) / t / ceiling
                for key, graph in (("torch_eager", False), ("torch_graph", True)):
                    row[f"{key}_samples_per_s"] = None
                    if not torch_ok or (graph and device != "cuda"):
                        continue
                    fn, peak_fn = torch_step(sizes, batch, precision, device, graph)
                    if fn is not None:
                        row[f"{key}_samples_per_s"] = batch / time_steps(fn, device, steps, repeats)
                        if not graph:
                            row["torch_peak_bytes"] = peak_fn()
                row.setdefault("torch_peak_bytes", None)
                log(json.dumps(row))
                rows.append(row)
    return rows


def versions():
    v = {"python": platform.python_version(), "numpy": np.__version__, "gpubackprop": gb.__version__}
    for mod in ("cupy", "torch"):
        if have(mod):
            v[mod] = __import__(mod).__version__
    return v


def device_name(device):
    if device == "cuda":
        import cupy

        return cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    from cpu_table import cpu_model

    return cpu_model()


def table(rows):
    head = ("| net | batch | precision | ours samples/s | torch eager | torch graph | ours / eager | ours / graph "
            "| % of GEMM ceiling | ours peak MiB | torch peak MiB |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        def num(x, fmt="{:,.0f}"):
            return "" if x is None else fmt.format(x)

        ratio = lambda k: num(r[k] and r["ours_samples_per_s"] / r[k], "{:.2f}x")  # noqa: E731
        mib = lambda k: num(r[k] and r[k] / 2**20, "{:,.0f}")  # noqa: E731
        lines.append(f"| {'-'.join(map(str, r['net']))} | {r['batch']} | {r['precision']} | "
                     f"{num(r['ours_samples_per_s'])} | {num(r['torch_eager_samples_per_s'])} | "
                     f"{num(r['torch_graph_samples_per_s'])} | {ratio('torch_eager_samples_per_s')} | "
                     f"{ratio('torch_graph_samples_per_s')} | {100 * r['ceiling_fraction']:.1f}% | "
                     f"{mib('ours_peak_bytes')} | {mib('torch_peak_bytes')} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--precisions", default=None, help="default: all four on cuda, float32 on cpu")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    precisions = (args.precisions or ("float32,tf32,bf16,fp16" if args.device == "cuda" else "float32")).split(",")
    cases = args.cases.split(",")
    unknown = set(cases) - set(CASES)
    if unknown:
        p.error(f"unknown cases {sorted(unknown)}; choose from {list(CASES)}")
    rows = measure(args.device, cases, precisions, args.steps, args.repeats)
    date = datetime.date.today().isoformat()
    result = {"device": device_name(args.device), "date": date, "versions": versions(),
              "settings": {"steps": args.steps, "repeats": args.repeats, "lr": LR}, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{'gpu' if args.device == 'cuda' else 'cpu-steps'}-{date}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{result['device']}, {date}\n\n{table(rows)}\n\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
