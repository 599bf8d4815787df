"""Benchmark: distlab's ZeRO stage 1 and stage 3 against PyTorch's own, on gloo.

* stage 1: ``distlab.sharding.zero.ShardedOptimizer`` vs
  ``torch.distributed.optim.ZeroRedundancyOptimizer``, both with gradients averaged by the
  same flat all-reduce beforehand (the convention of both);
* stage 3: ``distlab.sharding.fsdp.FullyShardedDataParallel`` vs FSDP2
  ``torch.distributed.fsdp.fully_shard`` (one unit per Linear, then the root);
* memory: the optimizer state each rank holds, against the full state / N.

Each comparison is a series of interleaved pairs (distlab, PyTorch, distlab, PyTorch, ...);
a measurement is the slowest rank's mean time of ``--steps`` full steps, and the report gives
the median pair ratio with its min and max. Targets: ZeRO-1's step time <= 1.00x PyTorch's,
ZeRO-3's <= 1.25x; optimizer state per rank <= 1.05 x full / N.

    .venv/bin/python benchmarks/bench_zero.py [--world-size 4] [--width 512] [--depth 4]
        [--rounds 20] [--steps 5] [--out DIR]      # writes DIR/zero.md, default results/
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.distributed as dist
from torch import nn

import report
from report import fmt_ratio, interleaved, load, pair_ratios, spread, write

import distlab
from distlab.data_parallel.ddp import average_gradients
from distlab.sharding import zero
from distlab.sharding.fsdp import FullyShardedDataParallel

BATCH = 64
COMPARISONS = (("zero1 distlab", "zero1 torch", "ZeRO-1 full step vs ZeroRedundancyOptimizer",
                1.00),
               ("zero3 distlab", "zero3 torch fsdp2", "ZeRO-3 full step vs FSDP2 fully_shard", 1.25))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--width", type=int, default=512, help="Linear layers of width x width")
    ap.add_argument("--depth", type=int, default=4, help="Linear layers")
    ap.add_argument("--rounds", type=int, default=20, help="interleaved pairs per comparison")
    ap.add_argument("--steps", type=int, default=5, help="steps per measurement")
    args = report.parse_args(ap)
    t0, load_before = time.time(), load()
    results = distlab.launch(worker, args.world_size, args.width, args.depth, args.rounds,
                             args.steps, timeout=600)
    times, full = results[0]["times"], results[0]["full_state"]    # every rank's are the same
    n = args.world_size
    num_params = sum(p.numel() for p in build(args.width, args.depth).parameters())
    lines = [
        f"torch {torch.__version__} · gloo, {n} ranks · took {time.time() - t0:.0f} s", "",
        f"Model: MLP, {args.depth} Linear layers of {args.width}x{args.width} "
        f"({num_params:,} parameters), Adam, global batch {BATCH}. {args.rounds} interleaved "
        f"pairs of {args.steps} steps per comparison; a full step is forward, backward, "
        "gradient averaging (the same flat all-reduce for both ZeRO-1 optimizers) and "
        "`optimizer.step()`; the slowest rank's time.", "",
        "| comparison | distlab step (ms) | PyTorch step (ms) | ratio, median (min-max) "
        "| target | met |", "|---|---|---|---|---|---|"]
    for ours, theirs, label, target in COMPARISONS:
        ratio = pair_ratios(times[ours], times[theirs])
        met = "yes" if ratio["median"] <= target else "no"
        lines.append(f"| {label} | {_ms(times[ours])} | {_ms(times[theirs])} | "
                     f"{fmt_ratio(ratio)} | <= {target:.2f} | {met} |")
    ratio = pair_ratios(times["zero1 distlab step"], times["zero1 torch step"])
    lines.append(f"| ZeRO-1 `optimizer.step()` alone | {_ms(times['zero1 distlab step'])} | "
                 f"{_ms(times['zero1 torch step'])} | {fmt_ratio(ratio)} | (info) | |")
    lines += ["", "Optimizer state per rank (largest rank), against the full Adam state / N "
              f"= {full / n / 1024:.1f} KiB:", "",
              "| implementation | KiB per rank (max) | / (full / N) | target | met |",
              "|---|---|---|---|---|"]
    for name in results[0]["memory"]:
        worst = max(r["memory"][name] for r in results)
        ratio = worst / (full / n)
        target = "<= 1.05" if "distlab" in name else "(reference)"
        met = ("yes" if ratio <= 1.05 else "no") if "distlab" in name else ""
        lines.append(f"| {name} | {worst / 1024:.1f} | {ratio:.3f} | {target} | {met} |")
    lines += ["", "ZeroRedundancyOptimizer assigns whole parameters to ranks (balanced here: "
              f"{args.depth} equal layers on {n} ranks; unequal in general); distlab and "
              "FSDP2 cut every parameter into N equal chunks, so they stay within padding of "
              "full / N for any model.", "",
              "What ZeRO-1's step does beyond Adam on the shards: one all-gather, straight into "
              "the flat buffer the parameters live in (DeepSpeed's layout: rank r owns slice r "
              "of all the parameters end to end), so nothing is packed or unpacked. "
              "ZeroRedundancyOptimizer owns whole parameters and broadcasts each from its "
              "owner straight into it: no copy either, one broadcast per parameter."]
    write("zero", "ZeRO benchmark: distlab against PyTorch", lines, load_before)


def worker(width, depth, rounds, steps):
    """Every rank: the four implementations, timed in interleaved pairs of comparisons."""
    warnings.filterwarnings("ignore")
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer
    world_size = dist.get_world_size()
    x = torch.randn(BATCH // world_size, width,                      # (B/N, width)
                    generator=torch.Generator().manual_seed(dist.get_rank()))
    adam = torch.optim.Adam
    m1, m2, m3, m4 = (build(width, depth) for _ in range(4))
    f = FullyShardedDataParallel(m3)
    for layer in m4:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(m4)
    runs = {"zero1 distlab": (m1, zero.ShardedOptimizer(m1.parameters(), adam, lr=1e-3), True),
            "zero1 torch": (m2, ZeroRedundancyOptimizer(m2.parameters(), adam, lr=1e-3), True),
            "zero3 distlab": (f, adam(f.parameters(), lr=1e-3), False),
            "zero3 torch fsdp2": (m4, adam(m4.parameters(), lr=1e-3), False)}
    opt_times = {name: [] for name in runs}       # optimizer.step() alone, beside each measurement
    measure = {name: _steps(x, *run, steps, opt_times[name]) for name, run in runs.items()}
    times = {}
    for ours, theirs, _, _ in COMPARISONS:
        times[ours], times[theirs] = interleaved(measure[ours], measure[theirs], pairs=rounds,
                                                 warmup=2)
    for name in ("zero1 distlab", "zero1 torch"):
        times[f"{name} step"] = opt_times[name][2:]                  # without the warm-up
    full_model = build(width, depth)
    plain = adam(full_model.parameters(), lr=1e-3)
    full_model(x).sum().backward()
    plain.step()
    memory = {name: state_bytes(getattr(opt, "optim", opt)) for name, (_, opt, _) in runs.items()}
    return {"times": times, "memory": memory, "full_state": state_bytes(plain)}


def _steps(x, model, opt, average, steps, opt_times):
    """A measurement: the slowest rank's mean seconds per full step; the mean seconds of
    ``optimizer.step()`` alone go to ``opt_times``."""
    def measure():
        dist.barrier()
        t0, opt_time = time.perf_counter(), 0.0
        for _ in range(steps):
            opt.zero_grad()
            model(x).square().mean().backward()
            if average:
                average_gradients(list(model.parameters()))
            t = time.perf_counter()
            opt.step()
            opt_time += time.perf_counter() - t
        dt = torch.tensor([(time.perf_counter() - t0) / steps, opt_time / steps])
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)      # a step is collective: the slowest rank
        opt_times.append(dt[1].item())
        return dt[0].item()
    return measure


def build(width, depth):
    torch.manual_seed(0)
    layers = [nn.Linear(width, width) if i % 2 == 0 else nn.ReLU() for i in range(2 * depth - 1)]
    return nn.Sequential(*layers)


def state_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                v = v.to_local() if hasattr(v, "to_local") else v
                total += v.numel() * v.element_size()
    return total


def _ms(values):
    return f"{spread(values)['median'] * 1e3:.1f}"


if __name__ == "__main__":
    main()
