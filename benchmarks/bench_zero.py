"""Benchmark: distlab's ZeRO stage 1 and stage 3 against PyTorch's own, on gloo, 4 ranks.

* stage 1: ``distlab.sharding.zero.ShardedOptimizer`` vs ``torch.distributed.optim.ZeroRedundancyOptimizer``,
  both with gradients averaged by the same flat all-reduce beforehand (the convention of both);
* stage 3: ``distlab.sharding.fsdp.FullyShardedDataParallel`` vs FSDP2
  ``torch.distributed.fsdp.fully_shard`` (one unit per Linear, then the root);
* memory: the optimizer state each rank holds, against the full state / N.

Each rank alternates the implementations in rounds and the median round is kept, so slow
phases of a shared machine hit both alike. Targets: step time <= 1.25x PyTorch's; optimizer
state per rank <= 1.05 x full / N.

    .venv/bin/python benchmarks/bench_zero.py            # writes benchmarks/results/zero.md
"""
from __future__ import annotations

import datetime
import os
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch import nn

import distlab
from distlab import comm
from distlab.data_parallel.ddp import average_gradients
from distlab.sharding import zero
from distlab.sharding.fsdp import FullyShardedDataParallel

WORLD_SIZE, WIDTH, DEPTH, BATCH, STEPS, ROUNDS = 4, 512, 4, 64, 5, 20


def build():
    torch.manual_seed(0)
    layers = [nn.Linear(WIDTH, WIDTH) if i % 2 == 0 else nn.ReLU() for i in range(2 * DEPTH - 1)]
    return nn.Sequential(*layers)


def state_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                v = v.to_local() if hasattr(v, "to_local") else v
                total += v.numel() * v.element_size()
    return total


def worker():
    warnings.filterwarnings("ignore")
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer
    rank = dist.get_rank()
    x = torch.randn(BATCH // WORLD_SIZE, WIDTH, generator=torch.Generator().manual_seed(rank))

    def setups():
        m1, m2, m3, m4 = build(), build(), build(), build()
        adam = torch.optim.Adam
        yield "zero1 distlab", m1, zero.ShardedOptimizer(m1.parameters(), adam, lr=1e-3), True
        yield "zero1 torch", m2, ZeroRedundancyOptimizer(m2.parameters(), adam, lr=1e-3), True
        f = FullyShardedDataParallel(m3)
        yield "zero3 distlab", f, torch.optim.Adam(f.parameters(), lr=1e-3), False
        for layer in m4:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(m4)
        yield "zero3 torch fsdp2", m4, torch.optim.Adam(m4.parameters(), lr=1e-3), False

    runs = list(setups())
    times = {name: [] for name, *_ in runs}
    step_times = {name: [] for name, *_ in runs}

    def one_step(model, opt, average):
        opt.zero_grad()
        model(x).square().mean().backward()
        if average:
            average_gradients(list(model.parameters()))
        t = time.perf_counter()
        opt.step()
        return time.perf_counter() - t

    for name, model, opt, average in runs:           # warm-up: state allocated, caches hot
        for _ in range(2):
            one_step(model, opt, average)
    for round_ in range(ROUNDS):
        for name, model, opt, average in runs[round_ % 4:] + runs[:round_ % 4]:   # rotate
            comm.barrier()
            t0, opt_time = time.perf_counter(), 0.0
            for _ in range(STEPS):
                opt_time += one_step(model, opt, average)
            times[name].append((time.perf_counter() - t0) / STEPS)
            step_times[name].append(opt_time / STEPS)
    full = build()
    plain = torch.optim.Adam(full.parameters(), lr=1e-3)
    full(x).sum().backward()
    plain.step()
    mem = {name: state_bytes(getattr(opt, "optim", opt)) for name, _, opt, _ in runs}
    return {"times": times, "opt_times": step_times, "memory": mem,
            "full_state": state_bytes(plain)}


def main():
    t0 = time.time()
    results = distlab.launch(worker, WORLD_SIZE, timeout=600)
    elapsed = time.time() - t0
    # A step is collective, so the slowest rank's time is the step's time.
    med = {name: statistics.median(max(r["times"][name][i] for r in results)
                                   for i in range(ROUNDS)) for name in results[0]["times"]}
    opt_med = {name: statistics.median(max(r["opt_times"][name][i] for r in results)
                                       for i in range(ROUNDS)) for name in results[0]["times"]}
    full = results[0]["full_state"]
    lines = [
        "# ZeRO benchmark: distlab against PyTorch",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_zero.py` · date "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC · torch "
        f"{torch.__version__} · gloo, {WORLD_SIZE} ranks on {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f} · took {elapsed:.0f} s",
        "",
        f"Model: MLP, {DEPTH} Linear layers of {WIDTH}x{WIDTH} "
        f"({sum(p.numel() for p in build().parameters()):,} parameters), Adam, global batch "
        f"{BATCH}. Median of {ROUNDS} rounds of {STEPS} steps, implementations alternated "
        "(order rotated each round). A full step is forward, backward, gradient averaging "
        "(the same flat all-reduce for both ZeRO-1 optimizers) and `optimizer.step()`.",
        "",
        "| comparison | distlab step (ms) | PyTorch step (ms) | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for ours, theirs, label in (("zero1 distlab", "zero1 torch",
                                 "ZeRO-1 full step vs ZeroRedundancyOptimizer"),
                                ("zero3 distlab", "zero3 torch fsdp2",
                                 "ZeRO-3 full step vs FSDP2 fully_shard")):
        ratio = med[ours] / med[theirs]
        lines.append(f"| {label} | {med[ours] * 1e3:.1f} | {med[theirs] * 1e3:.1f} | "
                     f"{ratio:.2f} | <= 1.25 | {'yes' if ratio <= 1.25 else 'no'} |")
    ratio = opt_med["zero1 distlab"] / opt_med["zero1 torch"]
    lines.append(f"| ZeRO-1 `optimizer.step()` alone | {opt_med['zero1 distlab'] * 1e3:.1f} | "
                 f"{opt_med['zero1 torch'] * 1e3:.1f} | {ratio:.2f} | (info) | |")
    lines += ["", "Optimizer state per rank (largest rank), against the full Adam state / N "
              f"= {full / WORLD_SIZE / 1024:.1f} KiB:", "",
              "| implementation | KiB per rank (max) | / (full / N) | target | met |",
              "|---|---|---|---|---|"]
    for name in results[0]["memory"]:
        worst = max(r["memory"][name] for r in results)
        ratio = worst / (full / WORLD_SIZE)
        target = "<= 1.05" if "distlab" in name else "(reference)"
        met = ("yes" if ratio <= 1.05 else "no") if "distlab" in name else ""
        lines.append(f"| {name} | {worst / 1024:.1f} | {ratio:.3f} | {target} | {met} |")
    lines += ["", "ZeroRedundancyOptimizer assigns whole parameters to ranks (balanced here: "
              f"{DEPTH} equal layers on {WORLD_SIZE} ranks; unequal in general); distlab and "
              "FSDP2 cut every parameter into N equal chunks, so they stay within padding of "
              "full / N for any model.", ""]
    text = "\n".join(lines)
    print(text)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "zero.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
