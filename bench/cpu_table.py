"""CPU train-step throughput: gpubackprop against PyTorch and scikit-learn.

    python -m bench.cpu_table [--out bench/results] [--repeats 5] [--passes 1] [--target-s 0.5]

Runs every case of ``cpu_bench.CASES`` in this one process (``--passes`` times,
each cell keeping its best), with the sgemm ceiling measured before and after
every pass (the best is kept), prints a Markdown table and writes ``<out>/cpu-<YYYY-MM-DD>.json``
with the machine, the versions and every number. PyTorch and scikit-learn are
optional: their columns are skipped, with a note, when they are not installed.
See cpu_bench.py for what each column times.
"""

import argparse
import datetime
import json
import os
import sys

from bench import cpu_bench as cb
from bench.common import machine, versions


def _fmt_rate(cell):
    if cell is None:
        return "n/a"
    return f"{cell['samples_per_s']:,.0f}" + ("*" if cell["noisy"] else "")


def _fmt_pct(cell):
    return "n/a" if cell is None or cell["ceiling_fraction"] is None else f"{100 * cell['ceiling_fraction']:.1f}%"


def markdown(rows, ceiling, impls):
    cols = ["case", "batch", "ours samples/s", "ours via train_step"]
    if "torch" in impls:
        cols.append("torch samples/s")
    if "sklearn" in impls:
        cols.append("sklearn samples/s")
    if "torch" in impls:
        cols.append("ours/torch")
    cols.append("ours % ceiling")
    if "torch" in impls:
        cols.append("torch % ceiling")
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if c == "case" else "---:" for c in cols) + "|"]
    for r in rows:
        cells = [r["case"], str(r["batch"]), _fmt_rate(r["ours"]), _fmt_rate(r["ours_train_step"])]
        if "torch" in impls:
            cells.append(_fmt_rate(r["torch"]))
        if "sklearn" in impls:
            cells.append(_fmt_rate(r["sklearn"]))
        if "torch" in impls:
            cells.append(f"{r['ours_over_torch']:.2f}x")
        cells.append(_fmt_pct(r["ours"]))
        if "torch" in impls:
            cells.append(_fmt_pct(r["torch"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if any(r[name] and r[name]["noisy"] for r in rows for name in cb.IMPLS):
        lines.append(f"\\* repeats disagreed (median > {cb.NOISY:.2f} x best): other load on the machine? Best kept.")
        lines.append("")
    lines.append(f"sgemm ceiling: {ceiling:.1f} GFLOP/s (best np.matmul, {cb.CEILING_N}x{cb.CEILING_N} float32)")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="folder for cpu-<date>.json (default: bench/results)")
    p.add_argument("--repeats", type=int, default=cb.REPEATS, help="timed repeats; the best is kept (default 5)")
    p.add_argument("--passes", type=int, default=1,
                   help="run every case this many times, keeping each cell's best (default 1; "
                        "more rides out longer bursts of load from elsewhere)")
    p.add_argument("--target-s", type=float, default=cb.TARGET_S, help="seconds per timed repeat (default 0.5)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.passes < 1 or args.target_s <= 0:
        p.error("--repeats and --passes must be >= 1, --target-s > 0")

    impls = cb.available_impls()
    notes = [f"{lib} is not installed: its columns are skipped" for name, lib in cb.NEEDS.items() if name not in impls]
    for note in notes:
        print(f"note: {note}", file=sys.stderr)

    facts = machine()
    print(f"# CPU train step: {facts['cpu']}, {facts['cores']} cores; float32, SGD lr {cb.LR}, "
          f"best of {args.passes} x {args.repeats} x ~{args.target_s} s", file=sys.stderr)
    # The ceiling is measured before and after the cases and the better kept, so
    # that load from elsewhere at one moment does not inflate every fraction.
    ceilings = []
    rows = []

    def measure_ceiling():
        gflops, timing = cb.sgemm_ceiling(target_s=args.target_s, repeats=args.repeats)
        ceilings.append({"gflops": gflops, "timing": timing.as_dict()})
        print(f"sgemm ceiling: {gflops:.1f} GFLOP/s", file=sys.stderr)

    measure_ceiling()
    for n in range(args.passes):
        for i, (sizes, batch) in enumerate(cb.CASES):
            print(f"measuring {cb.case_id(sizes, batch)} (pass {n + 1}/{args.passes}) ...", file=sys.stderr)
            row = cb.measure_case(sizes, batch, None, impls, target_s=args.target_s, repeats=args.repeats)
            if n == 0:
                rows.append(row)
            else:
                rows[i] = cb.merge_rows(rows[i], row)
        measure_ceiling()
    ceiling = max(c["gflops"] for c in ceilings)
    for row in rows:
        cb.set_ceiling(row, ceiling)

    print(markdown(rows, ceiling, impls))
    for note in notes:
        print(f"\nNote: {note}.")

    today = datetime.date.today().isoformat()
    result = {
        "machine": facts,
        "date": today,
        "versions": versions(),
        "settings": {"dtype": "float32", "lr": cb.LR, "classes": cb.N_CLASSES, "repeats": args.repeats,
                     "target_s": args.target_s, "passes": args.passes, "flops": "2*B*(3*sum(in*out) - n0*n1)"},
        "ceiling_gflops": ceiling,
        "ceiling_runs": ceilings,
        "notes": notes,
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"cpu-{today}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"\nwrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
