"""Does the planner rank plans as real processes do? Measure, predict, correlate.

:func:`validate` trains the lab's character transformer as ``dp x tp`` grids
(:mod:`distlab.model_parallel.mesh`, real gloo processes), times each step (the slowest
rank's, median after a warm-up), predicts every configuration with
:func:`distlab.planning.planner.predict` for this machine
(:meth:`~distlab.planning.cluster.Cluster.this_machine`: the α, β and γ of
:func:`distlab.communication.cost_model.fit`, one rank's FLOP/s from
:func:`measure_flops`), and returns the table of predicted against measured seconds.
:func:`spearman` is the rank correlation of the two columns: 1 when the planner orders the
configurations exactly as the clock does.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import replace

import pandas as pd
import torch

from distlab import comm
from distlab.checks import require_arg
from distlab.communication import cost_model
from distlab.communication.collectives import ALL_REDUCES
from distlab.launcher import launch
from distlab.model_parallel.mesh import MeshConfig, build_mesh, parallel_model, train_step
from distlab.planning.cluster import Cluster, ModelSpec
from distlab.planning.planner import Plan, Prediction, predict
from distlab.problems.workloads import Workload

WARMUP = 2
"""Steps left out of the median: the first ones build caches and warm the connections."""
FIT_SIZES = (4 * 1024, 64 * 1024, 512 * 1024)
"""Bytes of the all-reduces timed for the α-β fit."""


def configurations(num_steps: int = 6) -> list[MeshConfig]:
    """Six dp x tp grids on 2 and 4 ranks whose predicted step times lie far apart (each
    about twice the last, so the load of a shared machine does not swap them): one model
    (so its FLOP/s stay alike), batches from 16 to 1024 sequences. On 2 cores a rank of a
    4-rank grid gets half a core."""
    base = Workload("transformer", hidden=64, depth=2, num_heads=4, block_size=16, lr=0.05,
                    num_steps=num_steps)
    grid = [(2, 1, 16), (1, 2, 32), (2, 1, 128), (2, 2, 256), (4, 1, 512), (1, 2, 1024)]
    return [MeshConfig(replace(base, batch_size=b), dp=dp, tp=tp) for dp, tp, b in grid]


def validate(configs: list[MeshConfig] | None = None, fit=None, flops: float | None = None,
             timeout: float = 300) -> list[dict]:
    """The table the lab plots: one row per config, predicted and measured seconds per step.

    One launch (:func:`measure`) times the steps and describes this machine: a few
    built-in all-reduces for :func:`distlab.communication.cost_model.fit` (unless ``fit``
    is given) and one rank's FLOP/s (unless ``flops``; see :func:`measure_flops`).
    Example: ``rows = validate(); spearman([r["predicted"] for r in rows],
    [r["measured"] for r in rows])``.
    """
    configs = configurations() if configs is None else configs
    require_arg("configs", configs, isinstance(configs, list) and len(configs) >= 2 and all(
        isinstance(c, MeshConfig) and c.workload.model == "transformer" for c in configs),
        "a list of at least 2 MeshConfig of model 'transformer'")
    bench = measure(configs, timeout=timeout)
    if fit is None:
        fit = cost_model.fit(pd.DataFrame(bench["collectives"]))["gloo"]
    flops = bench["flops"] if flops is None else flops
    rows = []
    for config, seconds in zip(configs, bench["seconds"]):
        w, prediction = config.workload, predict_config(config, flops, fit)
        rows.append(dict(dp=config.dp, tp=config.tp, hidden=w.hidden, batch_size=w.batch_size,
                         world_size=config.world_size, predicted=prediction.seconds,
                         measured=seconds,
                         **{f"predicted_{k}": v for k, v in prediction.step_time.items()}))
    return rows


def predict_config(config: MeshConfig, flops: float, fit) -> Prediction:
    """The planner's prediction for ``config`` on ``config.world_size`` ranks of this
    machine, each of ``flops`` FLOP/s, its links those of ``fit``."""
    cluster = Cluster.this_machine(config.world_size, flops=flops, fit=fit)
    return predict(Plan(dp=config.dp, tp=config.tp), ModelSpec.from_workload(config.workload),
                   cluster)


def spearman(x, y) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks (ties share the mean
    of their ranks; Spearman 1904)."""
    require_arg("x", x, len(x) == len(y) and len(x) >= 2, "as long as y, at least 2 values")
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (sx * sy) if sx and sy else 0.0


def measure(configs: list[MeshConfig], timeout: float = 300) -> dict:
    """One launch of as many ranks as the largest config: each config's seconds per step,
    the built-in all-reduce's times for :func:`distlab.communication.cost_model.fit` on
    every world size, and one rank's FLOP/s (:func:`measure_flops` on rank 0 alone).

    A config of p ranks runs on ranks 0..p-1 while the others wait, and the configs take
    their steps in turns (round robin), so a change in the machine's load falls on all of
    them alike. Seconds per step: the slowest rank's, median over the steps after
    :data:`WARMUP`. Returns ``{"seconds": [...], "collectives": [rows], "flops": float}``.
    """
    for i, c in enumerate(configs):
        require_arg(f"configs[{i}].workload.num_steps", c.workload.num_steps,
                    c.workload.num_steps > WARMUP, f"> WARMUP={WARMUP}")
    loaded = [replace(c, workload=c.workload.loaded()) for c in configs]
    world_size = max(c.world_size for c in configs)
    require_arg("configs", [c.world_size for c in configs],
                all(world_size % c.world_size == 0 for c in configs),
                f"world sizes that divide the largest, {world_size}")
    return launch(_bench, world_size, loaded, timeout=timeout)[0]


def measure_flops(workload: Workload | None = None, num_steps: int = 5) -> float:
    """This process's FLOP/s training ``workload`` (default: the transformer of
    :func:`configurations` at batch 32): ``6·Ψ·tokens`` (Ψ by
    ``ModelSpec.num_params``) over the median seconds of a step after :data:`WARMUP`."""
    workload = workload or replace(configurations(num_steps)[0].workload, batch_size=32)
    require_arg("workload.num_steps", workload.num_steps, workload.num_steps > WARMUP,
                f"> WARMUP={WARMUP}")
    model, times = workload.build_model(), []
    optimizer = workload.optimizer(model.parameters())
    for X, y in workload.batches():
        t0 = time.perf_counter()
        workload.loss(model(X), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - t0)
    spec = ModelSpec.from_workload(workload)
    return (6 * spec.num_params * spec.global_batch * spec.seq_len
            / statistics.median(times[WARMUP:]))


def _bench(configs: list[MeshConfig]) -> dict:
    """Worker: rank 0's FLOP/s alone, the all-reduce times on every world size, and every
    config's seconds per step, the configs stepping in turns."""
    import torch.distributed as dist
    rank = dist.get_rank()
    sizes = sorted({c.world_size for c in configs})
    # A config of p ranks runs on ranks 0..p-1. Every rank joins a block of p ranks and
    # builds every config's mesh on it, because torch names a group by its ranks and by how
    # many groups the process has made: the counts must stay equal on all ranks.
    groups = {p: dist.new_group(list(range(rank // p * p, rank // p * p + p)),
                                use_local_synchronization=True) for p in sizes}
    flops = torch.tensor([measure_flops() if rank == 0 else 0.0])
    comm.broadcast(flops, src=0)
    collectives = []
    for p in sizes:
        if rank < p:
            collectives += [dict(algorithm="gloo", world_size=p, nbytes=n, time=
                                 cost_model.time_collective(ALL_REDUCES["gloo"], n // 4,
                                                            groups[p], repeats=3))
                            for n in FIT_SIZES]
        comm.barrier()
    runs = [_Run(c, groups[c.world_size]) for c in configs]
    for _ in range(max(c.workload.num_steps for c in configs)):
        for config, run in zip(configs, runs):
            if rank < config.world_size:
                run.step()
        comm.barrier()                        # the next round starts together
    return {"seconds": [statistics.median(r.times[WARMUP:]) if r.times else None
                        for r in runs], "collectives": collectives, "flops": flops.item()}


class _Run:
    """One config on its group of ranks: its model, optimizer and batches, step by step."""

    def __init__(self, config: MeshConfig, group):
        self.mesh, self.workload, self.group = build_mesh(config, group), config.workload, group
        self.model = parallel_model(self.workload, self.mesh)
        self.optimizer = self.workload.optimizer(self.model.parameters())
        self.batches, self.times = self.workload.batches(), []

    def step(self) -> None:
        """One timed step (none once the batches run out): the slowest rank's seconds."""
        batch = next(self.batches, None)
        if batch is None:
            return
        comm.barrier(self.group)              # every rank starts the step together
        t0 = time.perf_counter()
        train_step(self.model, self.optimizer, *batch, self.workload.loss, self.mesh)
        dt = torch.tensor([time.perf_counter() - t0])
        comm.all_reduce(dt, op=torch.distributed.ReduceOp.MAX, group=self.group)
        self.times.append(dt.item())


def _ranks(values) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):                             # ties: the mean rank
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks
