"""2D parallelism: data parallel x tensor parallel on an explicit grid of process groups.

Narayanan et al. 2021 ("Efficient large-scale language model training on GPU clusters
using Megatron-LM", section 2.3 and 3.2) arrange ``dp * tp`` ranks in a grid:

* each *row* is a tensor-parallel group: its ``tp`` ranks share every weight matrix and
  all-reduce activations in every layer, forward and backward (much traffic, often: keep
  them close, on one node's fast links);
* each *column* is a data-parallel group: its ``dp`` ranks hold the same shard of the
  weights, see different data, and all-reduce their gradients once per step.

``rank = dp_rank * tp + tp_rank``: tensor-parallel neighbours have consecutive ranks, as
Megatron places them on one node. :func:`describe` prints the grid before anything starts.

Cost per step (alpha-beta, ring all-reduce): tensor parallel, 2 all-reduces per block of
the activations (B/dp x d_model floats) over ``tp`` ranks; data parallel, one all-reduce of
this rank's gradient shard (parameters/tp floats) over ``dp`` ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from distlab import comm
from distlab.checks import is_int, require
from distlab.launcher import device
from distlab.metrics import report
from distlab.model_parallel.tensor_parallel import TensorParallelConfig, shard_mlp, shard_transformer
from distlab.problems.workloads import Workload


@dataclass(frozen=True)
class MeshConfig:
    """The shape of the grid: ``dp`` replicas, each split over ``tp`` ranks."""
    dp: int = 1
    """Data-parallel degree: model replicas, each fed its own slice of every batch."""
    tp: int = 1
    """Tensor-parallel degree: ranks that share each weight matrix."""

    def __post_init__(self):
        for name in ("dp", "tp"):
            v = getattr(self, name)
            require(self, name, is_int(v) and 1 <= v <= 64, "an int in 1..64")
        if self.dp * self.tp > 64:
            raise ValueError(f"dp*tp={self.dp * self.tp} ranks; at most 64 are allowed")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp

    def grid(self) -> list[list[int]]:
        """``grid[dp_rank][tp_rank]`` is the global rank: rows are tensor-parallel groups."""
        return [[d * self.tp + t for t in range(self.tp)] for d in range(self.dp)]

    def tp_groups(self) -> list[list[int]]:
        return self.grid()

    def dp_groups(self) -> list[list[int]]:
        return [list(col) for col in zip(*self.grid())]


def describe(config: MeshConfig) -> str:
    """The grid as text: which ranks all-reduce activations, which all-reduce gradients."""
    lines = [f"dp={config.dp} x tp={config.tp} = {config.world_size} ranks", "",
             "          " + "".join(f"tp_rank={t:<3}" for t in range(config.tp))]
    for d, row in enumerate(config.grid()):
        lines.append(f"dp_rank={d:<2}" + "".join(f"rank {r:<6}" for r in row)
                     + "  <- tensor-parallel group " + str(row))
    lines += ["", "tensor-parallel groups (rows; all-reduce activations in every layer): "
              + ", ".join(map(str, config.tp_groups())),
              "data-parallel groups (columns; all-reduce gradients once a step):      "
              + ", ".join(map(str, config.dp_groups()))]
    return "\n".join(lines)


@dataclass
class Mesh:
    """This rank's place in the grid and its two process groups."""
    config: MeshConfig
    rank: int
    dp_rank: int
    tp_rank: int
    dp_group: object
    tp_group: object


def build_mesh(config: MeshConfig) -> Mesh:
    """Create the row and column groups (a collective: every rank calls it, same order).

    ``dist.new_group`` must be called by *every* rank for *every* group, even groups it is
    not in; so we create all rows, then all columns, and keep the two that hold this rank.
    """
    if dist.get_world_size() != config.world_size:
        raise ValueError(f"the mesh needs dp*tp={config.world_size} ranks, the world has "
                         f"{dist.get_world_size()}")
    rank = dist.get_rank()
    dp_rank, tp_rank = divmod(rank, config.tp)
    tp_group = dp_group = None
    for ranks in config.tp_groups():
        g = dist.new_group(ranks)
        tp_group = g if rank in ranks else tp_group
    for ranks in config.dp_groups():
        g = dist.new_group(ranks)
        dp_group = g if rank in ranks else dp_group
    return Mesh(config, rank, dp_rank, tp_rank, dp_group, tp_group)


def check(config: MeshConfig, workload: Workload) -> None:
    """Refuse, before launch, a grid that cannot split this workload evenly."""
    if workload.model == "mlp":
        TensorParallelConfig(config.tp, workload.hidden)
    else:   # d_model, 4 d_model and the heads are all split
        TensorParallelConfig(config.tp, workload.hidden, workload.num_heads)
    if workload.batch_size % config.dp:
        raise ValueError(f"batch_size={workload.batch_size} must be divisible by dp="
                         f"{config.dp}: every replica gets an equal slice of each batch")


def parallel_model(workload: Workload, mesh: Mesh) -> nn.Module:
    """The workload's model, split over this rank's tensor-parallel group."""
    model = workload.build_model()
    if mesh.config.tp == 1:
        return model
    shard = shard_mlp if workload.model == "mlp" else shard_transformer
    return shard(model, mesh.tp_group)


def all_reduce_gradients(model: nn.Module, group, size: int) -> None:
    """Average gradients over a data-parallel group: one flat all-reduce.

    The naive way is one all-reduce per parameter (latency alpha paid per tensor); one flat
    buffer pays it once. PyTorch DDP buckets instead, to overlap with the backward pass.
    """
    grads = [p.grad for p in model.parameters()]
    flat = torch.cat([g.reshape(-1) for g in grads])
    comm.all_reduce(flat, group=group)
    flat /= size
    for g, new in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(new.view_as(g))


def train(config: MeshConfig, workload: Workload) -> dict:
    """Worker: DP x TP training of ``workload`` (launch on ``config.world_size`` ranks).

    Returns this rank's ``losses`` (global-batch loss per step, as a single process would
    compute it), its place in the grid, and its communication ``by_op``.
    """
    mesh = build_mesh(config)
    dev = device()                    # the CPU on gloo, this rank's GPU on NCCL
    model = parallel_model(workload, mesh).to(dev)
    optimizer = workload.optimizer(model.parameters())
    comm.ledger().reset()        # count the training only, not building the groups
    losses = []
    for step, (X, y) in enumerate(workload.batches()):
        X, y = X.chunk(config.dp)[mesh.dp_rank], y.chunk(config.dp)[mesh.dp_rank]
        X, y = X.to(dev), y.to(dev)
        loss = workload.loss(model(X), y)
        loss.backward()
        if config.dp > 1:
            all_reduce_gradients(model, mesh.dp_group, config.dp)
        optimizer.step()
        optimizer.zero_grad()
        # The global loss is the mean of the replicas' losses (equal slices).
        total = loss.detach().clone()
        if config.dp > 1:
            comm.all_reduce(total, group=mesh.dp_group)
        losses.append(total.item() / config.dp)
        report(step=step, loss=losses[-1], **comm.ledger().totals())
    return {"rank": mesh.rank, "dp_rank": mesh.dp_rank, "tp_rank": mesh.tp_rank,
            "losses": losses, "by_op": comm.ledger().by_op(), **comm.ledger().totals()}


def sweep(configs: list[MeshConfig], workloads: list[Workload]) -> list[dict]:
    """Worker: :func:`train` for every config and workload in one launch (one world size).

    Returns the results in the order ``[(c, w) for c in configs for w in workloads]``.
    """
    return [train(c, w) for c in configs for w in workloads]


def start(config: MeshConfig, workload: Workload, **launch_kwargs):
    """Check the split, then :func:`distlab.start` :func:`train` on ``dp * tp`` ranks."""
    from distlab.launcher import start as _start
    check(config, workload)
    return _start(train, config.world_size, config, workload.loaded(), **launch_kwargs)


def run(config: MeshConfig, workload: Workload, **launch_kwargs) -> list[dict]:
    """Like :func:`start`, but wait and return every rank's result."""
    return start(config, workload, **launch_kwargs).result()
