"""Train-step throughput side by side: gpubackprop against PyTorch (eager and
CUDA-graphed) and JAX ``jit``, per precision mode, with the matmul ceiling and
peak memory measured in the same run.

    python -m bench.step_bench [--device cuda|cpu] [--cases small,medium,...]
                               [--precisions float32,tf32,bf16,fp16] [--out bench/results]

A step is what ``fit`` does per batch: gather the batch from a data set already on
the device, forward, cross-entropy loss, backward, SGD update (lr 0.01), ReLU
hidden layers. For gpubackprop on CUDA that is one graph launch (``fit``'s path,
its divergence guard included, the device context entered once per loop as fit
enters it once). The peers run their idiomatic step in the same precision,
indexing the same fixed permutation of the data set:

    torch_eager   nn.Sequential + F.cross_entropy + optim.SGD, zero_grad() to None
    torch_graph   the same step captured whole with torch.cuda.graph (CUDA only),
                  gradients set to None before the capture, as PyTorch's example
    jax           value_and_grad + an SGD tree_map under jax.jit, parameters donated

tf32 = TF32 matmuls on every side (allow_tf32; jax_default_matmul_precision
"tensorfloat32"; float32 is "float32" there, exact); bf16 / fp16 = float32 master
weights and 16-bit compute on every side: torch.autocast (fp16 with a GradScaler,
which cannot be captured: torch_graph's fp16 cell stays empty), casts inside the
JAX step (fp16 with no loss scaling: JAX itself has none), our mixed precision
(fp16 with dynamic loss scaling).

Timing (bench.common.time_interleaved): every implementation warmed up and its loop
sized to ~``--target-s``; then ``--repeats`` passes, each timing one loop of every
implementation in turn, each loop from a synchronized device to a synchronized
device (cudaDeviceSynchronize waits for all three libraries' streams); the best
pass is kept. ``ceiling_fraction`` is our useful FLOP/s (cpu_bench.step_flops)
over an n x n x n GEMM's in the same precision, timed in the same run (cuBLAS
through torch on random data; np.matmul on the CPU).

Peak bytes, each measured alone before the timing, with the data set included:
ours, the growth of CuPy's pool (its cached blocks freed first, so the growth is
the high-water mark) over building the model and three steps; torch eager, the
growth of max_memory_allocated over the same; JAX, the compiled step's
memory_analysis (arguments + outputs + temporaries - donated aliases).

Writes ``<out>/gpu-<date>.json`` (``cpu-steps-<date>.json`` on the CPU) and prints
a Markdown table. The CPU half exists so that this script is exercised in CI.
"""

import argparse
import datetime
import functools
import json
import os

# JAX takes 75% of GPU memory at its first use unless told not to; the other
# libraries in this process need theirs.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402

import gpubackprop as gb  # noqa: E402
from bench.common import SETTLE_S, cpu_model, have, time_call, time_interleaved, versions  # noqa: E402
from bench.cpu_bench import step_flops  # noqa: E402
from gpubackprop.train.trainer import Trainer  # noqa: E402

LR = 0.01
SEED = 0
CASES = {  # name -> [(sizes, batch)]
    "small": [((784, 128, 10), 64), ((784, 128, 10), 256)],
    "medium": [((784, 1024, 1024, 10), 4096)],
    "large": [((4096, 4096, 4096, 4096, 10), 8192)],
    "narrow-deep": [((64, 64, 64, 64, 64, 16), 262144)],
}
IMPLS = ("ours", "torch_eager", "torch_graph", "jax")
CEILING_N = {"cuda": 8192, "cpu": 2048}
TORCH_AUTOCAST = {"bf16": "bfloat16", "fp16": "float16"}
JAX_MATMUL = {"float32": "float32", "tf32": "tensorfloat32"}  # 16-bit: their own dtype's
WARM_STEPS = 3


def make_data(sizes, batch, rng):
    X = rng.random((batch, sizes[0]), dtype=np.float32)
    return X, rng.integers(0, sizes[-1], batch)


def order_of(batch):
    return np.random.default_rng(1).permutation(batch)


# ---- the steps: each factory returns (step, peak_bytes) -----------------------------
# peak_bytes() is read after WARM_STEPS steps, before any other library runs (see
# the module docstring), or is None where it is not measured.

def synchronize(device):
    """Wait for all work on the GPU (every library's streams); nothing on the CPU."""
    if device == "cuda":
        import cupy

        cupy.cuda.runtime.deviceSynchronize()


def ours(sizes, batch, precision, device):
    """fit's per-batch path: the batch's indices copied into the workspace, then
    gather + step with fit's divergence guard (one graph launch on CUDA, from the
    third call on). The device context is entered once around a loop of steps, as
    fit enters it once (``step.around``)."""
    pool = None
    if device == "cuda":
        import cupy

        pool = cupy.get_default_memory_pool()
        synchronize(device)
        pool.free_all_blocks()  # earlier cases' cached blocks: the growth below is this model's peak
        before = pool.total_bytes()
    model = gb.MLP(list(sizes), seed=SEED, device=device, precision=precision)
    X, y = make_data(sizes, batch, np.random.default_rng(SEED))
    opt = gb.optim.SGD(LR)
    b = model.backend
    with model.context():
        Xd, T = model.prepare(X, y)
        trainer = Trainer(model, opt)  # the step fit runs: guard, graphs where the backend has them
        running = b.zeros((2,), np.float64)
        order = b.asarray(order_of(batch))
        ws = model.workspace(batch)

    def step():
        b.xp.copyto(ws.index, order)
        trainer.step(ws, running, X=Xd, T=T)

    step.around = model.context
    with model.context():
        for _ in range(WARM_STEPS):
            step()
    synchronize(device)
    return step, (None if pool is None else pool.total_bytes() - before)


def torch_step(sizes, batch, precision, device, graph):
    """PyTorch's idiomatic step (``graph``: captured whole); (None, None) for the
    fp16 graph, whose GradScaler cannot be captured."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    if graph and precision == "fp16":
        return None, None
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    torch.manual_seed(SEED)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(n_in, n_out)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    net = nn.Sequential(*layers).to(device)
    X, y = make_data(sizes, batch, np.random.default_rng(SEED))
    data, labels = torch.from_numpy(X).to(device), torch.from_numpy(y).to(device)
    order = torch.from_numpy(order_of(batch)).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    autocast = TORCH_AUTOCAST.get(precision)
    amp_dtype = getattr(torch, autocast) if autocast else None
    scaler = torch.amp.GradScaler(device) if precision == "fp16" else None

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
        opt.zero_grad()  # set_to_none, the default: backward writes fresh gradients
        body()

    if not graph:
        for _ in range(WARM_STEPS):
            eager()
        peak = None
        if device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
        return eager, peak
    # Whole-step capture, as PyTorch's CUDA graphs notes show: warm up on a side stream first.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARM_STEPS):
            eager()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)  # as PyTorch's whole-network capture: the graph writes the gradients
    with torch.cuda.graph(g):
        body()

    def replay(inputs=(net, opt, data, labels, order)):
        # The graph holds addresses, not tensors: what it reads and writes must live
        # as long as it does. (Returning g.replay alone freed them; on the first H200
        # run another step's tensors took the memory, and replays read garbage
        # indices: a device-side assert.)
        g.replay()

    return replay, None


def jax_step(sizes, batch, precision, device):
    """JAX's idiomatic step: value_and_grad and an SGD tree_map under one jit, the
    parameters donated so the update is in place."""
    import jax
    import jax.numpy as jnp

    dev = jax.devices("gpu" if device == "cuda" else "cpu")[0]
    low = {"bf16": jnp.bfloat16, "fp16": jnp.float16}.get(precision)
    rng = np.random.default_rng(SEED)
    params = [(rng.normal(0.0, np.sqrt(2.0 / n_in), (n_out, n_in)).astype(np.float32), np.zeros(n_out, np.float32))
              for n_in, n_out in zip(sizes[:-1], sizes[1:])]
    X, y = make_data(sizes, batch, np.random.default_rng(SEED))
    params, data, labels, order = jax.device_put((params, X, y.astype(np.int32), order_of(batch)), dev)

    def loss_fn(params, x, t):
        h = x if low is None else x.astype(low)
        for i, (W, b) in enumerate(params):
            if low is not None:
                W, b = W.astype(low), b.astype(low)
            h = h @ W.T + b
            if i < len(params) - 1:
                h = jax.nn.relu(h)
        logp = jax.nn.log_softmax(h.astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, t[:, None], axis=1))

    @functools.partial(jax.jit, donate_argnums=0)
    def step(params, data, labels, order):
        loss, grads = jax.value_and_grad(loss_fn)(params, data[order], labels[order])
        return jax.tree.map(lambda p, g: p - LR * g, params, grads), loss

    with jax.default_matmul_precision(JAX_MATMUL.get(precision, "default")):
        compiled = step.lower(params, data, labels, order).compile()
    mem = compiled.memory_analysis()
    peak = None
    if mem is not None:
        peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes)
    state = [params]

    def run():
        state[0], _ = compiled(state[0], data, labels, order)

    for _ in range(WARM_STEPS):
        run()
    jax.block_until_ready(state[0])
    return run, peak


FACTORIES = {
    "ours": ours,
    "torch_eager": functools.partial(torch_step, graph=False),
    "torch_graph": functools.partial(torch_step, graph=True),
    "jax": jax_step,
}


def available(device):
    """The implementations this machine can run on ``device``."""
    impls = ["ours"]
    if have("torch"):
        impls += ["torch_eager"] + (["torch_graph"] if device == "cuda" else [])
    if have("jax"):
        impls.append("jax")
    return impls


# ---- timing ------------------------------------------------------------------------

def ceiling_flops(device, precision):
    """FLOP/s of an n x n x n GEMM in ``precision`` on random data (the best of 5 loops)."""
    n = CEILING_N[device]
    rng = np.random.default_rng(SEED)
    if device == "cpu":
        a, b = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
        timing = time_call(lambda: np.matmul(a, b), target_s=0.2, repeats=5)
        return 2 * n**3 / timing.best
    import torch

    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    timing = time_call(lambda: a @ b, target_s=0.2, repeats=5, sync=torch.cuda.synchronize)
    return 2 * n**3 / timing.best


# ---- the run -------------------------------------------------------------------------

def measure(device, cases, precisions, impls=None, target_s=0.2, repeats=5, log=print, on_row=lambda rows: None):
    """The rows of the table; ``on_row(rows so far)`` after each (the file is
    rewritten then, so a run cut short keeps what it measured)."""
    impls = [i for i in IMPLS if i in (impls or available(device))]
    sync = functools.partial(synchronize, device)
    rows = []
    for precision in precisions:
        ceiling = ceiling_flops(device, precision)
        log(f"{precision}: GEMM ceiling {ceiling / 1e12:.2f} TFLOP/s")
        for name in cases:
            for sizes, batch in CASES[name]:
                row = {"case": name, "net": list(sizes), "batch": batch, "precision": precision,
                       "ceiling_flops": ceiling}
                steps = {}
                for impl in impls:
                    try:
                        step, peak = FACTORIES[impl](sizes, batch, precision, device)
                    except Exception as e:  # a peer that cannot run this case leaves its cells empty, and says why
                        if impl == "ours":
                            raise
                        row[f"{impl}_error"] = f"{type(e).__name__}: {e}"
                        log(f"{impl} {sizes} @ {batch} {precision}: {row[f'{impl}_error']}")
                        continue
                    row[f"{impl}_peak_bytes"] = peak
                    if step is not None:
                        steps[impl] = step
                around = {impl: step.around for impl, step in steps.items() if hasattr(step, "around")}
                timings = time_interleaved(steps, target_s=target_s, repeats=repeats, sync=sync,
                                           settle_s=0 if device == "cuda" else SETTLE_S, around=around)
                for impl in IMPLS:
                    t = timings.get(impl)
                    row[f"{impl}_samples_per_s"] = None if t is None else batch / t.best
                    row[f"{impl}_timing"] = None if t is None else t.as_dict()
                    row.setdefault(f"{impl}_peak_bytes", None)
                row["ceiling_fraction"] = step_flops(sizes, batch) / timings["ours"].best / ceiling if "ours" in timings else None
                del steps, timings
                log(json.dumps({k: v for k, v in row.items() if not k.endswith("_timing")}))
                rows.append(row)
                on_row(rows)
    return rows


def device_name(device):
    if device == "cuda":
        import cupy

        return cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    return cpu_model()


def table(rows):
    head = ("| net | batch | precision | ours samples/s | torch eager | torch graph | JAX jit | ours / eager "
            "| ours / graph | ours / JAX | % of GEMM ceiling | peak MiB ours / torch / JAX |\n"
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]

    def num(x, fmt="{:,.0f}"):
        return "" if x is None else fmt.format(x)

    for r in rows:
        ours_rate = r["ours_samples_per_s"]
        ratio = lambda k: num(r[k] and ours_rate and ours_rate / r[k], "{:.2f}x")  # noqa: E731
        mib = "/".join(num(r[f"{k}_peak_bytes"] and r[f"{k}_peak_bytes"] / 2**20) or "-"
                       for k in ("ours", "torch_eager", "jax"))
        lines.append(f"| {'-'.join(map(str, r['net']))} | {r['batch']} | {r['precision']} | {num(ours_rate)} | "
                     f"{num(r['torch_eager_samples_per_s'])} | {num(r['torch_graph_samples_per_s'])} | "
                     f"{num(r['jax_samples_per_s'])} | {ratio('torch_eager_samples_per_s')} | "
                     f"{ratio('torch_graph_samples_per_s')} | {ratio('jax_samples_per_s')} | "
                     f"{num(r['ceiling_fraction'] and 100 * r['ceiling_fraction'], '{:.1f}%')} | {mib} |")
    return "\n".join(lines)


def merge(results, names):
    """One result from several runs of this script that measured different
    implementations of the same rows (each library in a process of its own, say):
    each implementation's cells come from the first run that measured them, and
    ``{impl}_source`` names that run; the ceiling goes with ours."""
    devices = {r["device"] for r in results}
    if len(devices) > 1:
        raise ValueError(f"these runs measured different devices ({sorted(devices)}): one table cannot hold them")
    merged = {}
    for result, name in zip(results, names):
        for row in result["rows"]:
            key = (tuple(row["net"]), row["batch"], row["precision"])
            into = merged.setdefault(key, {k: row[k] for k in ("case", "net", "batch", "precision")})
            for impl in IMPLS:
                if row.get(f"{impl}_error") and not into.get(f"{impl}_error"):
                    into[f"{impl}_error"] = f"{row[f'{impl}_error']} ({name})"
                if row.get(f"{impl}_samples_per_s") is None or into.get(f"{impl}_samples_per_s") is not None:
                    continue
                for what in ("samples_per_s", "timing", "peak_bytes"):
                    into[f"{impl}_{what}"] = row.get(f"{impl}_{what}")
                into[f"{impl}_source"] = name
                if impl == "ours":
                    into["ceiling_flops"], into["ceiling_fraction"] = row["ceiling_flops"], row["ceiling_fraction"]
    rows = []
    for row in merged.values():
        for impl in IMPLS:
            for what in ("samples_per_s", "timing", "peak_bytes", "source"):
                row.setdefault(f"{impl}_{what}", None)
        row.setdefault("ceiling_flops", None)
        row.setdefault("ceiling_fraction", None)
        rows.append(row)
    first = results[0]
    return {"device": first["device"], "date": first["date"], "versions": first["versions"],
            "merged_from": [{"source": n, "date": r["date"], "versions": r["versions"], "settings": r["settings"]}
                            for r, n in zip(results, names)],
            "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--precisions", default=None, help="default: all four on cuda, float32 on cpu")
    p.add_argument("--impls", default=None, help=f"a subset of {','.join(IMPLS)} (default: all installed)")
    p.add_argument("--target-s", type=float, default=0.2, help="seconds of one timed loop (default 0.2)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved passes; the best is kept (default 5)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="measure nothing: merge result files of runs that measured different implementations "
                        "(see merge) into --out/gpu-<date>.json")
    args = p.parse_args(argv)
    if args.merge:
        results = []
        for name in args.merge:
            with open(name) as f:
                results.append(json.load(f))
        result = merge(results, args.merge)
        path = os.path.join(args.out, f"gpu-{result['date']}.json")
        if any(os.path.abspath(path) == os.path.abspath(name) for name in args.merge):
            p.error(f"the merged result would overwrite its input {path}: choose another --out")
        os.makedirs(args.out, exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\n{result['device']}, {result['date']}\n\n{table(result['rows'])}\n\nwrote {path}")
        return result
    precisions = (args.precisions or ("float32,tf32,bf16,fp16" if args.device == "cuda" else "float32")).split(",")
    cases = args.cases.split(",")
    unknown = set(cases) - set(CASES)
    if unknown:
        p.error(f"unknown cases {sorted(unknown)}; choose from {list(CASES)}")
    impls = args.impls.split(",") if args.impls else None
    if impls is not None and not set(impls) <= set(IMPLS):
        p.error(f"--impls must name only {list(IMPLS)}")
    date = datetime.date.today().isoformat()
    result = {"device": device_name(args.device), "date": date, "versions": versions(args.device),
              "settings": {"target_s": args.target_s, "repeats": args.repeats, "lr": LR, "warm_steps": WARM_STEPS},
              "rows": []}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{'gpu' if args.device == 'cuda' else 'cpu-steps'}-{date}.json")

    def save(rows):
        result["rows"] = rows
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    measure(args.device, cases, precisions, impls, args.target_s, args.repeats, on_row=save)
    rows = result["rows"]
    print(f"\n{result['device']}, {date}\n\n{table(rows)}\n\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
