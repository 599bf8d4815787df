"""Does the planner rank plans as real processes do? Measure, predict, correlate.

:func:`validate` trains the lab's character transformer as ``dp x tp`` grids
(:mod:`distlab.model_parallel.mesh`, :func:`configurations`) and ``dp x tp x pp`` grids
(:mod:`distlab.model_parallel.three_d`, :func:`pipeline_configurations`) on real gloo
processes, times each step (the slowest rank's, median after a warm-up), predicts every
configuration with :func:`distlab.planning.planner.predict` for this machine
(:meth:`~distlab.planning.cluster.Cluster.this_machine`, :func:`machine_fit`: the α, β
and δ of :func:`distlab.communication.cost_model.fit`, γ of :func:`crowded_gamma`, one
rank's FLOP/s from :func:`measure_flops`), and returns the table of predicted against
measured seconds. :func:`spearman` is the rank correlation of the two columns: 1 when the
planner orders the configurations exactly as the clock does.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import replace

import pandas as pd
import torch

from distlab import comm
from distlab.checks import require_arg
from distlab.communication import alpha_beta, cost_model
from distlab.communication.collectives import ALL_REDUCES
from distlab.launcher import launch
from distlab.model_parallel.mesh import MeshConfig, build_mesh, parallel_model, train_step
from distlab.model_parallel.pipeline import HEADER, PipelineStage
from distlab.model_parallel import three_d
from distlab.model_parallel.three_d import ThreeDConfig
from distlab.planning.cluster import Cluster, ModelSpec
from distlab.planning.planner import Plan, Prediction, predict
from distlab.problems.workloads import Workload

WARMUP = 2
"""Steps left out of the median: the first ones build caches and warm the connections."""
FIT_SIZES = (4 * 1024, 64 * 1024, 512 * 1024)
"""Bytes of the all-reduces timed for the α-β fit."""
MESSAGE_REPEATS = 50
"""Small messages each rank sends (and receives) to time one on a busy machine."""


def configurations(num_steps: int = 6) -> list[MeshConfig]:
    """Six dp x tp grids on 2 and 4 ranks whose predicted step times lie far apart (each
    about twice the last, so the load of a shared machine does not swap them): one model
    (so its FLOP/s stay alike), batches from 16 to 1024 sequences. On 2 cores a rank of a
    4-rank grid gets half a core."""
    base = Workload("transformer", hidden=64, depth=2, num_heads=4, block_size=16, lr=0.05,
                    num_steps=num_steps)
    grid = [(2, 1, 16), (1, 2, 32), (2, 1, 128), (2, 2, 256), (4, 1, 512), (1, 2, 1024)]
    return [MeshConfig(replace(base, batch_size=b), dp=dp, tp=tp) for dp, tp, b in grid]


def pipeline_configurations(num_steps: int = 6) -> list[ThreeDConfig]:
    """Two dp x tp x pp grids on 4 ranks (:mod:`distlab.model_parallel.three_d`, 2 stages),
    the model of :func:`configurations`, batches chosen so their predicted step times fall
    about twice away from those of :func:`configurations`' grids: in its one wide gap, and
    above its slowest."""
    base = configurations(num_steps)[0].workload
    grid = [(1, 2, 2, 32, 2), (2, 1, 2, 2048, 4)]
    return [ThreeDConfig(replace(base, batch_size=b), dp, tp, pp, num_microbatches=m)
            for dp, tp, pp, b, m in grid]


def validate(configs: list | None = None, fit=None, flops: float | None = None,
             timeout: float = 300) -> list[dict]:
    """The table the lab plots: one row per config, predicted and measured seconds per step.

    ``configs``: :class:`~distlab.model_parallel.mesh.MeshConfig` s (dp x tp) and
    :class:`~distlab.model_parallel.three_d.ThreeDConfig` s (dp x tp x pp), default
    :func:`configurations`. One launch (:func:`measure`) times the steps and describes this
    machine: a few built-in all-reduces and small messages for :func:`machine_fit` (unless
    ``fit`` is given) and one rank's FLOP/s (unless ``flops``; see :func:`measure_flops`).
    Example: ``rows = validate(configurations() + pipeline_configurations());
    spearman([r["predicted"] for r in rows], [r["measured"] for r in rows])``.
    """
    configs = configurations() if configs is None else configs
    require_arg("configs", configs, isinstance(configs, list) and len(configs) >= 2 and all(
        isinstance(c, (MeshConfig, ThreeDConfig)) and c.workload.model == "transformer"
        for c in configs), "a list of at least 2 MeshConfig or ThreeDConfig of model "
        "'transformer'")
    bench = measure(configs, timeout=timeout)
    fit = machine_fit(bench) if fit is None else fit
    flops = bench["flops"] if flops is None else flops
    rows = []
    for config, seconds in zip(configs, bench["seconds"]):
        w, prediction = config.workload, predict_config(config, flops, fit)
        plan = prediction.plan
        rows.append(dict(dp=plan.dp, tp=plan.tp, pp=plan.pp, microbatches=plan.microbatches,
                         hidden=w.hidden, batch_size=w.batch_size,
                         world_size=config.world_size, predicted=prediction.seconds,
                         measured=seconds,
                         **{f"predicted_{k}": v for k, v in prediction.step_time.items()}))
    return rows


def predict_config(config, flops: float, fit) -> Prediction:
    """The planner's prediction for ``config`` (a ``MeshConfig`` or a ``ThreeDConfig``) on
    ``config.world_size`` ranks of this machine, each of ``flops`` FLOP/s, its links those
    of ``fit``."""
    cluster = Cluster.this_machine(config.world_size, flops=flops, fit=fit)
    plan = Plan(dp=config.dp, tp=config.tp, pp=getattr(config, "pp", 1),
                microbatches=getattr(config, "num_microbatches", 1))
    return predict(plan, ModelSpec.from_workload(config.workload), cluster)


def machine_fit(bench: dict) -> cost_model.Fit:
    """This machine's links from :func:`measure`'s answer: α, β and δ of
    :func:`distlab.communication.cost_model.fit` on the all-reduces, γ of
    :func:`crowded_gamma` on the small messages (the all-reduces' own γ when no message
    was timed with more ranks than cores)."""
    fit = cost_model.fit(pd.DataFrame(bench["collectives"]))["gloo"]
    return replace(fit, gamma=crowded_gamma(bench["messages"], fit.alpha, fit.cores)
                   or fit.gamma)


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


def measure(configs: list, timeout: float = 300) -> dict:
    """One launch of as many ranks as the largest config: each config's seconds per step,
    the built-in all-reduce's times for :func:`distlab.communication.cost_model.fit` and a
    small message's with every rank busy (for :func:`crowded_gamma`) on every world size,
    and one rank's FLOP/s (:func:`measure_flops` on rank 0 alone).

    A config of p ranks runs on ranks 0..p-1 while the others wait, and the configs take
    their steps in turns (round robin), so a change in the machine's load falls on all of
    them alike. Seconds per step: the slowest rank's, median over the steps after
    :data:`WARMUP`. Returns ``{"seconds": [...], "collectives": [rows], "messages": [rows],
    "flops": float}``.
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
    return step_flops(workload) / _step_seconds(workload)


def measure_compute(workload: Workload, small_batch: int = 1) -> tuple[float, float]:
    """``(flops, overhead)`` of this process on ``workload``'s model: a step's median
    seconds at the workload's batch B and at ``small_batch`` b, on the line
    ``t(batch) = overhead + 6·Ψ·tokens(batch) / flops`` through both (overhead clipped to
    [0, t(b)]: a tiny model's step is mostly the fixed cost of its operations)."""
    require_arg("small_batch", small_batch, small_batch < workload.batch_size,
                f"< workload.batch_size={workload.batch_size}")
    t_big = _step_seconds(workload)
    t_small = _step_seconds(replace(workload, batch_size=small_batch))
    b, B = small_batch, workload.batch_size
    overhead = min(max(0.0, (t_small * B - t_big * b) / (B - b)), t_small)
    return step_flops(workload) / max(t_big - overhead, 1e-9), overhead


def crowded_gamma(messages: list[dict], alpha: float, cores: int | None = None) -> float:
    """The γ of ``alpha + γ·max(0, p/c - 1)`` that fits ``messages`` (rows ``world_size``,
    ``time``: one small message's seconds with every rank computing between messages, as
    :func:`measure` times them), least squares over the rows with more ranks than ``cores``
    (None: this machine's); 0 without such rows.

    On a crowded machine a message waits for its receiver to get a core, which the
    all-reduces of :func:`measure`, timed with nothing else to do, hardly see: every
    message of a run pays it, a pipeline's headers as much as its tensors.
    """
    cores = alpha_beta.machine_cores() if cores is None else cores
    crowded = [(alpha_beta.oversubscription(r["world_size"], cores), r["time"])
               for r in messages if r["world_size"] > cores]
    if not crowded:
        return 0.0
    return max(0.0, sum(o * (t - alpha) for o, t in crowded) / sum(o * o for o, _ in crowded))


def step_flops(workload: Workload) -> float:
    """FLOPs of one training step of ``workload``: ``6·Ψ·tokens`` (Ψ by
    ``ModelSpec.num_params``)."""
    spec = ModelSpec.from_workload(workload)
    return 6 * spec.num_params * spec.global_batch * spec.seq_len


def _step_seconds(workload: Workload) -> float:
    """The median seconds of a training step of ``workload`` after :data:`WARMUP`."""
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
    return statistics.median(times[WARMUP:])


def _message_seconds(group, repeats: int = MESSAGE_REPEATS) -> float:
    """Seconds of one small message (a pipeline header) between this rank and its pair
    ``rank ^ 1`` of ``group``, every pair at once and every rank computing between its
    messages, as in a run (a message then waits for its receiver to get a core): rounds of
    work and a message each way, less the same rounds of work alone."""
    import torch.distributed as dist
    rank = dist.get_rank(group)
    peer = dist.get_global_rank(group, rank ^ 1) if group is not None else rank ^ 1
    header, work = torch.zeros(HEADER, dtype=torch.long), torch.randn(64, 64)

    def rounds(n: int, talk: bool) -> float:
        comm.barrier(group)
        t0 = time.perf_counter()
        for _ in range(n):
            for _ in range(20):               # about 0.2 ms of a rank's compute
                work @ work
            if talk:
                first, second = (comm.send, comm.recv) if rank % 2 == 0 else (comm.recv,
                                                                               comm.send)
                first(header, peer)
                second(header, peer)
        return time.perf_counter() - t0

    rounds(1, True)                           # gloo connects a pair on its first message
    alone = rounds(repeats, False)
    return max(0.0, rounds(repeats, True) - alone) / (2 * repeats)


def _bench(configs: list) -> dict:
    """Worker: rank 0's FLOP/s alone, the all-reduce and small-message times on every world
    size, and every config's seconds per step, the configs stepping in turns."""
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
    collectives, messages = [], []
    for p in sizes:
        if rank < p:
            collectives += [dict(algorithm="gloo", world_size=p, nbytes=n, time=
                                 cost_model.time_collective(ALL_REDUCES["gloo"], n // 4,
                                                            groups[p], repeats=3))
                            for n in FIT_SIZES]
            if p % 2 == 0:
                messages.append(dict(world_size=p, time=_message_seconds(groups[p])))
        comm.barrier()
    runs = [_Run(c, groups[c.world_size]) for c in configs]
    for _ in range(max(c.workload.num_steps for c in configs)):
        for config, run in zip(configs, runs):
            if rank < config.world_size:
                run.step()
        comm.barrier()                        # the next round starts together
    return {"seconds": [statistics.median(r.times[WARMUP:]) if r.times else None
                        for r in runs], "collectives": collectives, "messages": messages,
            "flops": flops.item()}


class _Run:
    """One config on its group of ranks: its model, optimizer and batches, step by step."""

    def __init__(self, config, group):
        self.workload, self.group = config.workload, group
        if isinstance(config, ThreeDConfig):      # this rank's stage of its pp line
            grid = three_d.build_grid(config, group)
            stage = PipelineStage(three_d.stage_layers(self.workload, grid), grid.pp_rank,
                                  config.pipeline, grid.pp_group)
            self.optimizer = self.workload.optimizer(stage.layers.parameters())
            self._step = lambda X, y: three_d.train_step(stage, self.optimizer, X, y,
                                                         self.workload.loss, grid)
        else:
            mesh = build_mesh(config, group)
            model = parallel_model(self.workload, mesh)
            self.optimizer = self.workload.optimizer(model.parameters())
            self._step = lambda X, y: train_step(model, self.optimizer, X, y,
                                                 self.workload.loss, mesh)
        self.batches, self.times = self.workload.batches(), []

    def step(self) -> None:
        """One timed step (none once the batches run out): the slowest rank's seconds."""
        batch = next(self.batches, None)
        if batch is None:
            return
        comm.barrier(self.group)              # every rank starts the step together
        t0 = time.perf_counter()
        self._step(*batch)
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
