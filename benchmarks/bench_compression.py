"""Communication-efficient training: distlab against PyTorch's own equivalents, same run.

Run:  .venv/bin/python benchmarks/bench_compression.py [--sizes 2 4] [--repeats 5]
      [--steps 200] [--floats 1048576] [--out DIR]   (writes DIR/compression.md, default results/)

1. Local SGD (H = 8, 200 steps, lab 06's workload: the MLP on the digits, 16 examples per
   rank per step): ``distlab.communication_efficient.local_sgd.train`` against a loop with
   ``torch.optim.SGD`` and PyTorch's
   ``torch.distributed.algorithms.model_averaging.averagers.PeriodicModelAverager``, in the
   same processes, in interleaved pairs (distlab, PyTorch, distlab, ...); a measurement is
   the slowest rank's time. Targets: the same final parameters (max |diff| <= 1e-5) and
   wall time <= 1.2x PyTorch's (median pair).
2. One averaging of a 2^20-float vector (4 MiB) per compressor, ``all_reduce_compressed``
   against PyTorch's ``dist.all_reduce`` of the float32 vector (the uncompressed
   equivalent), each in interleaved pairs with it; and ``dist.all_reduce`` of ``x.half()``
   (what PyTorch's ``fp16_compress_hook`` for DDP does) the same way. Targets: bytes per
   rank exactly the analytic payload volume; top-k 1% and sign >= 10x fewer bytes than
   float32. On one machine's loopback, bandwidth is nearly free, so measured times mostly
   show compression's compute cost; the simulated time at 1 Gbit/s (alpha = 50 us) shows
   what the bytes buy on a real network.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

import report
from report import fmt_ratio, interleaved, load, pair_ratios, spread, write

import distlab
from distlab import comm
from distlab.communication import alpha_beta
from distlab.communication_efficient import local_sgd, local_training
from distlab.communication_efficient.compression import (METHODS, all_reduce_compressed,
                                                         bytes_sent_per_call, make_compressor)

PERIOD, PER_RANK = 8, 16
ALPHA, BANDWIDTH = 50e-6, 1.25e8          # simulated network: 50 us, 1 Gbit/s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 4], help="world sizes")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved pairs per measurement")
    ap.add_argument("--steps", type=int, default=200, help="local SGD steps per run")
    ap.add_argument("--floats", type=int, default=2 ** 20, help="length of the averaged vector")
    args = report.parse_args(ap, argv)
    distlab.warm_up()
    t0, load_before = time.time(), load()
    local_lines, local_met = local_sgd_table(args.sizes, args.steps, args.repeats)
    body = [
        f"torch {torch.__version__}, gloo on CPU, one thread per rank, loopback; took "
        f"{time.time() - t0:.0f} s.", "",
        f"## 1. Local SGD, H = {PERIOD}, {args.steps} steps: distlab against "
        "PeriodicModelAverager (interleaved pairs)", "",
        *local_lines, "",
        f"**Targets: distlab / PyTorch <= 1.2x (median pair) and max |param diff| <= 1e-5: "
        f"{'met' if local_met else 'NOT met'}.**", "",
        f"## 2. One average of {args.floats:,} floats ({4 * args.floats / 2 ** 20:g} MiB) "
        "per rank", "",
        "Each row's time ratio is a median (min-max) of interleaved pairs with PyTorch's "
        f"float32 all-reduce. Simulated: alpha = {ALPHA * 1e6:g} us per message, "
        f"{BANDWIDTH * 8 / 1e9:g} Gbit/s.", "",
        *compression_table(args.sizes, args.floats, args.repeats), "",
        "**Targets: bytes equal the analytic size (column 4); top-k 1% and sign send >= 10x "
        "fewer bytes than float32 (column 5).**",
    ]
    write("compression", "Communication-efficient training: distlab against PyTorch", body,
          load_before)


def local_sgd_table(world_sizes, steps, pairs):
    """The table of distlab's local SGD against PeriodicModelAverager; whether both targets
    held on every world size."""
    lines = ["| ranks | distlab (s) | PyTorch (s) | distlab / PyTorch, median (min-max) "
             "| max abs param diff |", "|---|---|---|---|---|"]
    met = True
    for p in world_sizes:
        workload = replace(local_sgd.WORKLOAD, num_steps=steps, batch_size=PER_RANK * p)
        config = local_training.with_data(local_sgd.LocalSGDConfig(
            workload=workload, world_size=p, period=PERIOD))
        ours, theirs, diff = distlab.launch(_local_sgd_worker, p, config, pairs,
                                            timeout=600)[0]
        ratio = pair_ratios(ours, theirs)
        met &= ratio["median"] <= 1.2 and diff <= 1e-5
        lines.append(f"| {p} | {spread(ours)['median']:.3f} | {spread(theirs)['median']:.3f} "
                     f"| {fmt_ratio(ratio)} | {diff:.1e} |")
        print(lines[-1], flush=True)
    return lines, met


def compression_table(world_sizes, n, pairs):
    """One row per world size and method: bytes (measured and analytic), time against
    PyTorch's float32 all-reduce, simulated time."""
    lines = ["| ranks | method | bytes sent per rank | = analytic | bytes vs fp32 "
             "| measured ms (median) | time / PyTorch fp32, median (min-max) | simulated ms |",
             "|---|---|---|---|---|---|---|---|"]
    for p in world_sizes:
        dense = bytes_sent_per_call(make_compressor("none"), n, p)
        for name, (ours, theirs, sent) in distlab.launch(_compression_worker, p, n, pairs,
                                                         timeout=600)[0].items():
            method = name.split()[-1] if name.startswith("distlab") else "none"
            if sent is None:                                  # PyTorch: the analytic volume
                sent, exact = (dense // 2 if "fp16" in name else dense), "–"
            else:
                want = bytes_sent_per_call(make_compressor(method, ratio=0.01), n, p)
                exact = "yes" if sent == want else f"NO ({want:,})"
            lines.append(f"| {p} | {name} | {sent:,} | {exact} | {dense / sent:.1f}x fewer "
                         f"| {spread(ours)['median'] * 1e3:.1f} "
                         f"| {fmt_ratio(pair_ratios(ours, theirs))} "
                         f"| {_simulated(sent, method, p) * 1e3:.1f} |")
            print(lines[-1], flush=True)
    return lines


# -- on every rank ---------------------------------------------------------------------------

def _local_sgd_worker(config, pairs):
    """Interleaved pairs of distlab's and PyTorch's local SGD; the last pair's parameters
    are compared."""
    final = {}

    def ours():
        seconds, out = _timed(lambda: local_sgd.train(config, record=lambda **r: None))
        final["ours"] = torch.tensor(out["params"])
        return seconds

    def theirs():
        seconds, final["theirs"] = _timed(lambda: _torch_local_sgd(config))
        return seconds

    a, b = interleaved(ours, theirs, pairs)
    return a, b, (final["ours"] - final["theirs"]).abs().max().item()


def _torch_local_sgd(config):
    """Local SGD with PyTorch's own PeriodicModelAverager (averages after steps 8, 16, ...)."""
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    rank, p, workload = dist.get_rank(), dist.get_world_size(), config.workload
    data = workload.dataset
    shard = local_training.split(data, config.shards, p, config.classes_per_rank,
                                 workload.seed)[rank]
    model = workload.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=workload.lr)
    averager = PeriodicModelAverager(period=config.period, warmup_steps=config.period - 1)
    batches = local_training.sample_batches(shard, workload.batch_size // p,
                                            seed=workload.seed * 1000 + rank + 1)
    for step in range(1, workload.num_steps + 1):
        idx = next(batches)
        opt.zero_grad()
        F.cross_entropy(model(data.X[idx]), data.y[idx]).backward()
        opt.step()
        averager.average_parameters(model.parameters())
        if step % config.period == 0 and rank == 0:   # distlab evaluates after every average
            local_training.evaluate(model, data, F.cross_entropy)
    return torch.cat([w.detach().reshape(-1) for w in model.parameters()])


def _compression_worker(n, pairs):
    """``{row name: (its seconds, PyTorch fp32's seconds, bytes sent per call or None)}``."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(dist.get_rank()))
    fp32 = lambda: _timed(lambda: dist.all_reduce(x.clone()))[0]      # noqa: E731
    rows = {"pytorch all_reduce fp16 (fp16_compress_hook)":
            (*interleaved(lambda: _timed(lambda: dist.all_reduce(x.half()))[0], fp32, pairs),
             None)}
    for method in METHODS:
        c, residual = make_compressor(method, ratio=0.01), torch.zeros(n)
        comm.ledger().reset()
        ours, theirs = interleaved(lambda: _timed(lambda: all_reduce_compressed(x, c, residual))[0],
                                   fp32, pairs)
        calls = pairs + 1                                     # and the warm-up pair's
        rows[f"distlab {method}"] = (ours, theirs, comm.ledger().totals()["bytes_sent"] // calls)
    return rows


def _timed(fn):
    """``(seconds of the slowest rank, fn's result)``: the ranks start together."""
    dist.barrier()
    t0 = time.perf_counter()
    out = fn()
    seconds = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return seconds.item(), out


def _simulated(nbytes, method, p):
    """Seconds on the simulated network: a ring all-reduce of summable payloads, else a ring
    all-gather (``nbytes`` is what one rank sends)."""
    op = "all_reduce" if make_compressor(method).summable else "all_gather"
    return alpha_beta.ledger_time({op: {"calls": 1, "bytes_sent": nbytes}}, p, ALPHA,
                                  1 / BANDWIDTH)


if __name__ == "__main__":
    main()
