"""K small MLPs trained together: MLPPack against K fits one after another (ours, and
PyTorch's), and against the same step vectorized over the members by torch.func
(stack_module_state + vmap of grad) and by JAX (jit of vmap). Every member has its
own starting weights; one timed run is one epoch of plain SGD (lr 0.05, cross
entropy, float32) for all K members.

Two ways to batch: each member on its own shuffle ("own": MLPPack's batches="own",
and the vmaps over (K, B) row indices), or every member on the same batches
("shared": batches="shared", and the vmaps with the batch broadcast, in_dims None).
K sequential fits cost the same either way, so they are timed once.

Reported per case: seconds per epoch of each, each pack's speed-up over each peer
of its kind, and the GFLOP/s each pack reaches (bench.cpu_bench.step_flops:
forward, weight and input gradients' GEMMs) as a fraction of the machine's sgemm
ceiling (the best BLAS's).

Run: ``python -m bench.pack_bench`` (writes bench/results/pack-<date>.json and prints
the Markdown table); ``--members 16 64``, ``--repeats 3``, ``--cases``.
"""

import argparse
import datetime
import functools
import os
import sys

import numpy as np

import gpubackprop as gb
from bench.common import have, machine, n_cores, time_interleaved, versions, write_result
from bench.cpu_bench import sgemm_ceiling, step_flops

CASES = (((784, 128, 10), 64, 2048), ((64, 64, 64, 64, 64, 16), 4096, 16384))  # (sizes, batch, rows)
LR = 0.05
SEED = 0


def case_id(sizes, batch):
    return f"{'-'.join(map(str, sizes))}_b{batch}"


def make_data(sizes, rows):
    rng = np.random.default_rng(SEED)
    return rng.random((rows, sizes[0]), dtype=np.float32), rng.integers(0, sizes[-1], rows)


def orders(K, n, epoch_rng):
    """Each member's own shuffle of the rows for one epoch: (K, n)."""
    return np.stack([epoch_rng.permutation(n) for _ in range(K)])


def start_weights(sizes, K):
    """Our members' starting weights, [(W (K, out, in), b (K, out))]: every library starts there."""
    states = [gb.MLPPack(list(sizes), members=K, seed=SEED).member(k).state_dict() for k in range(K)]
    return [tuple(np.stack([s[f"layers.{i}.{kind}"] for s in states]) for kind in ("weight", "bias"))
            for i in range(len(sizes) - 1)]


def ours_pack(sizes, batch, X, y, K, batches="own"):
    pack = gb.MLPPack(list(sizes), members=K, seed=SEED)
    return lambda: pack.fit(X, y, epochs=1, batch_size=batch, optimizer="sgd", lr=LR, batches=batches)


def ours_sequential(sizes, batch, X, y, K):
    models = [gb.MLP(list(sizes), seed=SEED + k) for k in range(K)]
    optimizers = [gb.optim.SGD(LR) for _ in range(K)]
    return lambda: [m.fit(X, y, epochs=1, batch_size=batch, optimizer=o, progress=False)
                    for m, o in zip(models, optimizers)]


def torch_sequential(sizes, batch, X, y, K):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(n_cores())
    weights = start_weights(sizes, K)  # once: K packs of K members took minutes at K = 64
    nets = [_torch_net(sizes, [(W[k], b[k]) for W, b in weights]) for k in range(K)]
    opts = [torch.optim.SGD(net.parameters(), lr=LR) for net in nets]
    Xt, yt, rng = torch.from_numpy(X), torch.from_numpy(y), np.random.default_rng(SEED)

    def run():
        for net, opt, order in zip(nets, opts, orders(K, len(X), rng)):
            for start in range(0, len(X), batch):
                idx = torch.from_numpy(order[start:start + batch])
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(Xt[idx]), yt[idx]).backward()
                opt.step()

    return run


def _torch_net(sizes, weights):
    import torch
    from torch import nn

    layers = []
    for i, (W, b) in enumerate(weights):
        lin = nn.Linear(W.shape[1], W.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W))
            lin.bias.copy_(torch.from_numpy(b))
        layers += [lin, nn.ReLU()] if i < len(sizes) - 2 else [lin]
    return nn.Sequential(*layers)


def torch_vmap(sizes, batch, X, y, K, shared=False):
    """torch.func's recipe for model ensembles: stacked parameters, vmap of grad (with
    ``shared``, of one batch for every member)."""
    import copy

    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, stack_module_state, vmap

    torch.set_num_threads(n_cores())
    weights = start_weights(sizes, K)  # once: K packs of K members took minutes at K = 64
    nets = [_torch_net(sizes, [(W[k], b[k]) for W, b in weights]) for k in range(K)]
    params, buffers = stack_module_state(nets)
    params = {name: p.detach() for name, p in params.items()}
    base = copy.deepcopy(nets[0]).to("meta")

    def loss(p, b, xb, yb):
        return F.cross_entropy(functional_call(base, (p, b), (xb,)), yb)

    grads = vmap(grad(loss), in_dims=(0, 0, None, None) if shared else 0)
    Xt, yt, rng = torch.from_numpy(X), torch.from_numpy(y), np.random.default_rng(SEED)

    def run():
        order = torch.from_numpy(orders(1 if shared else K, len(X), rng))
        for start in range(0, len(X), batch):
            idx = order[0 if shared else slice(None), start:start + batch]
            g = grads(params, buffers, Xt[idx], yt[idx])
            with torch.no_grad():
                for name, p in params.items():
                    p.sub_(g[name], alpha=LR)

    return run


def jax_vmap(sizes, batch, X, y, K, shared=False):
    """JAX's: the step of one member, vmapped over the members (with ``shared``, the batch
    broadcast to them), jitted."""
    import jax
    import jax.numpy as jnp

    params = [(jnp.asarray(W), jnp.asarray(b)) for W, b in start_weights(sizes, K)]

    def loss(p, xb, yb):
        a = xb
        for i, (W, b) in enumerate(p):
            a = a @ W.T + b
            if i < len(p) - 1:
                a = jax.nn.relu(a)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(a), yb[:, None], axis=1))

    def member_step(p, xb, yb):
        g = jax.grad(loss)(p, xb, yb)
        return jax.tree_util.tree_map(lambda w, d: w - LR * d, p, g)

    step = jax.jit(jax.vmap(member_step, in_axes=(0, None, None) if shared else 0))
    Xj, yj, rng, state = jnp.asarray(X), jnp.asarray(y), np.random.default_rng(SEED), {"params": params}

    def run():
        p, order = state["params"], orders(1 if shared else K, len(X), rng)
        for start in range(0, len(X), batch):
            idx = order[0 if shared else slice(None), start:start + batch]
            p = step(p, Xj[idx], yj[idx])
        jax.block_until_ready(p)
        state["params"] = p

    return run


FACTORIES = {"pack": ours_pack, "ours_sequential": ours_sequential, "torch_sequential": torch_sequential,
             "torch_vmap": torch_vmap, "jax_vmap": jax_vmap,
             "pack_shared": functools.partial(ours_pack, batches="shared"),
             "torch_vmap_shared": functools.partial(torch_vmap, shared=True),
             "jax_vmap_shared": functools.partial(jax_vmap, shared=True)}
PACKS = {"pack": ("ours_sequential", "torch_sequential", "torch_vmap", "jax_vmap"),  # each pack: its peers
         "pack_shared": ("ours_sequential", "torch_sequential", "torch_vmap_shared", "jax_vmap_shared")}


def available_impls():
    need = {name: "torch" for name in FACTORIES if name.startswith("torch")}
    need.update({name: "jax" for name in FACTORIES if name.startswith("jax")})
    return [name for name in FACTORIES if name not in need or have(need[name])]


def measure_case(sizes, batch, rows, K, impls, repeats, ceiling_gflops):
    """One row: each implementation's seconds per epoch of K members, and each pack's speed-ups."""
    X, y = make_data(sizes, rows)
    runs = {name: FACTORIES[name](sizes, batch, X, y, K) for name in impls}
    timings = time_interleaved(runs, target_s=1e-9, repeats=repeats)  # one epoch per repeat: a run is long
    row = {"case": case_id(sizes, batch), "sizes": list(sizes), "batch": batch, "rows": rows, "members": K}
    for name in impls:
        row[name] = {"epoch_s": timings[name].best, "timing": timings[name].as_dict()}
    for pack in (p for p in PACKS if p in impls):
        pack_s = row[pack]["epoch_s"]
        row[f"{pack}_speedup"] = {name: row[name]["epoch_s"] / pack_s for name in PACKS[pack] if name in impls}
        gflops = K * step_flops(sizes, batch) * (rows // batch) / pack_s / 1e9
        row[f"{pack}_gflops"], row[f"{pack}_fraction_of_ceiling"] = gflops, gflops / ceiling_gflops
    return row


def markdown(rows, impls):
    """A table per pack: its time and its speed-up over each of its peers."""
    tables = []
    for pack in (p for p in PACKS if p in impls):
        others = [name for name in PACKS[pack] if name in impls]
        head = ["net @ batch", "K", f"{pack} s / epoch"] + [f"over {name}" for name in others] + ["of the sgemm ceiling"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [f"{', '.join(map(str, r['sizes']))} @ {r['batch']}", str(r["members"]), f"{r[pack]['epoch_s']:.3f}"]
            cells += [f"{r[f'{pack}_speedup'][name]:.2f}x" for name in others]
            cells.append(f"{r[f'{pack}_fraction_of_ceiling']:.0%}")
            lines.append("| " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--members", type=int, nargs="+", default=[16, 64])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", nargs="*", help="case ids (default all), e.g. 784-128-10_b64")
    p.add_argument("--impls", nargs="*", help=f"of {list(FACTORIES)} (default: all that install)")
    args = p.parse_args(argv)
    impls = [name for name in available_impls() if not args.impls or name in args.impls]
    if not any(name in PACKS for name in impls):
        p.error(f"--impls must name a pack: {' or '.join(PACKS)}")
    cases = [c for c in CASES if not args.cases or case_id(c[0], c[1]) in args.cases]
    ceiling, _ = sgemm_ceiling()
    facts = machine()
    print(f"# packs on the CPU: {facts['cpu']}, {facts['cores']} cores; float32, SGD lr {LR}; "
          f"sgemm ceiling {ceiling:.0f} GFLOP/s (the best BLAS here); best of {args.repeats}", file=sys.stderr)
    rows = []
    for sizes, batch, n in cases:
        for K in args.members:
            print(f"measuring {case_id(sizes, batch)}, K = {K} ...", file=sys.stderr)
            rows.append(measure_case(sizes, batch, n, K, impls, args.repeats, ceiling))
    table = markdown(rows, impls)
    print(table)
    write_result(args.out, "pack", {"date": datetime.date.today().isoformat(), "machine": facts, "versions": versions(),
                                    "lr": LR, "ceiling_gflops": ceiling, "rows": rows, "table": table})


if __name__ == "__main__":
    main()
