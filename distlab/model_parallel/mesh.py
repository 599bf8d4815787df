"""2D parallelism: data parallel x tensor parallel on an explicit grid of process groups.

Narayanan et al. 2021 ("Efficient large-scale language model training on GPU clusters
using Megatron-LM", section 2.3 and 3.2) arrange ``dp * tp`` ranks in a grid:

* each *row* is a tensor-parallel group: its ``tp`` ranks share every weight matrix and
  all-reduce activations in every layer, forward and backward (much traffic, often: keep
  them close, on one node's fast links);
* each *column* is a data-parallel group: its ``dp`` ranks hold the same shard of the
  weights, see different data, and all-reduce their gradients once per step
  (:func:`distlab.data_parallel.ddp.average_gradients`).

``rank = dp_rank * tp + tp_rank``: tensor-parallel neighbours have consecutive ranks, as
Megatron places them on one node. :func:`describe` prints the grid before anything starts.

Cost per step (alpha-beta, ring all-reduce): tensor parallel, 2 all-reduces per block of
the activations (B/dp x d_model values) over ``tp`` ranks; data parallel, one all-reduce of
this rank's gradient shard (parameters/tp values) over ``dp`` ranks.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch.distributed as dist
from torch import nn

from distlab import comm
from distlab.checks import is_int, require
from distlab.data_parallel.ddp import average_gradients
from distlab.launcher import device
from distlab.metrics import report
from distlab.model_parallel.tensor_parallel import (TensorParallelConfig, shard_mlp,
                                                    shard_transformer)
from distlab.problems.workloads import Workload, train_reference


@dataclass(frozen=True)
class MeshConfig:
    """The grid, ``dp`` replicas each split over ``tp`` ranks, and what it trains."""
    workload: Workload = field(default_factory=Workload)
    """What is trained: its model split ``tp`` ways, its batches ``dp`` ways."""
    dp: int = 1
    """Data-parallel degree: model replicas, each fed its own slice of every batch."""
    tp: int = 1
    """Tensor-parallel degree: ranks that share each weight matrix."""

    def __post_init__(self):
        require(self, "workload", isinstance(self.workload, Workload),
                "a distlab.problems.workloads.Workload")
        for name in ("dp", "tp"):
            v = getattr(self, name)
            require(self, name, is_int(v) and 1 <= v <= 64, "an int in 1..64")
        require(self, "tp", self.dp * self.tp <= 64, f"at most {64 // self.dp} with "
                f"dp={self.dp}: dp*tp ranks, at most 64")
        w = self.workload
        require(self, "workload", w.model != "linear" or self.tp == 1,
                f"model 'mlp' or 'transformer' with tp={self.tp} ('linear' has one output: "
                "nothing to split; use tp=1)")
        if w.model == "mlp":
            TensorParallelConfig(self.tp, w.hidden)
        else:   # d_model, 4 d_model and the heads are all split
            TensorParallelConfig(self.tp, w.hidden, w.num_heads)
        require(self, "dp", w.batch_size % self.dp == 0,
                f"a divisor of batch_size={w.batch_size}: every replica gets an equal "
                "slice of each batch")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp

    def grid(self) -> list[list[int]]:
        """``grid[dp_rank][tp_rank]`` is the rank: rows are tensor-parallel groups."""
        return [[d * self.tp + t for t in range(self.tp)] for d in range(self.dp)]

    def tp_groups(self) -> list[list[int]]:
        return self.grid()

    def dp_groups(self) -> list[list[int]]:
        return [list(col) for col in zip(*self.grid())]


def train(config: MeshConfig, group=None) -> dict:
    """Worker: DP x TP training of ``config.workload`` on the ``dp * tp`` ranks of
    ``group`` (default: the world).

    Returns this rank's ``losses`` (global-batch loss per step, as a single process would
    compute it), its place in the grid, and its communication ``by_op``.
    """
    mesh = build_mesh(config, group)
    workload, dev = config.workload, device()     # the CPU on gloo, this rank's GPU on NCCL
    model = parallel_model(workload, mesh).to(dev)
    optimizer = workload.optimizer(model.parameters())
    comm.ledger().reset()        # count the training only, not building the groups
    losses = []
    for step, (X, y) in enumerate(workload.batches()):
        losses.append(train_step(model, optimizer, X.to(dev), y.to(dev), workload.loss, mesh))
        report(step=step, loss=losses[-1], **comm.ledger().totals())
    return {"rank": dist.get_rank(), "dp_rank": mesh.dp_rank, "tp_rank": mesh.tp_rank,
            "losses": losses, "by_op": comm.ledger().by_op(), **comm.ledger().totals()}


def reference(config: MeshConfig) -> list[float]:
    """The unsplit model trained in one process: the losses every rank must report."""
    return train_reference(config.workload)


def start(config: MeshConfig, **launch_kwargs):
    """:func:`distlab.start` :func:`train` on ``dp * tp`` ranks, the data loaded once here;
    ``launch_kwargs`` go to the launcher (``timeout``, ``on_metrics``, ``on_output``, ...)."""
    from distlab.launcher import start as _start
    config = replace(config, workload=config.workload.loaded())
    return _start(train, config.world_size, config, **launch_kwargs)


def run(config: MeshConfig, **launch_kwargs) -> list[dict]:
    """Like :func:`start`, but wait and return every rank's result."""
    return start(config, **launch_kwargs).result()


def sweep(configs: list[MeshConfig], group=None) -> list[dict]:
    """Worker: :func:`train` for every config in one launch (all of one world size)."""
    return [train(c, group) for c in configs]


def train_step(model: nn.Module, optimizer, X, y, loss_fn, mesh: "Mesh") -> float:
    """One step on the grid: this replica's slice of the global batch ``(X, y)``, forward
    and backward through the tensor-parallel model, gradients averaged over the
    data-parallel group, the optimizer's step. Returns the global batch's loss."""
    dp = mesh.config.dp
    if len(X) % dp:
        raise ValueError(f"a batch of {len(X)} examples does not split into dp={dp} equal "
                         f"slices; use a batch size divisible by {dp}")
    if dp > 1 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError("BatchNorm normalizes over each replica's slice, not the global "
                         "batch, so dp > 1 would not equal one process; use dp=1, or a "
                         "per-example norm (LayerNorm, GroupNorm)")
    X, y = X.chunk(dp)[mesh.dp_rank], y.chunk(dp)[mesh.dp_rank]
    loss = loss_fn(model(X), y)
    loss.backward()
    if dp > 1:
        average_gradients(model.parameters(), mesh.dp_group)
    optimizer.step()
    optimizer.zero_grad()
    total = loss.detach().clone()    # the global loss: the mean of the replicas' (equal slices)
    if dp > 1:
        comm.all_reduce(total, group=mesh.dp_group)
    return total.item() / dp


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
    dp_rank: int
    tp_rank: int
    dp_group: object
    tp_group: object


def build_mesh(config: MeshConfig, group=None) -> Mesh:
    """Create this rank's row and column groups over the ranks of ``group``.

    Each rank joins only its own two groups (``use_local_synchronization``: only a group's
    members take part in making it), its row first, then its column.
    """
    size = dist.get_world_size(group)
    if size != config.world_size:
        raise ValueError(f"the mesh needs dp*tp={config.world_size} ranks, the group has "
                         f"{size}")
    rank = dist.get_rank(group)
    dp_rank, tp_rank = divmod(rank, config.tp)
    to_global = lambda ranks: [dist.get_global_rank(group, r) if group is not None else r
                               for r in ranks]
    tp_group = dist.new_group(to_global(config.tp_groups()[dp_rank]),
                              use_local_synchronization=True)
    dp_group = dist.new_group(to_global(config.dp_groups()[tp_rank]),
                              use_local_synchronization=True)
    return Mesh(config, dp_rank, tp_rank, dp_group, tp_group)


def parallel_model(workload: Workload, mesh: Mesh) -> nn.Module:
    """The workload's model, split over this rank's tensor-parallel group."""
    model = workload.build_model()
    if mesh.config.tp == 1:
        return model
    shard = shard_mlp if workload.model == "mlp" else shard_transformer
    return shard(model, mesh.tp_group)
