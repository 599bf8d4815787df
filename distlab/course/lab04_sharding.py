"""Lab 04's runs: one training loop for every ZeRO stage, the memory sweep, and its figures.

:func:`make_stage` turns a model into (model, optimizer) for stage 0, 1, 2 or 3, so the same
loop (forward, ``backward()``, ``step()``) trains all four. A :class:`ZeroConfig` composes
the shared :class:`~distlab.problems.workloads.Workload` (the MLP on the digits, or the tiny
transformer) with a stage, an optimizer and a world size; the verbs are distlab's:
:func:`train` runs on each rank, :func:`reference` is the one-process run it must equal,
:func:`start` returns a :class:`~distlab.Run` and :func:`run` waits for it; the lab's
:class:`~distlab.ui.panel.RunPanel` calls :func:`start` with a :class:`ZeroConfig` whose
fields (and its workload's) the controls set by name.
:func:`sweep` measures memory and bytes per step for each stage and world size, beside the
formulas of :mod:`distlab.sharding.memory`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import pandas as pd
import plotly.graph_objects as go
import torch
import torch.distributed as dist

from distlab import comm, launcher
from distlab.checks import is_int, is_number, require, require_arg
from distlab.memory.measure import largest_unit_bytes, measure_step
from distlab.metrics import report
from distlab.problems import models
from distlab.problems.workloads import Workload
from distlab.sharding import memory
from distlab.sharding.fsdp import FullyShardedDataParallel
from distlab.sharding.zero import OPTIMIZERS, STAGES, NaiveDistributedOptimizer, ShardedOptimizer
from distlab.worker import device

STAGE_NAMES = {0: "stage 0 (naive)", 1: "stage 1 (P_os)", 2: "stage 2 (P_os+g)",
               3: "stage 3 (P_os+g+p)"}


def make_stage(stage: int, model: torch.nn.Module, optimizer: str = "adam", group=None,
               lr: float = 0.01, compute_dtype=None):
    """``(model, optimizer)`` for ZeRO ``stage``; after ``loss.backward()``, ``step()``.

    0: :class:`~distlab.sharding.zero.NaiveDistributedOptimizer` (all-reduce, full state);
    1: :class:`~distlab.sharding.zero.ShardedOptimizer` with reduce-scattered gradients;
    2: the same with sharded gradients; 3: :class:`~distlab.sharding.fsdp.FullyShardedDataParallel`
    and the plain optimizer over its shards.
    """
    require_stage(stage, optimizer)
    require_arg("lr", lr, is_number(lr) and lr > 0, "a number > 0")
    cls, extra = OPTIMIZERS[optimizer]
    if stage == 0:
        return model, NaiveDistributedOptimizer(model.parameters(), cls, group, lr=lr, **extra)
    if stage in (1, 2):
        mode = "reduce_scatter" if stage == 1 else "sharded"
        return model, ShardedOptimizer(model.parameters(), cls, group, gradients=mode, lr=lr,
                                       **extra)
    sharded = FullyShardedDataParallel(model, group, compute_dtype=compute_dtype)
    return sharded, cls(sharded.parameters(), lr=lr, **extra)


def require_stage(stage, optimizer) -> None:
    """Refuse a stage or optimizer name that :func:`make_stage` does not know."""
    require_arg("stage", stage, is_int(stage) and stage in STAGES, "0, 1, 2 or 3")
    require_arg("optimizer", optimizer, optimizer in OPTIMIZERS,
                f"one of {sorted(OPTIMIZERS)}")


@dataclass(frozen=True)
class ZeroConfig:
    """One training run of lab 04: a workload trained with ZeRO stage ``stage``."""
    stage: int = 1
    """0 (naive data parallel), 1, 2 or 3."""
    optimizer: str = "adam"
    """"sgd" (momentum 0.9), "adam" or "adamw" (weight decay 0.01), at ``workload.lr``."""
    world_size: int = 4
    """ranks; each takes ``workload.batch_size / world_size`` examples of every batch."""
    workload: Workload = field(default_factory=lambda: Workload(lr=0.01, num_steps=30))
    """what is trained: model, data, lr, steps, batch size, seed."""

    def __post_init__(self):
        require(self, "stage", is_int(self.stage) and self.stage in STAGES, "0, 1, 2 or 3")
        require(self, "optimizer", self.optimizer in OPTIMIZERS, f"one of {sorted(OPTIMIZERS)}")
        require(self, "world_size", is_int(self.world_size)
                and 1 <= self.world_size <= launcher.MAX_WORLD_SIZE,
                f"an int in 1..{launcher.MAX_WORLD_SIZE}")
        require(self, "workload", isinstance(self.workload, Workload), "a Workload")
        require(self, "world_size", self.workload.batch_size % self.world_size == 0,
                f"a divisor of workload.batch_size={self.workload.batch_size}, so every "
                "rank's mean loss has the same weight")


def train(config: ZeroConfig, group=None) -> dict:
    """Train on every rank; report loss and bytes sent per step; return params and memory."""
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    wl, dev = config.workload, device()      # the CPU on gloo, this rank's GPU on NCCL
    model, opt = make_stage(config.stage, wl.build_model().to(dev), config.optimizer, group,
                            wl.lr)
    comm.ledger().reset()
    for step, (X, y) in enumerate(wl.batches()):
        # This rank's rows of the global batch: X (B, ...) -> (B/N, ...), y (B,) -> (B/N,).
        X, y = X.chunk(world_size)[rank].to(dev), y.chunk(world_size)[rank].to(dev)
        loss = wl.loss(model(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        report(step=step, loss=loss.item(), **comm.ledger().totals())
    mem = memory.measure(model, opt)
    full = model.full_state_dict() if config.stage == 3 else model.state_dict()
    return {"params": _flat(full), "memory": mem,
            "bytes_per_step": comm.ledger().totals()["bytes_sent"] / wl.num_steps}


def reference(config: ZeroConfig) -> torch.Tensor:
    """The same training on one process with the plain optimizer: the flat final params."""
    wl = config.workload
    net = wl.build_model()
    cls, extra = OPTIMIZERS[config.optimizer]
    opt = cls(net.parameters(), lr=wl.lr, **extra)
    for X, y in wl.batches():
        opt.zero_grad()
        wl.loss(net(X), y).backward()
        opt.step()
    return _flat(net.state_dict())


def start(config: ZeroConfig, **launch) -> launcher.Run:
    """Start :func:`train` on ``config.world_size`` processes; return the Run at once."""
    config = replace(config, workload=config.workload.loaded())   # data loaded once, here
    return launcher.start(train, config.world_size, config, **launch)


def run(config: ZeroConfig, **launch) -> list[dict]:
    """:func:`start` and wait: every rank's result of :func:`train`, in rank order."""
    return start(config, **launch).result()


def _flat(state: dict) -> torch.Tensor:
    """Every tensor of ``state`` flattened, in order: ``(num_params,)`` in float32."""
    return torch.cat([v.detach().reshape(-1).float().cpu() for v in state.values()])  # (numel,)


# -- the memory and communication sweep ------------------------------------------------------

def sweep(world_sizes=(2, 4), stages=STAGES, optimizer: str = "adam", hidden: int = 64,
          depth: int = 2) -> pd.DataFrame:
    """Memory per rank (by category) and communication per step, each stage and world size.

    One launch per world size; every argument is validated before the first. Returns a tidy
    frame: ``world_size, stage, rank, category, measured, predicted`` (bytes). Category
    ``peak`` is the largest model states (plus stage 3's gathered unit) at any moment of the
    last step, traced by :func:`distlab.memory.measure.measure_step`, beside ZeRO's total
    (plus :func:`~distlab.memory.measure.largest_unit_bytes` for stage 3). Category
    ``bytes_sent`` is one step's communication as the :mod:`distlab.comm` ledger counts it:
    for built-in collectives (stage 0's all-reduce, every all-gather) that is the ring
    algorithm's volume for the tensor really handed over (model bytes); on gloo, the
    reduce-scatter of stages 1-3 is distlab's own ring, whose sends are counted as they go:
    ``sent_point_to_point`` holds those alone, and ``collective_calls`` the number of
    collectives issued.
    """
    stages = tuple(stages)
    for stage in stages:
        require_stage(stage, optimizer)
    workload = Workload(hidden=hidden, depth=depth, lr=0.01, num_steps=2)
    configs = [ZeroConfig(optimizer=optimizer, world_size=n, workload=workload)
               for n in world_sizes]
    if not configs:
        raise ValueError("world_sizes=() is empty; allowed one or more ints in "
                         f"1..{launcher.MAX_WORLD_SIZE}")
    rows = []
    for config in configs:
        config = replace(config, workload=workload.loaded())
        for per_rank in launcher.launch(_sweep_worker, config.world_size, config, stages):
            rows.extend(per_rank)
    return pd.DataFrame(rows)


COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")


def _sweep_worker(config: ZeroConfig, stages) -> list[dict]:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    wl = config.workload           # two steps: the second is measured, state exists by then
    rows = []
    dev = device()
    for stage in stages:
        net = wl.build_model().to(dev)
        num_params = models.num_parameters(net)
        model, opt = make_stage(stage, net, config.optimizer, None, wl.lr)
        for X, y in wl.batches():
            comm.ledger().reset()
            # This rank's rows, as in train: X (B, ...) -> (B/N, ...), y (B,) -> (B/N,).
            X, y = X.chunk(world_size)[rank].to(dev), y.chunk(world_size)[rank].to(dev)
            step = measure_step(model, opt, (X, y), wl.loss)   # the last step's is kept
        measured = memory.measure(model, opt)
        predicted = memory.predicted_bytes(num_params, stage, world_size, config.optimizer)
        # The peak inside the step: model states plus, in stage 3, the gathered unit.
        rows.append(dict(world_size=world_size, stage=stage, rank=rank, category="peak",
                         measured=step["with_gathered_peak"],
                         predicted=sum(predicted.values()) + largest_unit_bytes(model)))
        ops = comm.ledger().by_op()
        ring = (world_size - 1) / world_size * 4 * num_params
        for cat in memory.CATEGORIES:
            rows.append(dict(world_size=world_size, stage=stage, rank=rank, category=cat,
                             measured=measured[cat], predicted=predicted[cat]))
        rows.append(dict(world_size=world_size, stage=stage, rank=rank, category="bytes_sent",
                         measured=comm.ledger().totals()["bytes_sent"],
                         predicted=(3 if stage == 3 else 2) * ring,
                         sent_point_to_point=ops.get("send", {}).get("bytes_sent", 0),
                         collective_calls=sum(ops[k]["calls"] for k in COLLECTIVES if k in ops)))
    return rows


COLORS = {"params": "#4C78A8", "grads": "#F58518", "optimizer_state": "#54A24B"}


def memory_figure(df: pd.DataFrame, peak: bool = False) -> go.Figure:
    """Stacked bars of memory per rank (largest rank) by stage and world size: measured
    (solid) beside ZeRO's formula (hatched); with ``peak``, markers for the measured peak
    inside the step (model states plus stage 3's gathered unit) and its formula."""
    mem = df[df.category.isin(memory.CATEGORIES)]
    mem = mem.groupby(["world_size", "stage", "category"], as_index=False)[
        ["measured", "predicted"]].max()
    fig = go.Figure()
    for source, pattern in (("measured", ""), ("predicted", "/")):
        base = None
        for cat in memory.CATEGORIES:
            part = mem[mem.category == cat].sort_values(["world_size", "stage"])
            x = [[f"N={n}" for n in part.world_size], [f"stage {s}" for s in part.stage]]
            y = part[source].to_numpy() / 1024
            fig.add_bar(x=x, y=y, base=base, name=f"{cat} ({source})", offsetgroup=source,
                        marker=dict(color=COLORS[cat], pattern_shape=pattern),
                        legendgroup=source)
            base = y if base is None else base + y
    if peak:     # the peak inside the step, stage 3's gathered unit included
        top = df[df.category == "peak"].groupby(["world_size", "stage"], as_index=False)[
            ["measured", "predicted"]].max()
        x = [[f"N={n}" for n in top.world_size], [f"stage {s}" for s in top.stage]]
        fig.add_scatter(x=x, y=top.measured / 1024, mode="markers", offsetgroup="measured",
                        name="measured peak in the step (model states + gathered unit)",
                        marker=dict(symbol="diamond", size=11, color="black"))
        fig.add_scatter(x=x, y=top.predicted / 1024, mode="markers", offsetgroup="predicted",
                        name="formula + the largest gathered unit (stage 3)",
                        marker=dict(symbol="x", size=11, color="black"))
    fig.update_layout(barmode="group", scattermode="group", template="plotly_white",
                      height=420, title="model-state memory per rank: measured (solid) and "
                      "ZeRO's formula (hatched)" + ("; markers: the peak inside the step"
                                                     if peak else ""),
                      yaxis_title="KiB per rank")
    return fig


def comm_figure(df: pd.DataFrame) -> go.Figure:
    """Bytes sent per rank in one step, by stage: the ring's point-to-point sends (measured)
    stacked under the built-in collectives' model bytes, and the formula's markers."""
    c = df[df.category == "bytes_sent"].groupby(["world_size", "stage"], as_index=False)[
        ["measured", "predicted", "sent_point_to_point"]].max()
    fig = go.Figure()
    for n, part in c.groupby("world_size"):
        x = [STAGE_NAMES[s] for s in part.stage]
        sent = part.sent_point_to_point / 1024
        fig.add_bar(x=x, y=sent, name=f"N={n} sent point to point (measured)",
                    offsetgroup=str(n))
        fig.add_bar(x=x, y=part.measured / 1024 - sent, base=sent, offsetgroup=str(n),
                    name=f"N={n} built-in collectives (model bytes)",
                    marker=dict(pattern_shape="/"))
        fig.add_scatter(x=x, y=part.predicted / 1024, mode="markers", name=f"N={n} formula",
                        offsetgroup=str(n), marker=dict(symbol="x", size=11, color="black"))
    fig.update_layout(barmode="group", scattermode="group", template="plotly_white", height=380,
                      title="communication per step: 2Ψ for stages 0-2, 3Ψ for stage 3 "
                            "(times (N-1)/N)", yaxis_title="KiB sent per rank per step")
    return fig
