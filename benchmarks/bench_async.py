"""Asynchronous SGD: parameter-server throughput, and time to a target loss with a straggler.

Run:  .venv/bin/python benchmarks/bench_async.py  [--repeats 3]   (writes results/async.md)

1. **Throughput.** Gradients applied per second by distlab's parameter server (fully
   asynchronous, digits MLP of ~90k parameters, batch 32, no simulated compute) for 1, 2, 4
   and 8 workers, with one server rank and with the parameters sharded over two; beside it
   PyTorch's own synchronous data parallelism (``torch.nn.parallel.DistributedDataParallel``,
   the same model and batch per worker), counted in gradients per second too.
2. **Time to target.** 4 workers on linear regression, each gradient costing 20 ms of
   simulated compute and the last worker 3x slower: wall time from the first update until
   the training loss is at most 0.02, for torch DDP, the parameter server in BSP mode
   (``staleness=0``) and fully asynchronous (``staleness=None``), sync and async interleaved
   in ``--repeats`` pairs. Target: the median pair ratio async / sync <= 0.6.

Everything shares the machine with whatever else runs on it: numbers are noisy, read ratios.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import replace

import torch
import torch.distributed as dist
from report import fmt_ratio, interleaved, load, pair_ratios, spread, write

import distlab
from distlab.asynchronous import parameter_server as ps
from distlab.asynchronous.ps_config import worker_batch
from distlab.problems.convex import WORKLOAD

STEP_TIME, STRAGGLER, TARGET, LR = 0.02, 3.0, 0.02, 0.1
BIG_MLP = replace(WORKLOAD, model="mlp", hidden=1200)   # digits, ~90k parameters, batch 32


def ddp_worker(config: ps.ParameterServerConfig, num_steps: int, straggler: float,
               target: float | None) -> dict:
    """PyTorch's synchronous SGD on the parameter server's problem, data and batches."""
    rank, world = dist.get_rank(), dist.get_world_size()
    workload = config.workload.loaded()
    model, ds, loss_fn = workload.build_model(), workload.dataset, workload.loss
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = workload.optimizer(ddp.parameters())
    slow = straggler if rank == world - 1 else 1.0
    dist.barrier()
    t0, reached = time.perf_counter(), None
    for step in range(num_steps):
        if target is not None:
            with torch.no_grad():
                loss = float(loss_fn(model(ds.X), ds.y))
            flag = torch.tensor([float(loss <= target)])
            dist.broadcast(flag, 0)                 # every rank stops at the same step
            if flag.item():
                reached = time.perf_counter() - t0
                break
        t = time.perf_counter()
        idx = worker_batch(config, ds, rank, step)
        opt.zero_grad()
        loss_fn(ddp(ds.X[idx]), ds.y[idx]).backward()     # all-reduce inside backward
        work = time.perf_counter() - t + config.step_time
        time.sleep((slow - 1.0) * work + config.step_time)
        opt.step()
    elapsed = time.perf_counter() - t0
    return {"gradients_per_s": world * (step + 1) / elapsed, "time_to_target": reached}


def ps_time_to_target(config: ps.ParameterServerConfig) -> float:
    """Seconds from the first update to the target loss (inf if never reached)."""
    m = ps.run(config, timeout=120).metrics.dropna(subset=["loss"])
    hit = m[m["loss"] <= TARGET]
    return float(hit["time"].min() - m["time"].min()) if len(hit) else math.inf


def throughput(repeats: int) -> list[dict]:
    rows = []
    for workers in (1, 2, 4, 8):
        row = {"workers": workers}
        for servers in (1, 2):
            cfg = ps.ParameterServerConfig(replace(BIG_MLP, num_steps=50 * workers, lr=0.01),
                                           num_workers=workers, num_servers=servers,
                                           staleness=None, eval_size=64)
            rates = []
            for _ in range(repeats):
                result = ps.run(cfg, timeout=120)
                rates.append(statistics.mean(s["updates_per_s"] for s in result.servers))
            row[f"ps_{servers}"] = statistics.median(rates)
        cfg = ps.ParameterServerConfig(BIG_MLP, num_workers=workers)
        rates = [distlab.launch(ddp_worker, workers, cfg, 40, 1.0, None,
                                timeout=120)[0]["gradients_per_s"] for _ in range(repeats)]
        row["ddp"] = statistics.median(rates)
        rows.append(row)
        print(row, flush=True)
    return rows


def time_to_target(repeats: int) -> dict:
    """Seconds to the target: PS sync and PS async interleaved in pairs, then torch DDP."""
    base = dict(workload=replace(WORKLOAD, lr=LR, num_steps=400), num_workers=4,
                step_time=STEP_TIME, slowdown=(1, 1, 1, STRAGGLER), target_loss=TARGET)
    sync = ps.ParameterServerConfig(staleness=0, **base)
    out = {}
    out["PS sync (BSP)"], out["PS async"] = interleaved(
        lambda: ps_time_to_target(sync),
        lambda: ps_time_to_target(ps.ParameterServerConfig(staleness=None, **base)),
        pairs=repeats, warmup=0)
    reached = [distlab.launch(ddp_worker, 4, sync, 400, STRAGGLER, TARGET,
                              timeout=120)[0]["time_to_target"] for _ in range(repeats)]
    out["torch DDP"] = [math.inf if t is None else t for t in reached]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3,
                        help="time-to-target pairs (throughput: --repeats // 2, at least 1)")
    args = parser.parse_args()
    t0, load_before = time.time(), load()
    distlab.warm_up()
    rows = throughput(max(1, args.repeats // 2))
    ttt = time_to_target(args.repeats)
    ratio = pair_ratios(ttt["PS async"], ttt["PS sync (BSP)"])
    params = sum(p.numel() for p in BIG_MLP.build_model().parameters())
    lines = [
        f"{torch.get_num_threads()} threads visible to torch, torch {torch.__version__}; "
        f"{time.time() - t0:.0f} s in all.", "",
        f"## Throughput: gradients applied per second (digits MLP, {params:,} parameters, "
        f"batch 32, no simulated compute; median of {max(1, args.repeats // 2)})", "",
        "| workers | PS, 1 server | PS, 2 servers (sharded) | sharded / 1 server "
        "| torch DDP (sync) | PS 1 server / DDP |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['ps_1']:.0f} | {r['ps_2']:.0f} | "
                     f"{r['ps_2'] / r['ps_1']:.2f}x | {r['ddp']:.0f} | "
                     f"{r['ps_1'] / r['ddp']:.2f}x |")
    lines += ["", f"## Time to training loss <= {TARGET}: 4 workers, one {STRAGGLER:g}x "
              f"straggler, {STEP_TIME * 1000:.0f} ms simulated compute per gradient", "",
              "| run | median (s) | min-max (s) | all runs (s) |", "|---|---|---|---|"]
    for k, v in ttt.items():
        sp = spread(v)
        lines.append(f"| {k} | {sp['median']:.2f} | {sp['min']:.2f}-{sp['max']:.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in v)} |")
    lines += ["", f"PS async / PS sync over interleaved pairs: {fmt_ratio(ratio)}. Target "
              f"<= 0.6x: **{'met' if ratio['median'] <= 0.6 else 'not met'}**.", "",
              "Reading the throughput table: every rank is a process on the same cores, so "
              "on a 2-core machine a second server rank competes with the workers for CPU "
              "instead of adding network links; sharding pays off when ranks have their own "
              "cores (and links). Torch DDP counts W gradients per synchronous step; the "
              "parameter server pays a round trip per gradient."]
    write("async", "Asynchronous SGD benchmark", lines, load_before)


if __name__ == "__main__":
    main()
