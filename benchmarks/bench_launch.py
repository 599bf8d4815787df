"""Launch cost: distlab.launch against torch.multiprocessing.spawn, and the accounting overhead.

Run:  .venv/bin/python benchmarks/bench_launch.py  [--sizes 2 4 8] [--repeats 3]
      [--rounds 400] [--out DIR]                  (writes DIR/launch.md, default results/)

1. Start N workers, run one all_reduce, return. Wall time of ``distlab.launch`` against
   ``torch.multiprocessing.spawn`` doing the same, in interleaved pairs (median pair ratio,
   min and max), and total memory (sum of PSS of every process involved, the forkserver
   included). Target at 8 workers: ≤ 0.3× in both.
2. ``distlab.comm.all_reduce`` / ``send``+``recv`` against the raw torch.distributed calls,
   in interleaved pairs in the same processes. Target: ≤ 1.05× (median pair).
3. A fresh Jupyter kernel (``import distlab`` starts the forkserver there) against a fresh
   script (the first launch starts it), interleaved: the time of ``import distlab`` and of
   the first 4-rank launch right after it, each timed inside the fresh process. Targets in
   the kernel: the first launch ≤ 1.0 s, ``import distlab`` ≤ 1.0 s.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

import psutil
from jupyter_client.manager import start_new_kernel
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

import report
from report import fmt_ratio, interleaved, load, pair_ratios, spread, write

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


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def overhead_worker(rounds: int, numel: int):
    """Raw and counted calls in interleaved pairs; rank 0's clock, 10 calls a measurement."""
    torch.set_num_threads(1)
    from distlab import comm
    rank = dist.get_rank()
    x = torch.ones(numel)

    def pingpong(send, recv):
        if rank == 0:
            send(x, 1)
            recv(x, 1)
        elif rank == 1:
            recv(x, 0)
            send(x, 0)

    def ten(call):
        def measure():
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(10):
                call()
            return (time.perf_counter() - t0) / 10
        return measure

    times = {}
    for op, raw, counted in (
            ("all_reduce", lambda: dist.all_reduce(x), lambda: comm.all_reduce(x)),
            ("send/recv", lambda: pingpong(dist.send, dist.recv),
             lambda: pingpong(comm.send, comm.recv))):
        times[f"comm.{op}"], times[f"dist.{op}"] = interleaved(ten(counted), ten(raw),
                                                               pairs=rounds, warmup=20)
    return times


FRESH = """\
import time as _t
_a = _t.perf_counter()
import distlab
_import = _t.perf_counter() - _a
"""
FIRST_LAUNCH = """\
def _one_all_reduce():
    import torch, torch.distributed as dist
    t = torch.ones(1024)
    dist.all_reduce(t)
    return t[0].item()
_a = _t.perf_counter()
distlab.launch(_one_all_reduce, 4)
_first = _t.perf_counter() - _a
import psutil as _ps   # the forkserver's CPU: its imports, what a quiet machine's wall time is
_cpu = sum(sum(c.cpu_times()[:2]) for c in _ps.Process().children()
           if "forkserver" in " ".join(c.cmdline()))
print(_import, _first, _cpu)
"""


def fresh_kernel() -> tuple[float, float, float]:
    """``(import distlab, first 4-rank launch, the forkserver's CPU)`` seconds in a new
    Jupyter kernel, one cell after the other."""
    km, kc = start_new_kernel(kernel_name="python3")
    out = []
    try:
        for cell in (FRESH, FIRST_LAUNCH):
            reply = kc.execute_interactive(cell, timeout=300, output_hook=lambda m: out.append(
                m["content"].get("text", "")) if m["msg_type"] == "stream" else None)
            if reply["content"]["status"] != "ok":
                raise RuntimeError(f"kernel cell failed: {reply['content']}")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    return tuple(float(v) for v in "".join(out).split())


def fresh_script() -> tuple[float, float, float]:
    """The same two steps in a new ``python`` process (no forkserver until the launch)."""
    out = subprocess.run([sys.executable, "-c", FRESH + FIRST_LAUNCH], capture_output=True,
                         text=True, timeout=300, check=True)
    return tuple(float(v) for v in out.stdout.split())


def first_launch_table(repeats: int) -> list[str]:
    kernel, script = interleaved(fresh_kernel, fresh_script, pairs=repeats, warmup=0)
    lines = ["| session | import distlab (s), median (min-max) | first 4-rank launch (s), "
             "median (min-max) | forkserver CPU (s), median (min-max) | target |",
             "|---|---|---|---|---|"]
    for name, runs in (("Jupyter kernel", kernel), ("script", script)):
        imp, first = spread([r[0] for r in runs]), spread([r[1] for r in runs])
        cpu = spread([r[2] for r in runs])
        met = ""
        if name == "Jupyter kernel":
            ok = imp["median"] <= 1.0 and first["median"] <= 1.0
            met = f"both ≤ 1.0 s: {'met' if ok else 'NOT met'}"
        lines.append(f"| {name} | {_spread(imp)} | {_spread(first)} | {_spread(cpu)} | {met} |")
    return lines


def _spread(s: dict) -> str:
    return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}, {s['n']} runs)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--repeats", type=int, default=3, help="launch pairs per size")
    ap.add_argument("--rounds", type=int, default=400, help="accounting pairs (10 calls each)")
    ap.add_argument("--fresh", type=int, default=5, help="fresh kernel/script pairs")
    args = report.parse_args(ap)
    load_before = load()
    lines = [f"torch {torch.__version__}", "",
             "| workers | distlab cold (s) | distlab warm (s) | spawn (s) | time ratio warm, "
             "median (min-max) | time ratio cold | distlab PSS (MB) | spawn PSS (MB) "
             "| memory ratio |", "|---|---|---|---|---|---|---|---|---|"]
    # The first launch in this Python also starts the forkserver and imports torch there.
    cold_n = max(args.sizes)
    cold = seconds(lambda: distlab.launch(one_all_reduce, cold_n))
    for n in args.sizes:
        warm, sp = interleaved(lambda: seconds(lambda: distlab.launch(one_all_reduce, n)),
                               lambda: seconds(lambda: spawn_launch(n)), pairs=args.repeats,
                               warmup=0)
        warm_s, sp_s = spread(warm)["median"], spread(sp)["median"]
        mem_d = peak_memory(lambda: distlab.launch(one_all_reduce, n, HOLD))
        mem_s = peak_memory(lambda: spawn_launch(n, HOLD))
        cold_col = f"{cold:.2f}" if n == cold_n else "-"
        cold_ratio = f"{cold / sp_s:.2f}×" if n == cold_n else "-"
        lines.append(f"| {n} | {cold_col} | {warm_s:.3f} | {sp_s:.2f} | "
                     f"{fmt_ratio(pair_ratios(warm, sp))} | {cold_ratio} | "
                     f"{mem_d / 2**20:.0f} | {mem_s / 2**20:.0f} | {mem_d / mem_s:.2f}× |")
        print(lines[-1], flush=True)
    lines += ["", "Cold: the first launch in a fresh Python, which also starts the forkserver "
              "and imports torch in it once (against spawn's median). Warm: every later "
              "launch. Target at 8 workers: ≤ 0.3× spawn's time and memory.", ""]

    times = distlab.launch(overhead_worker, 2, args.rounds, 256)[0]
    lines += [f"## Accounting overhead (2 ranks, 1 KiB float32, {args.rounds} pairs of 10 "
              "calls)", "",
              "Counted and raw calls alternate, so both see the same noise; the ratio is the "
              "median over pairs of counted/raw (rank 0's clock), with its min and max.", "",
              "| call | raw (µs) | distlab.comm (µs) | ratio, median (min-max) |",
              "|---|---|---|---|"]
    for op in ("all_reduce", "send/recv"):
        raw, ours = times[f"dist.{op}"], times[f"comm.{op}"]
        lines.append(f"| {op} | {spread(raw)['median'] * 1e6:.1f} | "
                     f"{spread(ours)['median'] * 1e6:.1f} | {fmt_ratio(pair_ratios(ours, raw))} |")
    lines += ["", "Target: ≤ 1.05×.", "",
              f"## The first launch in a fresh process ({args.fresh} interleaved pairs)", "",
              "Each process times `import distlab` and then, at once, the first "
              "`distlab.launch` of one 4 KiB all-reduce on 4 ranks. In a kernel the import "
              "starts the forkserver, which imports torch while the rest of the import runs "
              "(a student reading the next cell gives it longer); a script starts it at the "
              "launch. Neither imports torch in the launching process. The forkserver's CPU "
              "(its imports of torch and torch._dynamo, and the forks) is what its start "
              "takes on a quiet core, whatever the load.", "",
              *first_launch_table(args.fresh)]
    write("launch", "Launch benchmark", lines, load_before)


if __name__ == "__main__":
    sys.exit(main())
