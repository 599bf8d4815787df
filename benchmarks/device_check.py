"""Device check: distlab's collectives, data-parallel and sharding algorithms on GPUs (NCCL).

On a machine with CUDA GPUs this starts one rank per GPU with ``distlab.launch(...,
backend="nccl")`` and, on CUDA tensors,

* runs each collective through ``distlab.comm`` (and lab 01's ring all-reduce built from
  send/recv, when present), checks the result and measures its bus bandwidth;
* trains a small MLP for a few steps with every data-parallel variant (``distlab.data_parallel.ddp``)
  and with the sharded optimizers (ZeRO-1/2 ``distlab.sharding.zero``, ZeRO-3 ``distlab.sharding.fsdp``), and
  compares the parameters with one process training on the whole batch (``assert_close``);
* runs lab 02's training loop (``distlab.data_parallel.sync_sgd.train`` on its ``Workload``,
  data and model moved to each rank's GPU) against its single-process ``reference``;

then prints a short table (``--write`` also saves it to ``benchmarks/results/device_check.md``).
A module that is missing is an error, never a silently skipped check.

On a machine without a GPU it says so and exits 0; ``--cpu`` runs the same checks on gloo
(the development path, and what CI covers in the test suite anyway).

Usage::

    python benchmarks/device_check.py                 # one rank per visible GPU
    python benchmarks/device_check.py --world-size 2 --write
    python benchmarks/device_check.py --cpu --world-size 2
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import sys
import time
from pathlib import Path

import torch

import distlab

ROOT = Path(__file__).resolve().parent.parent


def _module(name: str):
    """``distlab.<name>``; a missing module is an error, never a silently skipped check."""
    return importlib.import_module(f"distlab.{name}")


def _timed(fn, device, repeat: int) -> float:
    """Seconds per call of ``fn`` (after one warm-up), synchronizing the GPU around it."""
    import torch.distributed as dist
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def _collective_rows(numel: int, repeat: int) -> list[tuple]:
    import torch.distributed as dist
    from distlab import comm
    rank, n, dev = dist.get_rank(), dist.get_world_size(), distlab.device()
    nbytes = numel * 4
    rows = []

    def row(name, check, fn, bus_factor):
        try:
            ok, detail = check()
            seconds = _timed(fn, dev, repeat)
            gbps = bus_factor * nbytes / seconds / 1e9
            rows.append((name, ok, detail, seconds * 1e3, gbps))
        except Exception as e:  # one broken piece must not hide the others
            rows.append((name, False, f"{type(e).__name__}: {e}"[:120], None, None))

    x = torch.full((numel,), rank + 1.0, device=dev)

    def check_all_reduce():
        t = x.clone()
        comm.all_reduce(t)
        return bool((t == n * (n + 1) / 2).all()), "sum of ranks"
    row("comm.all_reduce", check_all_reduce, lambda: comm.all_reduce(x.clone()), 2 * (n - 1) / n)

    def check_broadcast():
        t = x.clone()
        comm.broadcast(t, src=0)
        return bool((t == 1.0).all()), "rank 0's tensor everywhere"
    row("comm.broadcast", check_broadcast, lambda: comm.broadcast(x.clone(), src=0), 1.0)

    chunk = numel // n
    gathered = torch.empty(chunk * n, device=dev)

    def check_all_gather():
        comm.all_gather_into_tensor(gathered, x[:chunk].clone())
        want = torch.arange(1, n + 1, device=dev, dtype=torch.float32).repeat_interleave(chunk)
        return bool(torch.equal(gathered, want)), "rank r's chunk at r"
    row("comm.all_gather_into_tensor", check_all_gather,
        lambda: comm.all_gather_into_tensor(gathered, x[:chunk]), (n - 1) / n)

    out = torch.empty(chunk, device=dev)

    def check_reduce_scatter():
        comm.reduce_scatter_tensor(out, x[:chunk * n].clone())
        return bool((out == n * (n + 1) / 2).all()), "sum, 1/N each"
    row("comm.reduce_scatter_tensor", check_reduce_scatter,
        lambda: comm.reduce_scatter_tensor(out, x[:chunk * n]), (n - 1) / n)

    if n > 1:
        recv = torch.empty_like(x)

        def ring_shift():
            works = [comm.isend(x, (rank + 1) % n), comm.irecv(recv, (rank - 1) % n)]
            for w in works:
                w.wait()

        def check_ring_shift():
            ring_shift()
            return bool((recv == (rank - 1) % n + 1.0).all()), "isend/irecv to the next rank"
        row("comm.isend/irecv (ring shift)", check_ring_shift, ring_shift, 1.0)

    collectives = _module("communication.collectives")

    def check_ring():
        t = x.clone()
        collectives.ring_all_reduce(t)
        return bool((t == n * (n + 1) / 2).all()), "lab 01's ring, from send/recv"
    row("collectives.ring_all_reduce", check_ring,
        lambda: collectives.ring_all_reduce(x.clone(), check=False), 2 * (n - 1) / n)
    return rows


def _batch(dev, seed=0, size=256):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(size, 64, generator=g)
    y = torch.randint(0, 10, (size,), generator=g)
    return X.to(dev), y.to(dev)


def _reference(optimizer_class, steps, dev, **hyper):
    """One process, the whole batch: what every distributed variant must reproduce."""
    from distlab.problems.models import mlp
    model = mlp(64, 256, 10, depth=2, seed=0).to(dev)
    opt = optimizer_class(model.parameters(), **hyper)
    X, y = _batch(dev)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def _training_rows(steps: int) -> list[tuple]:
    import torch.distributed as dist
    from distlab.problems.models import mlp
    F = torch.nn.functional
    rank, n, dev = dist.get_rank(), dist.get_world_size(), distlab.device()
    X, y = _batch(dev)
    X, y = X.chunk(n)[rank], y.chunk(n)[rank]      # this rank's equal share of the batch
    _reference(torch.optim.SGD, 1, dev, lr=0.1)    # warm up kernels so timings are per step
    rows = []

    def row(name, train, optimizer_class, **hyper):
        try:
            torch.cuda.synchronize() if dev.type == "cuda" else None
            t0 = time.perf_counter()
            state = train(optimizer_class, **hyper)
            torch.cuda.synchronize() if dev.type == "cuda" else None
            ms = (time.perf_counter() - t0) / steps * 1e3
            want = _reference(optimizer_class, steps, dev, **hyper)
            for k in want:
                torch.testing.assert_close(state[k], want[k], rtol=1e-4, atol=1e-5)
            rows.append((name, True, f"= 1 process, {steps} {optimizer_class.__name__} steps",
                         ms, None))
        except Exception as e:
            rows.append((name, False, f"{type(e).__name__}: {e}"[:120].replace("\n", " "),
                         None, None))

    data_parallel = _module("data_parallel.ddp")
    for variant in data_parallel.VARIANTS:
        def train_ddp(optimizer_class, variant=variant, **hyper):
            model = data_parallel.wrap(mlp(64, 256, 10, depth=2, seed=0).to(dev), variant)
            opt = optimizer_class(model.parameters(), **hyper)
            for _ in range(steps):
                opt.zero_grad()
                F.cross_entropy(model(X), y).backward()
                model.finish_gradient_synchronization()
                opt.step()
            return model.module.state_dict()
        row(f"data_parallel {variant}", train_ddp, torch.optim.SGD, lr=0.1)

    zero = _module("sharding.zero")
    for stage, gradients in ((1, "reduce_scatter"), (2, "sharded")):
        def train_zero(optimizer_class, gradients=gradients, **hyper):
            model = mlp(64, 256, 10, depth=2, seed=0).to(dev)
            opt = zero.ShardedOptimizer(model.parameters(), optimizer_class,
                                        gradients=gradients, **hyper)
            for _ in range(steps):
                opt.zero_grad()
                F.cross_entropy(model(X), y).backward()
                opt.step()
            return model.state_dict()
        row(f"zero stage {stage} (ShardedOptimizer)", train_zero, torch.optim.Adam, lr=1e-3)

    fsdp = _module("sharding.fsdp")

    def train_fsdp(optimizer_class, **hyper):
        model = fsdp.FullyShardedDataParallel(mlp(64, 256, 10, depth=2, seed=0).to(dev))
        opt = optimizer_class(model.parameters(), **hyper)
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(X), y).backward()
            opt.step()
        return model.full_state_dict()
    row("zero stage 3 (FullyShardedDataParallel)", train_fsdp, torch.optim.Adam, lr=1e-3)
    return rows + [_sync_sgd_row(steps)]


def _sync_sgd_row(steps: int) -> tuple:
    """Lab 02's loop on this rank's device against its single-process reference (on the CPU)."""
    import torch.distributed as dist
    from distlab.problems.workloads import Workload
    sync_sgd = _module("data_parallel.sync_sgd")
    n, name = dist.get_world_size(), "sync_sgd.train (Workload mlp, bucketed)"
    try:
        config = sync_sgd.SyncSGDConfig(
            workload=Workload(model="mlp", batch_size=16 * n, num_steps=steps), world_size=n)
        t0 = time.perf_counter()
        out = sync_sgd.train(config)
        ms = (time.perf_counter() - t0) / steps * 1e3
        torch.testing.assert_close(out["params"], sync_sgd.reference(config)["params"],
                                   rtol=1e-4, atol=1e-5)
        return (name, True, f"= 1 process, {steps} SGD steps", ms, None)
    except Exception as e:
        return (name, False, f"{type(e).__name__}: {e}"[:120].replace("\n", " "), None, None)


def check(numel: int, repeat: int, steps: int) -> dict:
    """The worker: every rank runs every check (collectives need them all); rank 0 reports."""
    import torch.distributed as dist
    torch.set_float32_matmul_precision("highest")   # no TF32: compare in true fp32
    rows = _collective_rows(numel, repeat) + _training_rows(steps)
    dev = distlab.device()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    return {"rows": rows, "device": name, "backend": dist.get_backend()}


def table(result: dict, world_size: int, numel: int) -> str:
    lines = [f"{world_size} rank(s), backend {result['backend']}, device {result['device']}, "
             f"collectives on {numel * 4 / 2**20:.0f} MiB float32", "",
             "| check | ok | what was checked | ms per call/step | bus GB/s |",
             "|---|---|---|---|---|"]
    for name, ok, detail, ms, gbps in result["rows"]:
        lines.append(f"| {name} | {'ok' if ok else 'FAILED'} | {detail} | "
                     f"{'' if ms is None else f'{ms:.2f}'} | "
                     f"{'' if gbps is None else f'{gbps:.1f}'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks (default: one per visible GPU)")
    parser.add_argument("--cpu", action="store_true", help="run the checks on gloo and the CPU")
    parser.add_argument("--mib", type=float, default=None,
                        help="collective message size (default 256 MiB on GPU, 4 MiB on CPU)")
    parser.add_argument("--steps", type=int, default=5, help="training steps per algorithm")
    parser.add_argument("--write", action="store_true",
                        help="save the table to benchmarks/results/device_check.md")
    args = parser.parse_args()

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0 and not args.cpu:
        print("device check: no CUDA GPU on this machine; nothing to check here "
              "(the CPU/gloo path is covered by the test suite; --cpu runs this script on it).")
        return 0
    backend = "gloo" if args.cpu else "nccl"
    world_size = args.world_size or (2 if args.cpu else gpus)
    mib = args.mib or (4 if args.cpu else 256)
    numel = int(mib * 2**20 / 4) // world_size * world_size
    repeat = 3 if args.cpu else 10
    results = distlab.launch(check, world_size, numel, repeat, args.steps, backend=backend,
                             timeout=600)
    text = table(results[0], world_size, numel)
    failed = [r for res in results for r in res["rows"] if not r[1]]
    print(text)
    if args.write:
        out = ROOT / "benchmarks" / "results" / "device_check.md"
        command = "python benchmarks/device_check.py " + " ".join(sys.argv[1:])
        out.write_text(f"# Device check\n\n- command: `{command.strip()}`\n- date: "
                       f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
                       f"{text}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
