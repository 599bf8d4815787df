"""Collectives from scratch against gloo's built-in all-reduce, and the fitted alpha-beta model.

Run:  .venv/bin/python benchmarks/bench_collectives.py [--out benchmarks/results/collectives.md]

1. Bandwidth: ``distlab.communication.collectives.ring_all_reduce`` against ``torch.distributed.all_reduce``
   (gloo), interleaved in the same processes, on 2/4/8 ranks and 4 KiB to 16 MiB of float32.
   Bus bandwidth = 2(p-1)/p·n / time (the ring's traffic per rank over the time, as in
   nccl-tests). Target: 4 ranks, 4 MiB: ring ≥ 0.8× gloo's bandwidth.
2. Model: ``distlab.communication.cost_model.measure`` over the same grid for ring, recursive doubling and
   naive; ``cost_model.fit`` per algorithm. Target: median relative error ≤ 25%.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

import distlab
from distlab.communication import alpha_beta, collectives, cost_model

KIB, MIB = 1024, 1024 * 1024
SIZES = [4 * KIB, 16 * KIB, 64 * KIB, 256 * KIB, 1 * MIB, 4 * MIB, 16 * MIB]


def _bandwidth_worker(sizes, repeats):
    p = dist.get_world_size()
    rows = []
    for nbytes in sizes:
        x = torch.ones(nbytes // 4)
        iters = max(1, min(20, MIB // nbytes))
        ops = {"ring": lambda: collectives.ring_all_reduce(x, check=False),
               "gloo": lambda: dist.all_reduce(x)}
        for op in ops.values():
            op()                                               # warm up
        times = {k: [] for k in ops}
        for _ in range(repeats):
            for name, op in ops.items():                       # interleaved: same noise
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(iters):
                    op()
                dt = torch.tensor([(time.perf_counter() - t0) / iters])
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                times[name].append(dt.item())
        row = {"world_size": p, "nbytes": nbytes}
        for name, ts in times.items():
            row[name] = statistics.median(ts)
        rows.append(row)
    return rows


def _fmt_size(n):
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB"


def bandwidth_table(world_sizes, sizes, repeats):
    rows = []
    for p in world_sizes:
        rows += distlab.launch(_bandwidth_worker, p, sizes, repeats, timeout=300)[0]
    lines = ["| ranks | size | ring (ms) | gloo (ms) | ring bus bw (GB/s) | gloo bus bw (GB/s) "
             "| ring / gloo bandwidth |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        traffic = alpha_beta.ring_all_reduce(r["nbytes"], r["world_size"]).nbytes
        lines.append(f"| {r['world_size']} | {_fmt_size(r['nbytes'])} | {1e3 * r['ring']:.3f} | "
                     f"{1e3 * r['gloo']:.3f} | {traffic / r['ring'] / 1e9:.2f} | "
                     f"{traffic / r['gloo'] / 1e9:.2f} | {r['gloo'] / r['ring']:.2f}× |")
    target = next(r for r in rows if r["world_size"] == 4 and r["nbytes"] == 4 * MIB) \
        if 4 in world_sizes and 4 * MIB in sizes else None
    return lines, target


def model_table(world_sizes, sizes, repeats):
    df = cost_model.measure(world_sizes, sizes, ("ring", "recursive_doubling", "naive"),
                            repeats=repeats)
    fits = cost_model.fit(df)
    lines = ["| algorithm | alpha (µs) | beta (ns/byte) | median rel. error | max rel. error "
             "| points |", "|---|---|---|---|---|---|"]
    for f in fits.values():
        lines.append(f"| {f.algorithm} | {1e6 * f.alpha:.1f} | {1e9 * f.beta:.3f} | "
                     f"{100 * f.median_error:.0f}% | {100 * f.max_error:.0f}% | {f.num_points} |")
    overall = float(cost_model.relative_errors(df, fits).median())
    return lines, overall, df


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8], help="world sizes")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/collectives.md")
    args = ap.parse_args(argv)
    distlab.warm_up()
    t0, load_before = time.time(), os.getloadavg()[0]
    bw_lines, target = bandwidth_table(args.sizes, SIZES, args.repeats)
    fit_lines, overall, _ = model_table(args.sizes, SIZES, max(3, args.repeats - 2))
    ratio = target["gloo"] / target["ring"] if target else float("nan")
    out = [
        "# Collectives from scratch: ring all-reduce vs gloo, and the α-β model",
        "",
        "Command: `" + " ".join([".venv/bin/python benchmarks/bench_collectives.py"]
                                + sys.argv[1:]) + "`",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"{torch.__version__}, gloo on CPU, loopback; took {time.time() - t0:.0f} s.",
        "Median over repeats of the slowest rank's time per call; float32. "
        f"Machine: {os.cpu_count()} cores, load average {load_before:.1f} before and "
        f"{os.getloadavg()[0]:.1f} after the run (other jobs share the cores: small "
        "messages measure the scheduler more than the algorithm).",
        "",
        "## 1. distlab ring all-reduce vs gloo's built-in all_reduce (same processes, interleaved)",
        "",
        *bw_lines,
        "",
        f"**Target: 4 ranks, 4 MiB, ring ≥ 0.8× gloo's bandwidth: measured {ratio:.2f}× "
        f"({'met' if ratio >= 0.8 else 'NOT met'}).**",
        "",
        "## 2. α-β model fitted per algorithm (least squares on relative error)",
        "",
        *fit_lines,
        "",
        f"**Target: median relative error ≤ 25% over the grid: measured {100 * overall:.0f}% "
        f"({'met' if overall <= 0.25 else 'NOT met'}).**",
        "",
    ]
    text = "\n".join(out)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
