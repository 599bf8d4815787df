"""Data-parallel step time: distlab's DDP wrappers against torch.nn.parallel.DistributedDataParallel.

One launch of ``world_size`` gloo ranks (1 thread each). Every rank builds one copy of the
same ~5M-parameter MLP per implementation and first checks that all of them end with the
same parameters after the same steps. Then each distlab variant is timed against PyTorch's
DDP as a series of interleaved pairs (distlab, DDP, distlab, DDP, ...): a measurement is the
slowest rank's mean time of ``--steps`` full training steps (forward, backward, gradient
synchronization, SGD step), and the report gives the median pair ratio with its min and
max, beside the machine's load before and after. Target: distlab ``bucketed`` (overlapped
buckets, 25 MiB as DDP's default ``bucket_cap_mb``) <= 1.00x PyTorch's DDP.

    .venv/bin/python benchmarks/bench_ddp.py [--world-size 4] [--hidden 1472] [--pairs 15]
        [--steps 4] [--out DIR]                     # writes DIR/ddp.md, default results/
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import report
from report import fmt_ratio, interleaved, load, pair_ratios, spread, write

import distlab
from distlab.data_parallel import ddp as data_parallel
from distlab.problems import models

TORCH = "torch DDP"
TARGET = 1.00


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1472, help="MLP width (1472: 5.1M parameters)")
    ap.add_argument("--batch-size", type=int, default=32, help="examples per rank")
    ap.add_argument("--pairs", type=int, default=15, help="interleaved pairs per variant")
    ap.add_argument("--steps", type=int, default=4, help="steps per measurement")
    ap.add_argument("--bucket-size-mb", type=float, default=25.0)
    args = report.parse_args(ap)
    t0, load_before = time.time(), load()
    out = distlab.launch(worker, args.world_size, args.hidden, args.batch_size, args.pairs,
                         args.steps, args.bucket_size_mb, timeout=600)[0]
    times, n_params = out["times"], out["num_parameters"]
    lines = [
        f"torch {torch.__version__} · gloo, {args.world_size} ranks, 1 thread each · took "
        f"{time.time() - t0:.0f} s", "",
        f"Model: MLP of {n_params:,} parameters ({4 * n_params / 2**20:.1f} MiB of gradients), "
        f"{args.batch_size} examples per rank, SGD; buckets {args.bucket_size_mb:g} MiB. "
        f"{args.pairs} interleaved pairs (distlab, {TORCH}) per variant, each measurement the "
        f"slowest rank's mean of {args.steps} full steps.", "",
        f"| variant | distlab step (ms) | {TORCH} step (ms) | ratio, median (min-max) "
        "| target | met |", "|---|---|---|---|---|---|"]
    for name in data_parallel.VARIANTS:
        ratio = pair_ratios(times[name], times[f"{TORCH} vs {name}"])
        target, met = "(info)", ""
        if name == "bucketed":
            target, met = f"<= {TARGET:.2f}", "yes" if ratio["median"] <= TARGET else "no"
        lines.append(f"| {name} | {_ms(times[name])} | {_ms(times[f'{TORCH} vs {name}'])} | "
                     f"{fmt_ratio(ratio)} | {target} | {met} |")
    lines += ["", f"Every variant ends with {TORCH}'s parameters after the same steps: "
                  f"{out['same_params']}."]
    write("ddp", "DDP benchmark: distlab's wrappers against PyTorch's DDP", lines, load_before)


def worker(hidden, batch_size, pairs, steps, bucket_size_mb):
    """Every rank: each implementation checked against the others, then timed in pairs."""
    g = torch.Generator().manual_seed(dist.get_rank())
    X = torch.randn(batch_size, 512, generator=g)               # (B, 512): this rank's examples
    y = torch.randint(0, 10, (batch_size,), generator=g)
    runs = {name: _wrap(name, models.mlp(512, hidden, 10, depth=3, seed=0), bucket_size_mb)
            for name in (TORCH, *data_parallel.VARIANTS)}
    measure = {name: _steps(model, X, y, steps) for name, model in runs.items()}
    for m in measure.values():        # the same steps on every copy (and a warm-up)
        m()
    params = [torch.nn.utils.parameters_to_vector(model.parameters()) for model in runs.values()]
    same = all(torch.allclose(p, params[0], atol=1e-5) for p in params)
    times = {}
    for name in data_parallel.VARIANTS:
        times[name], times[f"{TORCH} vs {name}"] = interleaved(measure[name], measure[TORCH],
                                                               pairs=pairs)
    return {"times": times, "same_params": same,
            "num_parameters": models.num_parameters(runs[TORCH].module)}


def _wrap(name, model, bucket_size_mb):
    if name == TORCH:
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_size_mb)
        ddp.finish_gradient_synchronization = lambda: None   # DDP syncs inside backward
        return ddp
    return data_parallel.wrap(model, name, bucket_size_mb=bucket_size_mb)


def _steps(model, X, y, steps):
    """A measurement: the slowest rank's mean seconds per full training step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def measure():
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(X), y).backward()
            model.finish_gradient_synchronization()
            opt.step()
        dt = torch.tensor([(time.perf_counter() - t0) / steps])
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)       # a step is collective: the slowest rank
        return dt.item()
    return measure


def _ms(values):
    return f"{spread(values)['median'] * 1e3:.1f}"


if __name__ == "__main__":
    main()
