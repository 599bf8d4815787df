"""Data-parallel step time: distlab's DDP wrappers against torch.nn.parallel.DistributedDataParallel.

Run:  .venv/bin/python benchmarks/bench_ddp.py  [--world-size 4] [--hidden 1472] [--rounds 3]
      [--steps 4] [--out benchmarks/results/ddp.md]

One launch of ``world_size`` gloo ranks (1 thread each). Every rank builds one copy of the
same ~5M-parameter MLP per variant, then times full training steps (forward, backward,
gradient synchronization, SGD step) in interleaved rounds, so every variant sees the same
machine load. The step time of a variant is the median over its timed steps of the slowest
rank. Target: distlab ``bucketed`` (overlapped buckets, 25 MiB as DDP's default
``bucket_cap_mb``) ≤ 1.10× PyTorch DDP.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import distlab
from distlab.data_parallel import ddp as data_parallel
from distlab.problems import models

VARIANTS = ["torch DDP", "naive", "flat", "overlap", "bucketed"]


def _wrap(name, model, bucket_size_mb):
    if name == "torch DDP":
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_size_mb)
        ddp.finish_gradient_synchronization = lambda: None   # DDP syncs inside backward
        return ddp
    return data_parallel.wrap(model, name, bucket_size_mb=bucket_size_mb)


def worker(hidden, batch_size, rounds, steps, bucket_size_mb):
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    X, y = torch.randn(batch_size, 512, generator=g), torch.randint(0, 10, (batch_size,), generator=g)
    runs = {}
    for name in VARIANTS:
        model = _wrap(name, models.mlp(512, hidden, 10, depth=3, seed=0), bucket_size_mb)
        runs[name] = (model, torch.optim.SGD(model.parameters(), lr=0.01))
    times = {name: [] for name in VARIANTS}
    for r in range(rounds + 1):                      # round 0 warms up every variant
        for name in VARIANTS:
            model, opt = runs[name]
            for _ in range(steps):
                dist.barrier()
                t0 = time.perf_counter()
                opt.zero_grad()
                F.cross_entropy(model(X), y).backward()
                model.finish_gradient_synchronization()
                opt.step()
                step = torch.tensor([time.perf_counter() - t0])
                dist.all_reduce(step, op=dist.ReduceOp.MAX)   # the slowest rank sets the pace
                if r > 0:
                    times[name].append(step.item())
    params = [torch.nn.utils.parameters_to_vector(runs[n][0].parameters()) for n in VARIANTS]
    same = all(torch.allclose(p, params[0], atol=1e-5) for p in params)
    return {"times": times, "same_params": same,
            "num_parameters": models.num_parameters(runs["naive"][0])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1472, help="MLP width (1472: 5.1M parameters)")
    ap.add_argument("--batch-size", type=int, default=32, help="examples per rank")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    ap.add_argument("--bucket-size-mb", type=float, default=25.0)
    ap.add_argument("--out", default="benchmarks/results/ddp.md")
    args = ap.parse_args()

    t0 = time.time()
    out = distlab.launch(worker, args.world_size, args.hidden, args.batch_size, args.rounds,
                         args.steps, args.bucket_size_mb, timeout=600)[0]
    elapsed = time.time() - t0
    med = {n: statistics.median(ts) for n, ts in out["times"].items()}
    base = med["torch DDP"]
    lines = [f"# DDP benchmark ({datetime.date.today()}, {torch.get_num_threads()} cores visible "
             f"to torch, torch {torch.__version__})", "",
             f"Command: `python benchmarks/bench_ddp.py --world-size {args.world_size} "
             f"--hidden {args.hidden} --rounds {args.rounds} --steps {args.steps}` "
             f"({elapsed:.0f} s)", "",
             f"{args.world_size} gloo ranks, 1 thread each; MLP of {out['num_parameters']:,} "
             f"parameters ({4 * out['num_parameters'] / 2**20:.1f} MiB of gradients), "
             f"{args.batch_size} examples per rank; buckets {args.bucket_size_mb:g} MiB. "
             f"Median over {args.rounds}×{args.steps} interleaved steps of the slowest rank's "
             f"step time.", "",
             "| variant | step (ms) | min (ms) | ratio to torch DDP |", "|---|---|---|---|"]
    for n in VARIANTS:
        lines.append(f"| {n} | {1e3 * med[n]:.1f} | {1e3 * min(out['times'][n]):.1f} | "
                     f"{med[n] / base:.2f}× |")
    verdict = "met" if med["bucketed"] / base <= 1.10 else "NOT met"
    lines += ["", f"Target: bucketed ≤ 1.10× torch DDP: **{verdict}** "
                  f"({med['bucketed'] / base:.2f}×). All variants end with the same parameters: "
                  f"{out['same_params']}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
