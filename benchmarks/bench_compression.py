"""Communication-efficient training: distlab against PyTorch's own equivalents, same run.

Run:  .venv/bin/python benchmarks/bench_compression.py [--sizes 2 4] [--out benchmarks/results/compression.md]

1. Local SGD (H = 8, 200 steps, the lab's MLP on the digits): ``distlab.communication_efficient.local_sgd.train``
   against a loop with ``torch.optim.SGD`` and PyTorch's
   ``torch.distributed.algorithms.model_averaging.averagers.PeriodicModelAverager``, in the
   same processes, interleaved. Targets: the same final parameters (max |diff| <= 1e-5) and
   wall time <= 1.2x PyTorch's.
2. One averaging of a 2^20-float vector (4 MiB) per compressor, ``all_reduce_compressed``
   against PyTorch's ``dist.all_reduce`` of the float32 vector (the uncompressed
   equivalent) and, for fp16, against ``dist.all_reduce`` of ``x.half()`` (what PyTorch's
   ``fp16_compress_hook`` for DDP does). Targets: bytes per rank exactly the analytic
   payload volume; top-k 1% and sign >= 10x fewer bytes than float32. On one machine's
   loopback, bandwidth is nearly free, so measured times mostly show compression's
   compute cost; the simulated time at 1 Gbit/s (alpha = 50 us) shows what the bytes buy
   on a real network.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch
import torch.distributed as dist

import distlab
from distlab import comm
from distlab.communication import alpha_beta
from distlab.communication_efficient import local_sgd
from distlab.communication_efficient.compression import (METHODS, all_reduce_compressed,
                                                         bytes_sent_per_call, make_compressor)
from distlab.problems.data import digits
from distlab.problems.models import mlp

STEPS, PERIOD, N, REPEATS = 200, 8, 2 ** 20, 5
ALPHA, BANDWIDTH = 50e-6, 1.25e8          # simulated network: 50 us, 1 Gbit/s


def _torch_local_sgd(config):
    """Local SGD with PyTorch's own PeriodicModelAverager (averages after steps 8, 16, ...)."""
    import torch.nn.functional as F
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    rank, p = dist.get_rank(), dist.get_world_size()
    data = digits(seed=config.seed)
    shard = local_sgd.split(data, config.shards, p, config.classes_per_rank, config.seed)[rank]
    model = mlp(64, config.hidden, 10, depth=1, seed=config.seed)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr)
    averager = PeriodicModelAverager(period=config.period, warmup_steps=config.period - 1)
    batches = local_sgd.sample_batches(shard, config.batch_size,
                                       seed=config.seed * 1000 + rank + 1)
    for step in range(1, config.num_steps + 1):
        idx = next(batches)
        opt.zero_grad()
        F.cross_entropy(model(data.X[idx]), data.y[idx]).backward()
        opt.step()
        averager.average_parameters(model.parameters())
        if step % config.period == 0 and rank == 0:
            local_sgd.evaluate(model, data)      # distlab evaluates after every average too
    return torch.cat([w.detach().reshape(-1) for w in model.parameters()])


def local_sgd_worker(config):
    times = {"distlab": [], "pytorch": []}
    for _ in range(3):                            # interleaved: both see the same machine load
        dist.barrier()
        t0 = time.perf_counter()
        ours = torch.tensor(local_sgd.train(config, record=lambda **r: None)["params"])
        times["distlab"].append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        theirs = _torch_local_sgd(config)
        times["pytorch"].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, (ours - theirs).abs().max().item()


def _timed(fn):
    out = []
    for _ in range(REPEATS + 1):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out[1:])              # the first call warms up


def compression_worker():
    x = torch.randn(N, generator=torch.Generator().manual_seed(dist.get_rank()))
    rows = {"pytorch all_reduce fp32": (_timed(lambda: dist.all_reduce(x.clone())), None),
            "pytorch all_reduce fp16 (fp16_compress_hook)":
                (_timed(lambda: dist.all_reduce(x.half())), None)}
    for method in METHODS:
        c = make_compressor(method, ratio=0.01)
        residual = torch.zeros(N)
        comm.ledger().reset()
        seconds = _timed(lambda: all_reduce_compressed(x, c, residual))
        sent = comm.ledger().totals()["bytes_sent"] // (REPEATS + 1)
        rows[f"distlab {method}"] = (seconds, sent)
    return rows


def simulated(nbytes, method, p):
    """Seconds on the simulated network: a ring all-reduce of summable payloads, else a ring
    all-gather (``nbytes`` is what one rank sends)."""
    op = "all_reduce" if make_compressor(method).summable else "all_gather"
    return alpha_beta.ledger_time({op: {"calls": 1, "bytes_sent": nbytes}}, p, ALPHA,
                                  1 / BANDWIDTH)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--out", default="benchmarks/results/compression.md")
    args = ap.parse_args()
    distlab.warm_up()
    configs = {p: local_sgd.LocalSGDConfig(world_size=p, num_steps=STEPS, period=PERIOD)
               for p in args.sizes}
    lines = ["# Communication-efficient training: distlab against PyTorch\n",
             f"Command: `.venv/bin/python benchmarks/bench_compression.py "
             f"--sizes {' '.join(map(str, args.sizes))}`  ",
             f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
             f"gloo on CPU, one thread per rank; shared 2-core machine (noisy).\n",
             f"## 1. Local SGD, H = {PERIOD}, {STEPS} steps: distlab against PeriodicModelAverager\n",
             "| ranks | distlab (s) | PyTorch (s) | ratio | max abs param diff | targets (<= 1.2x, <= 1e-5) |",
             "|---|---|---|---|---|---|"]
    for p in args.sizes:
        res = distlab.launch(local_sgd_worker, p, configs[p], timeout=600)
        times, diff = res[0]
        ratio = times["distlab"] / times["pytorch"]
        ok = "met" if ratio <= 1.2 and diff <= 1e-5 else "NOT met"
        lines.append(f"| {p} | {times['distlab']:.3f} | {times['pytorch']:.3f} | {ratio:.2f}x "
                     f"| {diff:.1e} | {ok} |")
        print(lines[-1], flush=True)
    lines += ["", f"## 2. One average of {N:,} floats ({4 * N // 2 ** 20} MiB) per rank\n",
              "Ratios are against PyTorch's float32 all-reduce, measured in the same launch. "
              f"Simulated: alpha = {ALPHA * 1e6:g} us per message, {BANDWIDTH * 8 / 1e9:g} Gbit/s.\n",
              "| ranks | method | bytes sent per rank | = analytic | bytes vs fp32 | measured ms "
              "| time vs PyTorch fp32 | simulated ms |",
              "|---|---|---|---|---|---|---|---|"]
    for p in args.sizes:
        rows = distlab.launch(compression_worker, p, timeout=600)[0]
        base = rows["pytorch all_reduce fp32"][0]
        dense = bytes_sent_per_call(make_compressor("none"), N, p)
        for name, (seconds, sent) in rows.items():
            method = name.split()[-1] if name.startswith("distlab") else None
            if method is None:
                nbytes = dense if "fp32" in name else dense // 2
                exact, sim = "–", simulated(nbytes, "none", p)
            else:
                nbytes = sent
                want = bytes_sent_per_call(make_compressor(method, ratio=0.01), N, p)
                exact, sim = ("yes" if sent == want else f"NO ({want})"), simulated(sent, method, p)
            lines.append(f"| {p} | {name} | {nbytes:,} | {exact} | {dense / nbytes:.1f}x fewer "
                         f"| {seconds * 1e3:.1f} | {seconds / base:.2f}x | {sim * 1e3:.1f} |")
            print(lines[-1], flush=True)
    lines += ["", "Targets: bytes equal the analytic size (column 4); top-k 1% and sign send "
              ">= 10x fewer bytes than float32 (column 5)."]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
