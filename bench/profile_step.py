"""Where the host's time goes in our train step: cProfile over many steps of
step_bench's ``ours`` (fit's per-batch path), the top functions by own time.

    python -m bench.profile_step [--device cuda|cpu] [--net 784,128,10] [--batch 64]
                                 [--precision float32] [--steps 2000]

On a GPU a small net's step is bound by the host (Python, launches), not the
device, so this is what to read before making it faster; it prints seconds of
host time per step, and the device time per step from a synchronized loop.
"""

import argparse
import cProfile
import pstats
import time

from bench import step_bench as sb


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--net", default="784,128,10")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--precision", default="float32")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    sizes = tuple(int(n) for n in args.net.split(","))
    step, _ = sb.ours(sizes, args.batch, args.precision, args.device)
    sync = lambda: sb.synchronize(args.device)  # noqa: E731
    with step.around():  # as fit: the device context once around the loop
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        host = time.perf_counter() - t0
        sync()
        total = time.perf_counter() - t0
        print(f"{args.net} @ {args.batch} {args.precision} on {args.device}: {1e6 * host / args.steps:.1f} us of "
              f"host time per step, {1e6 * total / args.steps:.1f} us per step to a synchronized device")
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.steps):
            step()
        sync()
        profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
