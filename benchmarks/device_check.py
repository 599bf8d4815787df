"""Device check: every distlab algorithm on a GPU with NCCL (or, with ``--cpu``, on gloo).

One rank per visible GPU by default (``--world-size``; one GPU: world size 1), each on CUDA
tensors, with ``torch.set_float32_matmul_precision("highest")`` so results compare in true
fp32. Each algorithm runs through its own verbs (``train(config, group=None)`` on every rank,
compared with ``reference(config)``, the single-process run it must equal, where one exists):

* the collectives: ``distlab.comm``'s built-in ones (result checked, bus bandwidth measured)
  and lab 01's own all-reduces, reduce-scatter and all-gather built from send/recv;
* data parallel: sync SGD with every DDP variant, and with momentum and the linear scaling rule;
* sharding: ZeRO stages 0-2 (``NaiveDistributedOptimizer``, ``ShardedOptimizer``) and stage 3
  (``FullyShardedDataParallel``), with the model-state bytes of ``memory.measure`` and, on a
  GPU, the CUDA peak (``torch.cuda.max_memory_allocated``) of each stage;
* asynchronous: the parameter server under BSP (gloo only: on NCCL it runs on a gloo
  subgroup, on one GPU in a launch of its own with a server and a worker), Hogwild! (shared
  CPU memory on every backend), simulated staleness (one process, on the CPU);
* model parallel: tensor parallel (the transformer over ``world_size`` ranks), the DP x TP
  mesh, the pipeline with GPipe and 1F1B;
* communication-efficient: local SGD (synchronous, and with period 4 and top-k), FedAvg,
  ``all_reduce_compressed`` with every compressor, LAMB and 1-bit Adam;
* fault tolerance: a checkpoint saved and resumed mid-run, and an elastic job whose rank is
  killed and which resumes from its checkpoint (its own launches, as a job has).

Each row: ok or FAILED with the error, seconds (the algorithm, not its reference), whether it
equals its reference, and memory. A missing module or a failing row is an error (exit 1).
Without a GPU and without ``--cpu`` it says so and exits 0.

Usage::

    python benchmarks/device_check.py --write          # one rank per GPU, NCCL
    python benchmarks/device_check.py --cpu --write    # gloo, the CPU (what CI runs, smaller)
    python benchmarks/device_check.py --cpu --world-size 2 --steps 2 --mib 0.25 --out /tmp
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

import distlab
import report
from distlab import comm
from distlab.asynchronous import hogwild, parameter_server, simulated_staleness
from distlab.communication import collectives, cost_model
from distlab.communication_efficient import compression, fedavg, local_sgd, local_training
from distlab.course import lab04_sharding as lab04
from distlab.data_parallel import ddp, sync_sgd
from distlab.fault_tolerance import checkpoint, elastic
from distlab.fault_tolerance.agent import ElasticConfig
from distlab.fault_tolerance.faults import Fault
from distlab.model_parallel import mesh, pipeline
from distlab.problems import convex
from distlab.problems.workloads import Workload
from distlab.sharding import memory

TOL = dict(rtol=1e-4, atol=1e-5)   # fp32 of a distributed run against one process


@dataclass(frozen=True)
class Settings:
    """How big the checks are (tiny for CI, bigger for a GPU)."""
    world_size: int
    steps: int
    numel: int
    repeat: int
    folder: str
    """A folder every rank sees, for checkpoints."""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="gloo and the CPU, GPUs hidden")
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks (default: one per GPU; 1 with --cpu)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per algorithm")
    parser.add_argument("--mib", type=float, default=None,
                        help="collective message size (default 256 MiB on GPU, 4 on CPU)")
    parser.add_argument("--write", action="store_true", help="save results/device_check.md")
    args = report.parse_args(parser, argv)
    if args.cpu:   # before torch sees CUDA: every launch below then picks gloo and the CPU
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0 and not args.cpu:
        print("device check: no CUDA GPU here; --cpu runs the same checks on gloo")
        return 0
    n = args.world_size or (1 if args.cpu else gpus)
    mib = args.mib or (4 if args.cpu else 256)
    folder = tempfile.mkdtemp(prefix="distlab-device-check-")
    settings = Settings(n, args.steps, max(n, int(mib * 2**20 / 4) // n * n),
                        3 if args.cpu else 10, folder)
    load_before = report.load()
    try:
        per_rank = distlab.launch(check_on_rank, n, settings, timeout=900)
        rows = merge(per_rank) + launched_rows(settings)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    device = torch.cuda.get_device_name(0) if not args.cpu else f"CPU ({cpu_name()})"
    body = table(rows, n, "gloo" if args.cpu else "nccl", device, settings.numel)
    if args.cpu:
        body += ["", "This is the CPU (gloo) run; the GPU path is checked by `python "
                 "benchmarks/device_check.py --write` on a machine with a CUDA GPU (NCCL, one "
                 "rank per GPU)."]
    if args.write:
        report.write("device_check", "Device check", body, load_before)
    else:
        print("\n".join(body))
    return 1 if any(not r["ok"] for r in rows) else 0


# ----------------------------------------------------------------------------------------
# Inside each rank: every algorithm that runs on the launched group.
# ----------------------------------------------------------------------------------------

def check_on_rank(s: Settings) -> list[dict]:
    """Every rank runs every row (the rows' collectives need them all); returns its rows."""
    torch.set_float32_matmul_precision("highest")   # no TF32: compare in true fp32
    rows: list[dict] = []
    for part in (collective_rows, data_parallel_rows, sharding_rows, asynchronous_rows,
                 model_parallel_rows, communication_efficient_rows, checkpoint_rows):
        part(s, rows)
    return rows


def row(rows, name, run, compare=None, memory_of=None, note=""):
    """Time ``run()``, then ``compare(result)`` (raises if unequal, returns what was checked).

    ``memory_of(result)`` describes the memory held; a CUDA peak is added on a GPU. An error
    makes a FAILED row, never a crash: one broken algorithm must not hide the others.
    """
    dev = distlab.device()
    entry = {"name": name, "ok": False, "seconds": None, "equal": "", "memory": "",
             "note": note}
    try:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        result = run()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        entry["seconds"] = time.perf_counter() - t0
        mem = [memory_of(result)] if memory_of else []
        if dev.type == "cuda":
            mem.append(f"CUDA peak {torch.cuda.max_memory_allocated(dev) / 2**20:.1f} MiB")
        entry["memory"] = "; ".join(mem)
        entry["equal"] = compare(result) if compare else "no reference"
        entry["ok"] = True
    except Exception as e:   # noqa: BLE001 - the row says what failed
        entry["note"] = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")[:200]
    rows.append(entry)


def equal(actual, expected, what="= reference", tol=TOL) -> str:
    """Raise unless ``actual`` equals ``expected`` to fp32 rounding (or ``tol``); say what was
    compared."""
    actual, expected = (torch.as_tensor(v).detach().cpu().double() for v in (actual, expected))
    torch.testing.assert_close(actual, expected, **tol)
    return f"{what} (max abs diff {(actual - expected).abs().max().item():.1e})"


def collective_rows(s: Settings, rows) -> None:
    rank, n, dev = dist.get_rank(), dist.get_world_size(), distlab.device()
    x = torch.full((s.numel,), rank + 1.0, device=dev)
    total = n * (n + 1) / 2

    def bench(name, fn, want, bus_factor):
        def run():
            fn()                                   # warm up, then time s.repeat calls
            t0 = time.perf_counter()
            for _ in range(s.repeat):
                out = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            return out, (time.perf_counter() - t0) / s.repeat

        def compare(result):
            out, seconds = result
            if not torch.equal(out.cpu(), want.cpu()):
                raise AssertionError(f"{name} gave a wrong result")
            gbps = x.numel() * 4 / seconds / 1e9      # the algorithm's, then the bus's
            return (f"exact; {seconds * 1e3:.2f} ms a call, {gbps:.2f} GB/s, bus "
                    f"{bus_factor * gbps:.2f} GB/s")
        row(rows, name, run, compare)

    def reduced(op):
        return lambda: (lambda t: (op(t), t)[1])(x.clone())
    full, chunk = torch.full_like(x, total), s.numel // n
    bench("comm.all_reduce", reduced(comm.all_reduce), full, 2 * (n - 1) / n)
    bench("comm.broadcast", reduced(lambda t: comm.broadcast(t, src=0)), torch.ones_like(x), 1.0)
    gathered = torch.empty(chunk * n, device=dev)
    bench("comm.all_gather_into_tensor",
          lambda: (comm.all_gather_into_tensor(gathered, x[:chunk].clone()), gathered)[1],
          torch.arange(1, n + 1, device=dev, dtype=torch.float32).repeat_interleave(chunk),
          (n - 1) / n)
    out = torch.empty(chunk, device=dev)
    bench("comm.reduce_scatter_tensor",
          lambda: (comm.reduce_scatter_tensor(out, x[:chunk * n].clone()), out)[1],
          torch.full_like(out, total), (n - 1) / n)
    for name, all_reduce in collectives.ALL_REDUCES.items():
        bench(f"collectives.ALL_REDUCES[{name!r}]", reduced(all_reduce), full, 2 * (n - 1) / n)
    bench("collectives.ring_reduce_scatter", lambda: collectives.ring_reduce_scatter(x.clone()),
          full.tensor_split(n)[rank], (n - 1) / n)
    mine = torch.zeros_like(x)
    mine.tensor_split(n)[rank].fill_(rank + 1.0)
    bench("collectives.ring_all_gather", lambda: collectives.ring_all_gather(mine.clone()),
          torch.cat([torch.full_like(c, r + 1.0) for r, c in enumerate(x.tensor_split(n))]),
          (n - 1) / n)
    row(rows, "cost_model.time_collective (lab 01's ring, timed)",
        lambda: cost_model.time_collective(collectives.ring_all_reduce, chunk, repeats=1),
        lambda seconds: f"{seconds * 1e3:.2f} ms a call (the slowest rank's)")


def mlp(s: Settings, **fields):
    """The digits MLP, small: every rank's share of every batch is 8 examples."""
    return Workload(**{"model": "mlp", "hidden": 32, "depth": 2, "batch_size": 8 * s.world_size,
                       "lr": 0.05, "num_steps": s.steps, **fields}).loaded()


def data_parallel_rows(s: Settings, rows) -> None:
    for variant in ddp.VARIANTS:
        config = sync_sgd.SyncSGDConfig(workload=mlp(s), world_size=s.world_size,
                                        variant=variant)
        row(rows, f"sync_sgd, DDP variant {variant!r}", lambda c=config: sync_sgd.train(c),
            lambda out, c=config: equal(out["params"], sync_sgd.reference(c)["params"]))
    config = sync_sgd.SyncSGDConfig(workload=replace(mlp(s), model="linear").loaded(),
                                    world_size=s.world_size, momentum=0.9, lr_scaling=True,
                                    warmup_steps=2)
    row(rows, "sync_sgd, linear, momentum, lr scaling", lambda: sync_sgd.train(config),
        lambda out: equal(out["params"], sync_sgd.reference(config)["params"]))


def sharding_rows(s: Settings, rows) -> None:
    """ZeRO stages 0-3 built by lab 04's ``make_stage``, on this rank's device."""
    rank, n, dev = dist.get_rank(), dist.get_world_size(), distlab.device()
    workload = mlp(s, lr=0.01)

    def train(stage):
        model, opt = lab04.make_stage(stage, workload.build_model().to(dev), "adam",
                                      lr=workload.lr)
        for X, y in workload.batches():   # this rank's rows: (B, 64) -> (B/n, 64)
            loss = workload.loss(model(X.to(dev).chunk(n)[rank]), y.to(dev).chunk(n)[rank])
            opt.zero_grad()
            loss.backward()
            opt.step()
        held = memory.measure(model, opt)
        state = model.full_state_dict() if stage == 3 else model.state_dict()
        return torch.cat([v.detach().reshape(-1).cpu() for v in state.values()]), held

    for stage in (0, 1, 2, 3):
        config = lab04.ZeroConfig(stage=stage, world_size=n, workload=workload)
        row(rows, f"ZeRO {lab04.STAGE_NAMES[stage]}", lambda st=stage: train(st),
            lambda out, c=config: equal(out[0], lab04.reference(c)),
            lambda out: f"model states {sum(out[1].values()) / 1024:.1f} KiB")


def asynchronous_rows(s: Settings, rows) -> None:
    workload = replace(convex.WORKLOAD, num_steps=s.steps, batch_size=16).loaded()
    config = simulated_staleness.SimulatedStalenessConfig(workload=workload, staleness=2)
    row(rows, "simulated staleness (one process)", lambda: simulated_staleness.train(config),
        lambda out: equal(out["params"], simulated_staleness.reference(config)),
        note="a simulation on the CPU, no collective")
    if s.world_size < 2:
        return   # a server and a worker need two ranks: launched_rows runs it
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    config = parameter_server.ParameterServerConfig(workload, num_workers=s.world_size - 1,
                                                    staleness=0)
    row(rows, "parameter server, BSP (gloo)", lambda: parameter_server.train(config, group),
        lambda out: equal(out["params"], parameter_server.reference(config))
        if out["role"] == "server" else "", note="gloo only: a gloo subgroup on NCCL")


def model_parallel_rows(s: Settings, rows) -> None:
    n = s.world_size
    transformer = Workload(model="transformer", hidden=8 * n, num_heads=n, depth=1,
                           block_size=8, batch_size=4, lr=0.1, num_steps=s.steps).loaded()
    tp = 2 if n % 4 == 0 else 1
    for name, config in ((f"tensor parallel, transformer, tp={n}",
                          mesh.MeshConfig(workload=transformer, dp=1, tp=n)),
                         (f"mesh, MLP, dp={n // tp} x tp={tp}",
                          mesh.MeshConfig(workload=mlp(s), dp=n // tp, tp=tp))):
        row(rows, name, lambda c=config: mesh.train(c),
            lambda out, c=config: equal(out["losses"], mesh.reference(c), "losses = reference"))
    for schedule in pipeline.SCHEDULES:
        config = pipeline.PipelineConfig(workload=mlp(s), num_stages=n, num_microbatches=2,
                                         schedule=schedule)
        last = dist.get_rank() == n - 1   # the last stage has the losses
        row(rows, f"pipeline {schedule}, {n} stage(s)", lambda c=config: pipeline.train(c),
            lambda out, c=config: equal(out["losses"], pipeline.reference(c),
                                        "losses = reference") if last else "")


def communication_efficient_rows(s: Settings, rows) -> None:
    n, rank, dev = s.world_size, dist.get_rank(), distlab.device()
    workload = replace(local_training.WORKLOAD, num_steps=s.steps, batch_size=8 * n).loaded()

    def local(name, compare, **fields):
        config = local_sgd.LocalSGDConfig(workload=workload, world_size=n, **fields)
        row(rows, name, lambda: local_sgd.train(config), compare and (lambda out: equal(
            out["params"], local_sgd.reference(config)[1])))
    local("local SGD, period 1 (synchronous)", True)
    local("local SGD, period 4, top-k with error feedback", False, period=4,
          compression="topk", ratio=0.1)
    local("LAMB (data parallel)", True, optimizer="lamb")
    warmup = max(1, s.steps // 2)
    config = local_sgd.LocalSGDConfig(workload=workload, world_size=n, optimizer="onebit_adam",
                                      warmup_steps=warmup)
    records = []

    def onebit_compare(out):
        if rank != 0:
            return ""
        losses = [r["loss"] for r in records][: warmup + 1]
        return equal(losses, local_sgd.reference(config)[0][: warmup + 1],
                     f"warm-up losses = Adam ({warmup} steps)")
    row(rows, "1-bit Adam", lambda: local_sgd.train(config, record=lambda **r: records.append(r)),
        onebit_compare)
    config = fedavg.FedAvgConfig(workload=replace(workload, num_steps=2 * s.steps, batch_size=8),
                                 world_size=n, num_clients=4, client_fraction=0.5,
                                 local_steps=2)
    row(rows, "FedAvg, 4 clients", lambda: fedavg.train(config),
        lambda out: equal(out["params"], fedavg.reference(config)[1]))
    xs = [torch.randn(1000, generator=torch.Generator().manual_seed(r)).to(dev) for r in range(n)]
    for method in compression.METHODS:
        def run(method=method):
            make = lambda: compression.make_compressor(method, ratio=0.05, seed=1)
            mean = compression.all_reduce_compressed(xs[rank], make(), torch.zeros_like(xs[0]))
            one = [(lambda c: c.decompress(c.compress(x), x.numel()))(make()) for x in xs]
            return mean, torch.stack(one).mean(0)   # (n, 1000) -> (1000,): what it must be
        # fp16 and bf16 payloads are summed in their own precision: compare to it.
        tol = {"fp16": dict(rtol=2e-3, atol=2e-3), "bf16": dict(rtol=2e-2, atol=2e-2)}
        row(rows, f"all_reduce_compressed {method!r}", run,
            lambda out, t=tol.get(method, TOL): equal(out[0], out[1], "= mean of every "
                                                      "rank's C(x)", t))


def checkpoint_rows(s: Settings, rows) -> None:
    """Train, checkpoint, train on: a fresh model resumed from the checkpoint must agree."""
    dev, workload = distlab.device(), mlp(s, num_steps=2 * s.steps)
    folder = os.path.join(s.folder, "checkpoint")

    def steps(model, opt, batches):
        for X, y in batches:
            opt.zero_grad()
            workload.loss(model(X.to(dev)), y.to(dev)).backward()
            ddp.average_gradients(list(model.parameters()))
            opt.step()

    def run():
        model = workload.build_model().to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        batches = list(workload.batches())
        steps(model, opt, batches[: s.steps])
        checkpoint.save(folder, s.steps, {"model": model.state_dict(),
                                          "optimizer": opt.state_dict()},
                        {"rng": checkpoint.capture_rng()})
        comm.barrier()                    # rank 0 has committed the checkpoint
        steps(model, opt, batches[s.steps:])
        resumed = workload.build_model().to(dev)
        opt2 = torch.optim.Adam(resumed.parameters(), lr=0.01)
        ckpt = checkpoint.load_latest(folder, 0)
        resumed.load_state_dict(ckpt.state["model"])
        opt2.load_state_dict(ckpt.state["optimizer"])
        steps(resumed, opt2, batches[ckpt.step:])
        flat = lambda m: torch.nn.utils.parameters_to_vector(m.parameters())
        return flat(resumed), flat(model)
    row(rows, "checkpoint save and resume (Adam)", run,
        lambda out: equal(out[0], out[1], "resumed = uninterrupted"))


def merge(per_rank: list[list[dict]]) -> list[dict]:
    """One row per check: ok on every rank; the first rank's error, or its comparison."""
    merged = []
    for entries in zip(*per_rank):
        first = next((e for e in entries if not e["ok"]), entries[0])
        equal_ = next((e["equal"] for e in entries if e["equal"]), "")
        merged.append({**first, "ok": all(e["ok"] for e in entries), "equal": equal_})
    return merged


# ----------------------------------------------------------------------------------------
# Algorithms that start their own processes: run from here, after the launch above.
# ----------------------------------------------------------------------------------------

def launched_rows(s: Settings) -> list[dict]:
    rows: list[dict] = []
    config = hogwild.HogwildConfig(num_workers=1, num_steps=50 * s.steps, num_features=200,
                                   nnz=5)
    row(rows, "Hogwild!, 1 worker (own launch)", lambda: hogwild.run(config)[0],
        lambda w: equal(w, hogwild.reference(config)),
        note="shared CPU memory on every backend")
    if s.world_size < 2:
        ps_config = parameter_server.ParameterServerConfig(
            replace(convex.WORKLOAD, num_steps=s.steps, batch_size=16), num_workers=1, staleness=0)
        row(rows, "parameter server, BSP (own gloo launch, 2 ranks)",
            lambda: parameter_server.run(ps_config, backend="gloo").params,
            lambda params: equal(params, parameter_server.reference(ps_config)), note="gloo only")
    job = elastic.TrainConfig(os.path.join(s.folder, "elastic"), algorithm="zero",
                              workload=replace(elastic.WORKLOAD, num_steps=2 * s.steps),
                              checkpoint_every=s.steps, fault=Fault("kill", 0, s.steps + 1))
    agent = ElasticConfig(world_size=s.world_size, max_restarts=1, shrink=s.world_size > 1)

    def resumed(run):
        if run.summary()["restarts"] != 1:
            raise AssertionError(f"expected one restart, got {run.summary()}")
        return equal(run.result()[0]["params"], elastic.reference(job)["params"],
                     "after a restart, = reference")
    row(rows, "elastic, rank 0 killed, ZeRO-1 resumed (own launches)",
        lambda: elastic.run(job, agent), resumed)
    return rows


def cpu_name() -> str:
    """The processor's model name (Linux), else its architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.machine()


def table(rows, n, backend, device, numel) -> list[str]:
    lines = [f"- {n} rank(s), backend {backend}, device {device}; torch {torch.__version__}, "
             f"distlab {distlab.__version__}; collectives on {numel * 4 / 2**20:.2f} MiB float32",
             f"- {sum(r['ok'] for r in rows)} of {len(rows)} checks ok", "",
             "| check | ok | seconds | equals its reference | memory | note |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.3f}"
        lines.append(f"| {r['name']} | {'ok' if r['ok'] else 'FAILED'} | {seconds} | "
                     f"{r['equal']} | {r['memory']} | {r['note']} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
