"""Lab 04's runs: one training loop for every ZeRO stage, the memory sweep, and its figures.

:func:`make_stage` turns a model into (model, optimizer) for stage 0, 1, 2 or 3, so the same
loop (forward, ``backward()``, ``step()``) trains all four; :func:`train_worker` is that
loop on the digits data, and :func:`train_reference` the same training on one process.
:func:`sweep` measures memory and bytes per step for each stage and world size, beside the
formulas of :mod:`distlab.sharding.memory`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
import torch.distributed as dist
from torch.nn import functional as F

from distlab import comm, launcher
from distlab.problems import data, models
from distlab.sharding import memory
from distlab.checks import is_int, is_number, require
from distlab.sharding.fsdp import FullyShardedDataParallel
from distlab.metrics import report
from distlab.sharding.zero import OPTIMIZERS, STAGES, NaiveDistributedOptimizer, ShardedOptimizer

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
    cls, extra = OPTIMIZERS[optimizer]
    if stage == 0:
        return model, NaiveDistributedOptimizer(model.parameters(), cls, group, lr=lr, **extra)
    if stage in (1, 2):
        mode = "reduce_scatter" if stage == 1 else "sharded"
        return model, ShardedOptimizer(model.parameters(), cls, group, gradients=mode, lr=lr,
                                       **extra)
    sharded = FullyShardedDataParallel(model, group, compute_dtype=compute_dtype)
    return sharded, cls(sharded.parameters(), lr=lr, **extra)


@dataclass(frozen=True)
class ZeroConfig:
    """One training run of lab 04: an MLP on the digits, with ZeRO stage ``stage``."""
    stage: int = 1
    """0 (naive data parallel), 1, 2 or 3."""
    optimizer: str = "adam"
    """"sgd" (momentum 0.9), "adam" or "adamw" (weight decay 0.01)."""
    lr: float = 0.01
    """learning rate."""
    hidden: int = 64
    """width of the hidden layers: the model's size."""
    depth: int = 2
    """number of hidden layers."""
    num_steps: int = 30
    """optimizer steps."""
    batch_size: int = 64
    """global batch: each of N ranks takes batch_size / N examples."""
    seed: int = 0
    """seed of the model and of the batches."""

    def __post_init__(self):
        require(self, "stage", self.stage in STAGES, "0, 1, 2 or 3")
        require(self, "optimizer", self.optimizer in OPTIMIZERS, f"one of {sorted(OPTIMIZERS)}")
        require(self, "lr", is_number(self.lr) and 0 < self.lr <= 10, "(0, 10]")
        require(self, "hidden", is_int(self.hidden) and 1 <= self.hidden <= 4096, "1..4096")
        require(self, "depth", is_int(self.depth) and 1 <= self.depth <= 16, "1..16")
        require(self, "num_steps", is_int(self.num_steps) and 1 <= self.num_steps <= 10**6,
                "1..1000000")
        require(self, "batch_size", is_int(self.batch_size) and 1 <= self.batch_size <= 1437,
                "1..1437 (the digits training set)")


def _batch(config: ZeroConfig, step: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(config.seed * 100003 + step)
    return torch.randperm(n, generator=g)[: config.batch_size]


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1).float() for v in state.values()])


def train_worker(config: ZeroConfig, group=None) -> dict:
    """Train on every rank; report loss and bytes sent per step; return params and memory."""
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    ds = data.digits(seed=config.seed)
    net = models.mlp(ds.num_features, config.hidden, ds.num_classes, config.depth, config.seed)
    model, opt = make_stage(config.stage, net, config.optimizer, group, config.lr)
    comm.ledger().reset()
    for step in range(config.num_steps):
        mine = _batch(config, step, len(ds.y)).chunk(world_size)[rank]
        loss = F.cross_entropy(model(ds.X[mine]), ds.y[mine])
        opt.zero_grad()
        loss.backward()
        opt.step()
        report(step=step, loss=loss.item(), **comm.ledger().totals())
    mem = memory.measure(model, opt)
    full = model.full_state_dict() if config.stage == 3 else model.state_dict()
    return {"params": _flat(full), "memory": mem,
            "bytes_per_step": comm.ledger().totals()["bytes_sent"] / config.num_steps}


def train_reference(config: ZeroConfig) -> torch.Tensor:
    """The same training on one process with the plain optimizer: the flat final params."""
    ds = data.digits(seed=config.seed)
    net = models.mlp(ds.num_features, config.hidden, ds.num_classes, config.depth, config.seed)
    cls, extra = OPTIMIZERS[config.optimizer]
    opt = cls(net.parameters(), lr=config.lr, **extra)
    for step in range(config.num_steps):
        idx = _batch(config, step, len(ds.y))
        opt.zero_grad()
        F.cross_entropy(net(ds.X[idx]), ds.y[idx]).backward()
        opt.step()
    return _flat(net.state_dict())


def start_training(world_size: int = 4, stage: int = 1, optimizer: str = "adam",
                   hidden: int = 64, on_metrics=None, on_output=None, **config) -> launcher.Run:
    """Start :func:`train_worker` on ``world_size`` processes (for a RunPanel); validated first."""
    cfg = ZeroConfig(stage=stage, optimizer=optimizer, hidden=hidden, **config)
    if cfg.batch_size % world_size:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by world_size="
                         f"{world_size}, so every rank's mean loss has the same weight")
    return launcher.start(train_worker, world_size, cfg, on_metrics=on_metrics,
                          on_output=on_output)


# -- the memory and communication sweep ------------------------------------------------------

def _sweep_worker(config: ZeroConfig, stages) -> list[dict]:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    rows = []
    for stage in stages:
        cfg = ZeroConfig(**{**asdict(config), "stage": stage, "num_steps": 2})
        ds = data.digits(seed=cfg.seed)
        net = models.mlp(ds.num_features, cfg.hidden, ds.num_classes, cfg.depth, cfg.seed)
        num_params = models.num_parameters(net)
        model, opt = make_stage(stage, net, cfg.optimizer, None, cfg.lr)
        for step in range(2):    # the second step is the one measured: state exists by then
            comm.ledger().reset()
            mine = _batch(cfg, step, len(ds.y)).chunk(world_size)[rank]
            opt.zero_grad()
            F.cross_entropy(model(ds.X[mine]), ds.y[mine]).backward()
            opt.step()
        measured = memory.measure(model, opt)
        predicted = memory.predicted_bytes(num_params, stage, world_size, cfg.optimizer)
        sent = comm.ledger().totals()["bytes_sent"]
        ring = (world_size - 1) / world_size * 4 * num_params
        for cat in memory.CATEGORIES:
            rows.append(dict(world_size=world_size, stage=stage, rank=rank, category=cat,
                             measured=measured[cat], predicted=predicted[cat]))
        rows.append(dict(world_size=world_size, stage=stage, rank=rank, category="bytes_sent",
                         measured=sent, predicted=(3 if stage == 3 else 2) * ring))
    return rows


def sweep(world_sizes=(2, 4), stages=STAGES, optimizer: str = "adam", hidden: int = 64,
          depth: int = 2) -> pd.DataFrame:
    """Memory per rank (by category) and bytes sent per step, for each stage and world size.

    One launch per world size. Returns a tidy frame: ``world_size, stage, rank, category,
    measured, predicted`` (bytes); category ``bytes_sent`` is the communication of one step.
    """
    config = ZeroConfig(optimizer=optimizer, hidden=hidden, depth=depth)
    rows = []
    for n in world_sizes:
        for per_rank in launcher.launch(_sweep_worker, n, config, tuple(stages)):
            rows.extend(per_rank)
    return pd.DataFrame(rows)


COLORS = {"params": "#4C78A8", "grads": "#F58518", "optimizer_state": "#54A24B"}


def memory_figure(df: pd.DataFrame) -> go.Figure:
    """Stacked bars of memory per rank (largest rank) by stage and world size: measured
    (solid) beside ZeRO's formula (hatched)."""
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
    fig.update_layout(barmode="group", template="plotly_white", height=420,
                      title="model-state memory per rank: measured (solid) and ZeRO's formula "
                            "(hatched)", yaxis_title="KiB per rank")
    return fig


def comm_figure(df: pd.DataFrame) -> go.Figure:
    """Bytes sent per rank in one step, by stage: measured bars, formula markers."""
    c = df[df.category == "bytes_sent"].groupby(["world_size", "stage"], as_index=False)[
        ["measured", "predicted"]].max()
    fig = go.Figure()
    for n, part in c.groupby("world_size"):
        x = [STAGE_NAMES[s] for s in part.stage]
        fig.add_bar(x=x, y=part.measured / 1024, name=f"N={n} measured", offsetgroup=str(n))
        fig.add_scatter(x=x, y=part.predicted / 1024, mode="markers", name=f"N={n} formula",
                        offsetgroup=str(n), marker=dict(symbol="x", size=11, color="black"))
    fig.update_layout(barmode="group", scattermode="group", template="plotly_white", height=380,
                      title="communication per step: 2Ψ for stages 0-2, 3Ψ for stage 3 "
                            "(times (N-1)/N)", yaxis_title="KiB sent per rank per step")
    return fig
