"""3-D parallelism: data x tensor x pipeline on one grid of process groups (PTD-P).

Narayanan et al. 2021 ("Efficient large-scale language model training on GPU clusters
using Megatron-LM", section 2.3, figure 5) combine the three splits; the Ultra-Scale
Playbook (Tazi et al. 2025, "5D parallelism in a nutshell") adds sequence, context and
expert parallelism on top of the same grid. ``dp * tp * pp`` ranks are laid out with
**tp fastest, then dp, then pp** (Megatron's order, which :mod:`distlab.planning.planner`
assumes too)::

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank

so the ranks that talk the most (tensor parallel: every block, forward and backward) are
neighbours, and a pipeline line spans the whole machine. Every rank belongs to three
groups, one per axis:

* a **tp row** (``tp`` consecutive ranks): shares every weight matrix of its stage's
  blocks (:func:`~distlab.model_parallel.tensor_parallel.shard_transformer`);
* a **pp line** (``pp`` ranks, ``dp * tp`` apart): one rank per stage; activations go down
  it and their gradients back, point to point
  (:class:`~distlab.model_parallel.pipeline.PipelineStage`, GPipe or 1F1B over
  ``num_microbatches``);
* a **dp column** (``dp`` ranks, ``tp`` apart): the same shard of the same stage, fed
  another slice of the batch; its gradients, accumulated over the microbatches, are
  averaged once per step (:func:`distlab.data_parallel.ddp.average_gradients`).

Stage ``s`` holds the blocks ``partition(depth, pp)[s]``, the embedding on the first stage
and the head on the last, each block tensor-parallel over the stage's tp row.

Cost per step (alpha-beta, ring collectives, b = batch/(dp·m) sequences of T tokens of
width C per microbatch, Ψ parameters): tensor parallel, 4 all-reduces of b·T·C values over
``tp`` ranks per block and microbatch (2 forward, 2 backward); pipeline, per microbatch and
stage boundary one activation of b·T·C values forward and its gradient back, each a small
header then the tensor (2m transfers, 4m messages of alpha + n beta); data parallel, one all-reduce of the stage shard's Ψ/(tp·pp) gradients
over ``dp`` ranks.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from distlab import comm
from distlab.checks import is_int, require
from distlab.data_parallel.ddp import average_gradients
from distlab.launcher import device
from distlab.metrics import report
from distlab.model_parallel import pipeline
from distlab.model_parallel.pipeline import PipelineConfig, PipelineStage, partition
from distlab.model_parallel.tensor_parallel import gather_model, shard_transformer
from distlab.problems.workloads import Workload, train_reference_model

AXES = ("tp", "dp", "pp")
"""The grid's axes, fastest first; groups are made in this order on every rank."""
MAX_RANKS = 8


@dataclass(frozen=True)
class ThreeDConfig:
    """The transformer split ``dp x tp x pp`` ways, and how its pipeline is scheduled."""
    workload: Workload = field(default_factory=lambda: Workload(
        "transformer", hidden=16, num_heads=4, depth=2, block_size=8, batch_size=8))
    """What is trained: a ``"transformer"`` workload (blocks to cut into stages)."""
    dp: int = 2
    """Data-parallel degree: replicas, each fed ``batch_size / dp`` sequences."""
    tp: int = 2
    """Tensor-parallel degree: ranks sharing each weight matrix of a stage."""
    pp: int = 2
    """Pipeline stages; each holds ``depth / pp`` blocks (the first ones one more)."""
    num_microbatches: int = 2
    """Microbatches m each replica's batch is cut into."""
    schedule: str = "1f1b"
    """A schedule of :data:`distlab.model_parallel.pipeline.SCHEDULES`."""

    def __post_init__(self):
        w = self.workload
        require(self, "workload", isinstance(w, Workload) and w.model == "transformer",
                "a distlab.problems.workloads.Workload of model 'transformer'")
        for name in ("dp", "tp", "pp"):
            v = getattr(self, name)
            require(self, name, is_int(v) and 1 <= v <= MAX_RANKS, f"an int in 1..{MAX_RANKS}")
        require(self, "pp", self.dp * self.tp * self.pp <= MAX_RANKS,
                f"at most {MAX_RANKS // (self.dp * self.tp)} with dp={self.dp}, tp={self.tp}: "
                f"dp*tp*pp ranks, at most {MAX_RANKS}")
        require(self, "tp", w.num_heads % self.tp == 0,
                f"a divisor of num_heads={w.num_heads}: every rank gets whole heads")
        require(self, "pp", self.pp <= w.depth,
                f"at most depth={w.depth}: every stage needs a block")
        require(self, "num_microbatches", is_int(self.num_microbatches)
                and self.num_microbatches >= 1, "an int >= 1")
        require(self, "dp", w.batch_size % self.dp == 0,
                f"a divisor of batch_size={w.batch_size}: every replica gets an equal slice")
        per_replica = w.batch_size // self.dp
        require(self, "num_microbatches", per_replica % self.num_microbatches == 0,
                f"a divisor of batch_size/dp={per_replica}: equal microbatches")
        require(self, "schedule", self.schedule in pipeline.SCHEDULES,
                f"one of {pipeline.SCHEDULES}")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def pipeline(self) -> PipelineConfig:
        """What each pp line runs: ``pp`` stages, the microbatches and the schedule."""
        return PipelineConfig(workload=self.workload, num_stages=self.pp,
                              num_microbatches=self.num_microbatches, schedule=self.schedule)

    def rank(self, dp_rank: int, tp_rank: int, pp_rank: int) -> int:
        """The rank at these coordinates: tp fastest, then dp, then pp."""
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """``(dp_rank, tp_rank, pp_rank)`` of ``rank``."""
        rest, tp_rank = divmod(rank, self.tp)
        pp_rank, dp_rank = divmod(rest, self.dp)
        return dp_rank, tp_rank, pp_rank

    def groups(self) -> dict[str, list[list[int]]]:
        """Every group of each axis: ``{"tp": rows, "dp": columns, "pp": lines}``."""
        dp, tp, pp = range(self.dp), range(self.tp), range(self.pp)
        return {"tp": [[self.rank(d, t, s) for t in tp] for s in pp for d in dp],
                "dp": [[self.rank(d, t, s) for d in dp] for s in pp for t in tp],
                "pp": [[self.rank(d, t, s) for s in pp] for d in dp for t in tp]}


def train(config: ThreeDConfig, group=None) -> dict:
    """Worker: 3-D training of ``config.workload`` on the ``dp * tp * pp`` ranks of
    ``group`` (default: the world).

    Returns this rank's coordinates, ``losses`` (the global batch's, on every rank),
    ``step_seconds`` (each step's wall time, after a barrier), the gathered full
    parameters of its stage (``state``, keyed as in the unsplit model), its pipeline
    timeline ``events`` and its communication ``by_op``.
    """
    grid = build_grid(config, group)
    workload, dev = config.workload, device()       # the CPU on gloo, this rank's GPU on NCCL
    stage = PipelineStage(stage_layers(workload, grid).to(dev), grid.pp_rank,
                          config.pipeline, grid.pp_group)
    optimizer = workload.optimizer(stage.layers.parameters())
    comm.barrier(group)
    stage.timeline.t0 = time.perf_counter()
    comm.ledger().reset()            # count the training only, not building the groups
    losses, seconds = [], []
    for step, (X, y) in enumerate(workload.batches()):
        comm.barrier(group)          # steps start together: a step's time is its own
        t0 = time.perf_counter()
        loss = train_step(stage, optimizer, X.to(dev), y.to(dev), workload.loss, grid)
        seconds.append(time.perf_counter() - t0)
        losses.append(global_loss(loss, grid))
        report(step=step, loss=losses[-1], **comm.ledger().totals())
    totals, by_op = comm.ledger().totals(), comm.ledger().by_op()
    state = {k: v.detach().cpu() for k, v in gather_model(stage.layers).state_dict().items()}
    return {"rank": dist.get_rank(), "dp_rank": grid.dp_rank, "tp_rank": grid.tp_rank,
            "pp_rank": grid.pp_rank, "losses": losses, "step_seconds": seconds,
            "state": state, "events": stage.timeline.events, "by_op": by_op, **totals}


def reference(config: ThreeDConfig) -> dict:
    """The unsplit model trained in one process on the global batches: the ``losses``
    every rank must report and the final parameters (``state``) the stages must gather."""
    losses, model = train_reference_model(config.workload)
    return {"losses": losses, "state": model.state_dict()}


def start(config: ThreeDConfig, **launch_kwargs):
    """:func:`distlab.start` :func:`train` on ``dp * tp * pp`` ranks, the data loaded once
    here; ``launch_kwargs`` go to the launcher (``timeout``, ``on_metrics``, ...)."""
    from distlab.launcher import start as _start
    config = replace(config, workload=config.workload.loaded())
    return _start(train, config.world_size, config, **launch_kwargs)


def run(config: ThreeDConfig, **launch_kwargs) -> list[dict]:
    """Like :func:`start`, but wait and return every rank's result."""
    return start(config, **launch_kwargs).result()


def sweep(configs: list[ThreeDConfig], group=None) -> list[dict]:
    """Worker: :func:`train` for every config in one launch (all of one world size)."""
    return [train(c, group) for c in configs]


def train_step(stage: PipelineStage, optimizer, X, y, loss_fn, grid: "Grid"):
    """One optimizer step: this replica's slice of the global batch ``(X, y)`` through the
    pipeline (gradients accumulate over the microbatches, tensor-parallel inside every
    block), the accumulated gradients averaged over the dp column, the step.

    Returns this replica's loss on the last stage, None on the others.
    """
    dp = grid.config.dp
    X, y = X.chunk(dp)[grid.dp_rank], y.chunk(dp)[grid.dp_rank]   # (B/dp, T) each
    loss = stage.train_step(X, y, loss_fn)    # each microbatch's loss scaled by its share
    if dp > 1:
        average_gradients(stage.layers.parameters(), grid.dp_group)
    optimizer.step()
    optimizer.zero_grad()
    return loss


def global_loss(loss: float | None, grid: "Grid") -> float:
    """The global batch's loss on every rank: the last stage's replica losses averaged over
    its dp column (equal slices), then broadcast down each pp line."""
    c = grid.config
    total = torch.tensor([loss if loss is not None else 0.0], device=device())
    if grid.pp_rank == c.pp - 1 and c.dp > 1:
        comm.all_reduce(total, group=grid.dp_group)
        total /= c.dp
    if c.pp > 1:
        last = c.rank(grid.dp_rank, grid.tp_rank, c.pp - 1)
        comm.broadcast(total, src=grid.global_rank(last), group=grid.pp_group)
    return total.item()


class MeshTable(NamedTuple):
    """:func:`mesh_table`'s answer: one row per rank, and every group of each axis."""
    rows: list
    """``{"rank", "dp", "tp", "pp", "tp_group", "dp_group", "pp_group"}`` per rank."""
    groups: dict
    """``{"tp": [...], "dp": [...], "pp": [...]}``: the ranks of every group."""


def mesh_table(config: ThreeDConfig) -> MeshTable:
    """Where every rank sits and which groups it joins, for drawing the mesh.

    Example: ``mesh_table(ThreeDConfig(dp=2, tp=2, pp=2)).rows[5]`` is rank 5 at dp 0,
    tp 1, pp 1, in tp row [4, 5], dp column [5, 7] and pp line [1, 5].
    """
    if not isinstance(config, ThreeDConfig):
        raise TypeError(f"config must be a ThreeDConfig, got {type(config).__name__}")
    groups, rows = config.groups(), []
    for rank in range(config.world_size):
        d, t, s = config.coordinates(rank)
        mine = {f"{axis}_group": next(g for g in groups[axis] if rank in g) for axis in AXES}
        rows.append(dict(rank=rank, dp=d, tp=t, pp=s, **mine))
    return MeshTable(rows, groups)


@dataclass
class Grid:
    """This rank's place in the 3-D grid and its three process groups."""
    config: ThreeDConfig
    dp_rank: int
    tp_rank: int
    pp_rank: int
    tp_group: object
    dp_group: object
    pp_group: object
    parent: object = None
    """The group the grid was built in (None: the world)."""

    def global_rank(self, rank: int) -> int:
        """The world rank of the parent group's ``rank``."""
        return rank if self.parent is None else dist.get_global_rank(self.parent, rank)


def build_grid(config: ThreeDConfig, group=None) -> Grid:
    """Make every tp row, then every dp column, then every pp line over the ranks of
    ``group``, in the same order on every rank, and keep this rank's three.

    Only a group's members take part in making it (``use_local_synchronization``); torch
    names such a group by its ranks and how many groups the process already has, so every
    rank, a member of exactly one group per axis, sees the same count for each of its own.
    """
    size = dist.get_world_size(group)
    if size != config.world_size:
        raise ValueError(f"the grid needs dp*tp*pp={config.world_size} ranks, the group has "
                         f"{size}")
    rank = dist.get_rank(group)
    grid = Grid(config, *config.coordinates(rank), None, None, None, parent=group)
    for axis in AXES:
        for ranks in config.groups()[axis]:
            made = dist.new_group([grid.global_rank(r) for r in ranks],
                                  use_local_synchronization=True)
            if rank in ranks:
                setattr(grid, f"{axis}_group", made)
    return grid


def stage_layers(workload: Workload, grid: Grid) -> nn.Sequential:
    """This rank's stage: its blocks (the embedding first, the head last), tensor-parallel
    over its tp row, named by their index in the unsplit model (so the state-dict keys
    match it)."""
    model = workload.build_model()             # embedding, depth blocks, head
    if grid.config.tp > 1:
        model = shard_transformer(model, grid.tp_group)
    c, s = grid.config, grid.pp_rank
    keep = [b + 1 for b in partition(workload.depth, c.pp)[s]]
    keep = [0] * (s == 0) + keep + [len(model) - 1] * (s == c.pp - 1)
    return nn.Sequential(OrderedDict((str(i), model[i]) for i in keep))
