"""Launch cost: distlab.launch against torch.multiprocessing.spawn, and the accounting overhead.

Run:  .venv/bin/python benchmarks/bench_launch.py  [--sizes 2 4 8] [--out benchmarks/results/launch.md]

1. Start N workers, run one all_reduce, return. Wall time and total memory (sum of PSS of
   every process involved, the forkserver included) of ``distlab.launch`` against
   ``torch.multiprocessing.spawn`` doing the same. Target at 8 workers: ≤ 0.3× in both.
2. ``distlab.comm.all_reduce`` / ``send``+``recv`` against the raw torch.distributed calls,
   interleaved in the same processes. Target: ≤ 1.05×.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import threading
import time

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

import distlab

HOLD = 1.5   # seconds the workers stay alive so their memory can be sampled


def one_all_reduce(hold: float = 0.0):
    t = torch.ones(1024)
    dist.all_reduce(t)
    time.sleep(hold)
    return t[0].item()


def _spawn_worker(rank, world_size, port, hold):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    one_all_reduce(hold)
    dist.destroy_process_group()


def spawn_launch(world_size, hold=0.0):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp.spawn(_spawn_worker, args=(world_size, port, hold), nprocs=world_size)


def total_pss() -> int:
    """Sum of the PSS of every process below this one (the forkserver and workers too)."""
    total = 0
    for proc in psutil.Process().children(recursive=True):
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return total


def peak_memory(fn) -> float:
    """Run fn(); sample the total PSS of every descendant; return the peak in bytes."""
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], total_pss())
            time.sleep(0.1)
    th = threading.Thread(target=sample)
    th.start()
    try:
        fn()
    finally:
        done.set()
        th.join()
    return peak[0]


def timed(fn, repeats):
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def overhead_worker(iters: int, numel: int):
    torch.set_num_threads(1)
    from distlab import comm
    rank = dist.get_rank()
    x = torch.ones(numel)
    times = {"dist.all_reduce": [], "comm.all_reduce": [], "dist.send/recv": [],
             "comm.send/recv": []}

    def pingpong(send, recv):
        if rank == 0:
            send(x, 1)
            recv(x, 1)
        elif rank == 1:
            recv(x, 0)
            send(x, 0)

    calls = {"dist.all_reduce": lambda: dist.all_reduce(x),
             "comm.all_reduce": lambda: comm.all_reduce(x),
             "dist.send/recv": lambda: pingpong(dist.send, dist.recv),
             "comm.send/recv": lambda: pingpong(comm.send, comm.recv)}
    for _ in range(20):                      # warm up
        for f in calls.values():
            f()
    order = list(calls.items())
    for i in range(iters):                   # interleave so both see the same noise
        for name, f in (order if i % 2 else order[::-1]):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(10):
                f()
            times[name].append((time.perf_counter() - t0) / 10)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lines = [f"# Launch benchmark ({datetime.date.today()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__})", "",
             "Command: `python benchmarks/bench_launch.py`", "",
             "| workers | distlab cold (s) | distlab warm (s) | spawn (s) | time ratio warm | "
             "time ratio cold | distlab PSS (MB) | spawn PSS (MB) | memory ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    # The first launch in this Python also starts the forkserver and imports torch there.
    cold_n = max(args.sizes)
    t0 = time.perf_counter()
    distlab.launch(one_all_reduce, cold_n)
    cold = time.perf_counter() - t0
    for n in args.sizes:
        warm = timed(lambda: distlab.launch(one_all_reduce, n), args.repeats)
        cold_here = cold if n == cold_n else None
        sp = timed(lambda: spawn_launch(n), args.repeats)
        mem_d = peak_memory(lambda: distlab.launch(one_all_reduce, n, HOLD))
        mem_s = peak_memory(lambda: spawn_launch(n, HOLD))
        cold_col = f"{cold_here:.2f}" if cold_here else "-"
        cold_ratio = f"{cold_here / sp:.2f}×" if cold_here else "-"
        lines.append(f"| {n} | {cold_col} | {warm:.3f} | {sp:.2f} | {warm / sp:.2f}× | "
                     f"{cold_ratio} | {mem_d / 2**20:.0f} | {mem_s / 2**20:.0f} | "
                     f"{mem_d / mem_s:.2f}× |")
        print(lines[-1], flush=True)
    lines += ["", "Cold: the first launch in a fresh Python, which also starts the forkserver "
              "and imports torch in it once. Warm: every later launch. Target at 8 workers: "
              "≤ 0.3× spawn's time and memory.", ""]

    res = distlab.launch(overhead_worker, 2, 400, 256)
    lines += ["## Accounting overhead (2 ranks, 1 KiB float32, 400 rounds of 10 calls)", "",
              "Raw and counted calls alternate, so both see the same noise; the ratio is the "
              "median over rounds of counted/raw (rank 0's clock).", "",
              "| call | raw (µs) | distlab.comm (µs) | ratio |", "|---|---|---|---|"]
    times = res[0]
    for op in ("all_reduce", "send/recv"):
        raw, ours = times[f"dist.{op}"], times[f"comm.{op}"]
        ratio = statistics.median(o / r for o, r in zip(ours, raw))
        lines.append(f"| {op} | {statistics.median(raw) * 1e6:.1f} | "
                     f"{statistics.median(ours) * 1e6:.1f} | {ratio:.3f}× |")
    lines += ["", "Target: ≤ 1.05×."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    sys.exit(main())
