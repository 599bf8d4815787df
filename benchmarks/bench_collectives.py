"""Collectives from scratch against gloo's built-in all-reduce, and the fitted alpha-beta model.

Run:  .venv/bin/python benchmarks/bench_collectives.py [--sizes 2 4 8] [--repeats 5]
      [--message-sizes 4096 ...] [--out DIR]      (writes DIR/collectives.md, default results/)

1. Bandwidth: ``distlab.communication.collectives.ring_all_reduce`` against
   ``torch.distributed.all_reduce`` (gloo) in interleaved pairs (ring, gloo, ring, gloo, ...)
   in the same processes, on 2/4/8 ranks and 4 KiB to 16 MiB of float32. Each measurement is
   the slowest rank's time per call; a pair's ratio gloo / ring is the ring's bandwidth over
   gloo's. Bus bandwidth = 2(p-1)/p·n / time (the ring's traffic per rank over the time, as
   in nccl-tests). Target: 4 ranks, 4 MiB: ring ≥ 0.8× gloo's bandwidth (median pair).
2. Model: ``distlab.communication.cost_model.measure`` over the same grid for ring, recursive
   doubling and naive; ``cost_model.fit`` per algorithm. Target: median relative error ≤ 25%.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

import report
from report import fmt_ratio, interleaved, load, pair_ratios, spread, write

import distlab
from distlab.communication import alpha_beta, collectives, cost_model

KIB, MIB = 1024, 1024 * 1024
SIZES = [4 * KIB, 16 * KIB, 64 * KIB, 256 * KIB, 1 * MIB, 4 * MIB, 16 * MIB]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8], help="world sizes")
    ap.add_argument("--message-sizes", type=int, nargs="+", default=SIZES, help="bytes")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved pairs per size")
    args = report.parse_args(ap, argv)
    distlab.warm_up()
    t0, load_before = time.time(), load()
    bw_lines, target = bandwidth_table(args.sizes, args.message_sizes, args.repeats)
    fit_lines, overall = model_table(args.sizes, args.message_sizes, max(3, args.repeats - 2))
    met = "not measured" if target is None else ("met" if target["median"] >= 0.8 else "NOT met")
    body = [
        f"torch {torch.__version__}, gloo on CPU, loopback; took {time.time() - t0:.0f} s. "
        "Float32; small messages measure the scheduler more than the algorithm.", "",
        "## 1. distlab ring all-reduce vs gloo's built-in all_reduce (interleaved pairs)", "",
        *bw_lines, "",
        f"**Target: 4 ranks, 4 MiB, ring ≥ 0.8× gloo's bandwidth: "
        f"{fmt_ratio(target) if target else '-'} ({met}).**", "",
        "## 2. α-β model fitted per algorithm (least squares on relative error)", "",
        *fit_lines, "",
        f"**Target: median relative error ≤ 25% over the grid: measured {100 * overall:.0f}% "
        f"({'met' if overall <= 0.25 else 'NOT met'}).**",
    ]
    write("collectives", "Collectives from scratch: ring all-reduce vs gloo, and the α-β model",
          body, load_before)


def bandwidth_table(world_sizes, sizes, repeats):
    """The table of ring against gloo, and the 4-rank 4 MiB ratio (None if not measured)."""
    rows = []
    for p in world_sizes:
        rows += distlab.launch(_bandwidth_worker, p, sizes, repeats, timeout=300)[0]
    lines = ["| ranks | size | ring (ms) | gloo (ms) | ring bus bw (GB/s) | gloo bus bw (GB/s) "
             "| ring / gloo bandwidth, median (min-max) |", "|---|---|---|---|---|---|---|"]
    target = None
    for r in rows:
        ring, gloo = spread(r["ring"])["median"], spread(r["gloo"])["median"]
        ratio = pair_ratios(r["gloo"], r["ring"])      # time gloo / time ring = bw ring / bw gloo
        traffic = alpha_beta.ring_all_reduce(r["nbytes"], r["world_size"]).nbytes
        lines.append(f"| {r['world_size']} | {_fmt_size(r['nbytes'])} | {1e3 * ring:.3f} | "
                     f"{1e3 * gloo:.3f} | {traffic / ring / 1e9:.2f} | "
                     f"{traffic / gloo / 1e9:.2f} | {fmt_ratio(ratio)} |")
        if r["world_size"] == 4 and r["nbytes"] == 4 * MIB:
            target = ratio
    return lines, target


def model_table(world_sizes, sizes, repeats):
    """The fitted α and β of each algorithm, and the median relative error over the grid."""
    df = cost_model.measure(world_sizes, sizes, ("ring", "recursive_doubling", "naive"),
                            repeats=repeats)
    fits = cost_model.fit(df)
    lines = ["| algorithm | alpha (µs) | beta (ns/byte) | median rel. error | max rel. error "
             "| points |", "|---|---|---|---|---|---|"]
    for f in fits.values():
        lines.append(f"| {f.algorithm} | {1e6 * f.alpha:.1f} | {1e9 * f.beta:.3f} | "
                     f"{100 * f.median_error:.0f}% | {100 * f.max_error:.0f}% | {f.num_points} |")
    return lines, float(cost_model.relative_errors(df, fits).median())


def _bandwidth_worker(sizes, repeats):
    """Per size, ``repeats`` interleaved pairs (ring, gloo) of the slowest rank's time."""
    rows = []
    for nbytes in sizes:
        x = torch.ones(nbytes // 4)
        iters = max(1, min(20, MIB // nbytes))       # small messages: average several calls
        ring = _timer(lambda: collectives.ring_all_reduce(x, check=False), iters)
        gloo = _timer(lambda: dist.all_reduce(x), iters)
        times_ring, times_gloo = interleaved(ring, gloo, pairs=repeats)
        rows.append({"world_size": dist.get_world_size(), "nbytes": nbytes,
                     "ring": times_ring, "gloo": times_gloo})
    return rows


def _timer(op, iters):
    """A measurement: seconds per call of ``op``, the slowest rank's (every rank agrees)."""
    def measure():
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            op()
        dt = torch.tensor([(time.perf_counter() - t0) / iters])
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        return dt.item()
    return measure


def _fmt_size(n):
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB"


if __name__ == "__main__":
    main()
