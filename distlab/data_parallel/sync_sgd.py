"""Synchronous data-parallel SGD on N real processes: the training loop the labs share.

Each step, every rank takes its own ``batch_size`` examples (a disjoint shard, drawn by
:func:`distlab.problems.data.shard_indices`), computes the gradient of its shard's **mean** loss,
averages the gradients with a wrapper of :mod:`distlab.data_parallel.ddp`, and takes the same
SGD step. With equal shard sizes the averaged gradient is exactly the gradient of the mean
loss over the global batch of ``world_size * batch_size`` examples, so the run equals
single-process SGD on that global batch (:func:`reference`), to float32 rounding::

    (1/p) sum_r (1/B) sum_{i in S_r} grad l_i  =  (1/(pB)) sum_{i in S_1 u ... u S_p} grad l_i

Summing instead of averaging, or using a sum loss, multiplies the step by ``p``: the linear
regression then diverges as ranks are added.

Large batches: with a fixed per-rank batch, adding ranks multiplies the global batch by
``p``. The linear scaling rule multiplies the learning rate by ``p`` too, after a gradual
warmup from the single-rank rate (Goyal et al. 2017, sections 2.1 and 2.2); see
:func:`lr_at`.

Communication per step: one all-reduce of the n gradient bytes, 2(p-1)/p·n·beta plus
latency terms that depend on the variant (see :mod:`distlab.data_parallel.ddp`).

The verbs of every algorithm in distlab: :func:`train` runs on each rank, :func:`reference`
is the single-process run it must equal, :func:`start` launches it and returns a
:class:`~distlab.Run`, :func:`run` waits for the result. Other labs reuse
:class:`SyncSGDConfig`, :func:`build_task` and :func:`batch_indices`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distlab import comm
from distlab.problems import data, models
from distlab.data_parallel import ddp as dp
from distlab.checks import is_int, is_number, require, require_arg
from distlab import launcher
from distlab.launcher import MAX_WORLD_SIZE, Run, device
from distlab.metrics import report

TRAIN_SIZES = {"linear": 1024, "digits": 1438}
"""Training examples of each task (the held-out split excluded)."""


@dataclass(frozen=True)
class SyncSGDConfig:
    """Synchronous data-parallel SGD: what to train, on how many ranks, and how."""

    task: str = "linear"
    """``"linear"``: least squares with ``nn.Linear``; ``"digits"``: an MLP on 8x8 digits."""
    world_size: int = 2
    """Number of ranks (processes)."""
    lr: float = 0.1
    """Learning rate of one rank's batch (scaled by ``world_size`` when ``lr_scaling``)."""
    batch_size: int = 32
    """Examples per rank per step; the global batch is ``world_size * batch_size``."""
    num_steps: int = 100
    """Optimizer steps."""
    variant: str = "bucketed"
    """Gradient synchronization: a key of :data:`distlab.data_parallel.ddp.VARIANTS`."""
    bucket_size_mb: float = 25.0
    """Bucket size of the ``"bucketed"`` variant, in MiB."""
    lr_scaling: bool = False
    """Linear scaling rule with gradual warmup (Goyal et al. 2017)."""
    warmup_steps: int = 10
    """Steps of the warmup from ``lr`` to ``world_size * lr`` (only with ``lr_scaling``)."""
    momentum: float = 0.0
    """SGD momentum."""
    seed: int = 0
    """Seeds the model's initial weights and the shards' shuffling."""
    eval_every: int = 10
    """Steps between held-out evaluations (rank 0 reports ``val_loss`` and ``accuracy``)."""
    timeline_steps: int = 0
    """Record compute and communication intervals of steps 1..timeline_steps (0: none)."""

    def __post_init__(self):
        require(self, "task", self.task in TRAIN_SIZES, f"one of {sorted(TRAIN_SIZES)}")
        require(self, "world_size",
                is_int(self.world_size) and 1 <= self.world_size <= MAX_WORLD_SIZE,
                f"an int in 1..{MAX_WORLD_SIZE}")
        require(self, "lr", is_number(self.lr) and self.lr > 0, "a finite number > 0")
        most = TRAIN_SIZES[self.task] // self.world_size
        require(self, "batch_size", is_int(self.batch_size) and 1 <= self.batch_size <= most,
                f"an int in 1..{most} (each rank's shard of {self.task!r} has {most} examples "
                f"on {self.world_size} ranks)")
        require(self, "num_steps", is_int(self.num_steps) and self.num_steps >= 1, "an int >= 1")
        require(self, "variant", self.variant in dp.VARIANTS, f"one of {list(dp.VARIANTS)}")
        require(self, "bucket_size_mb", is_number(self.bucket_size_mb) and self.bucket_size_mb > 0,
                "a number > 0 (MiB)")
        require(self, "lr_scaling", isinstance(self.lr_scaling, bool), "True or False")
        require(self, "warmup_steps", is_int(self.warmup_steps) and self.warmup_steps >= 0,
                "an int >= 0")
        require(self, "momentum", is_number(self.momentum) and 0 <= self.momentum < 1,
                "a number in [0, 1)")
        require(self, "seed", is_int(self.seed), "an int")
        require(self, "eval_every", is_int(self.eval_every) and self.eval_every >= 1,
                "an int >= 1")
        require(self, "timeline_steps",
                is_int(self.timeline_steps) and 0 <= self.timeline_steps < self.num_steps,
                f"an int in 0..{self.num_steps - 1} (below num_steps)")


def train(config: SyncSGDConfig, group=None) -> dict:
    """Synchronous data-parallel SGD on this rank; call it on every rank of ``group``.

    Reports, each step, ``loss`` (this rank's batch: the mean over ranks is the global
    batch's loss), ``lr``, and cumulative ``bytes_sent``, ``comm_time`` and
    ``compute_time``; rank 0 also reports ``val_loss`` (and ``accuracy``) every
    ``eval_every`` steps and at the last step.

    Args:
        config: the run; ``config.world_size`` must be the size of ``group``.
        group: the process group (None: the world).

    Returns:
        ``{"params"}`` the final parameters as one vector, ``"losses"`` this rank's batch
        losses, ``"timeline"`` the recorded intervals (dicts with ``rank, step, kind, start,
        end``; times from ``time.time()``), ``"wall_time"`` seconds spent in the loop, and
        ``"final"`` the last step's reported values.
    """
    p, rank = dist.get_world_size(group), dist.get_rank(group)
    if p != config.world_size:
        raise ValueError(f"config.world_size={config.world_size} but the group has {p} ranks")
    me = dist.get_rank()   # the rank that reports, in the world's numbering
    task = build_task(config.task, config.seed)
    dev = device()   # this rank's GPU under NCCL (torchrun on a GPU node), else the CPU
    if dev.type != "cpu":
        ds = task.dataset
        task = Task(task.model.to(dev), data.Dataset(ds.X.to(dev), ds.y.to(dev),
                    ds.X_val.to(dev), ds.y_val.to(dev), ds.num_classes), task.loss_fn)
    comm.ledger().reset()
    model = dp.wrap(task.model, config.variant, group=group,
                    bucket_size_mb=config.bucket_size_mb)
    opt = _optimizer(config, model.parameters())
    X, y = task.dataset.X, task.dataset.y
    compute_time, losses, timeline = 0.0, [], []
    t_start = time.time()
    for step in range(config.num_steps):
        lr = _set_lr(opt, config, step)
        recording = 1 <= step <= config.timeline_steps
        model.events = [] if recording else None
        idx = batch_indices(config, rank, step, len(y))

        t0 = time.time()
        opt.zero_grad()
        loss = task.loss_fn(model(X[idx]), y[idx])   # the mean over this rank's batch
        t1 = time.time()
        loss.backward()            # overlapping variants start all-reducing in here
        t2 = time.time()
        model.finish_gradient_synchronization()      # what is left of communication
        t3 = time.time()
        opt.step()
        t4 = time.time()
        compute_time += (t2 - t0) + (t4 - t3)

        if recording:
            for kind, a, b in (("forward", t0, t1), ("backward", t1, t2),
                               ("wait for gradients", t2, t3), ("optimizer", t3, t4)):
                timeline.append({"rank": me, "step": step, "kind": kind, "start": a, "end": b})
            timeline += [{"rank": me, "step": step, **e} for e in model.events]
        losses.append(loss.item())
        totals = comm.ledger().totals()
        values = {"loss": losses[-1], "lr": lr, "bytes_sent": totals["bytes_sent"],
                  "comm_time": totals["comm_time"], "compute_time": compute_time}
        if rank == 0 and (step % config.eval_every == 0 or step == config.num_steps - 1):
            values.update(evaluate(model, task))
        report(step=step, **values)
    return {"params": nn.utils.parameters_to_vector(task.model.parameters()).detach().cpu(),
            "losses": losses, "timeline": timeline, "wall_time": time.time() - t_start,
            "final": values}


def reference(config: SyncSGDConfig) -> dict:
    """Single-process SGD on the global batch: what :func:`train` must equal.

    The batch of each step is the union of every rank's batch, the loss its mean, and the
    learning rate schedule the same; no process group is needed.

    Returns:
        ``{"params"}`` the final parameters as one vector, ``"losses"`` the global batch's
        loss at each step, and ``"final"`` the held-out values after the last step.
    """
    task = build_task(config.task, config.seed)
    model = task.model
    opt = _optimizer(config, model.parameters())
    X, y = task.dataset.X, task.dataset.y
    losses = []
    for step in range(config.num_steps):
        _set_lr(opt, config, step)
        idx = torch.cat([batch_indices(config, r, step, len(y))
                         for r in range(config.world_size)])   # (world_size * batch_size,)
        opt.zero_grad()
        loss = task.loss_fn(model(X[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"params": nn.utils.parameters_to_vector(model.parameters()).detach(),
            "losses": losses, "final": evaluate(model, task)}


def start(config: SyncSGDConfig, **launch) -> Run:
    """Start :func:`train` on ``config.world_size`` processes; return the :class:`Run` at once.

    ``launch`` goes to :func:`distlab.start` (``timeout``, ``on_metrics``, ``on_output``,
    ...). ``.result()`` gives the per-rank results of :func:`train`.
    """
    if not isinstance(config, SyncSGDConfig):
        raise TypeError(f"config must be a SyncSGDConfig, got {type(config).__name__}")
    return launcher.start(train, config.world_size, config, **launch)


def run(config: SyncSGDConfig, **launch) -> list[dict]:
    """:func:`start` and wait: the per-rank results of :func:`train`, in rank order."""
    return start(config, **launch).result()



@dataclass
class Task:
    """What to train: a freshly initialized model, its data and its loss."""
    model: nn.Module
    dataset: data.Dataset
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """Mean loss over a batch: ``loss_fn(model(X), y)``."""


def load_dataset(task: str) -> data.Dataset:
    """The data of ``task`` (the same on every rank; it does not depend on any seed)."""
    if task == "linear":
        return data.linear_regression()
    if task == "digits":
        return data.digits()
    raise ValueError(f"task={task!r} is not known; use one of {sorted(TRAIN_SIZES)}")


def build_task(task: str, seed: int = 0, dataset: data.Dataset | None = None) -> Task:
    """The model (initialized from ``seed``), dataset and mean loss of ``task``.

    Every rank builds the same thing. Pass ``dataset`` (from :func:`load_dataset`) when the
    caller has it already.
    """
    require_arg("seed", seed, is_int(seed), "an int")
    ds = dataset if dataset is not None else load_dataset(task)
    if task == "linear":
        return Task(models.linear(ds.num_features, seed=seed), ds, F.mse_loss)
    return Task(models.mlp(ds.num_features, hidden=64, num_classes=ds.num_classes, depth=2,
                           seed=seed), ds, F.cross_entropy)


def lr_at(config: SyncSGDConfig, step: int) -> float:
    """The learning rate of ``step``.

    Without ``lr_scaling``: ``lr``. With it, the linear scaling rule (Goyal et al. 2017,
    section 2.1: "when the minibatch size is multiplied by k, multiply the learning rate by
    k", here k = ``world_size``), reached by gradual warmup (section 2.2): from ``lr`` at
    step 0, up by a constant amount each step, to ``k * lr`` at ``warmup_steps``.
    """
    require_arg("step", step, is_int(step) and step >= 0, "an int >= 0")
    if not config.lr_scaling:
        return config.lr
    k = config.world_size
    if step < config.warmup_steps:
        return config.lr * (1 + (k - 1) * step / config.warmup_steps)
    return config.lr * k


def batch_indices(config: SyncSGDConfig, rank: int, step: int, n: int) -> torch.Tensor:
    """Row indices of ``rank``'s batch at ``step``, out of ``n`` training examples.

    Each epoch, ranks get equal disjoint shards (``drop_last``, so the global batch is
    always ``world_size * batch_size``), reshuffled from ``seed + epoch``; a rank walks its
    shard in batches, dropping the last partial one.
    """
    require_arg("rank", rank, is_int(rank) and 0 <= rank < config.world_size,
                 f"an int in 0..{config.world_size - 1}")
    require_arg("step", step, is_int(step) and step >= 0, "an int >= 0")
    least = config.world_size * config.batch_size
    require_arg("n", n, is_int(n) and n >= least,
                 f"an int >= {least} (one batch of {config.batch_size} for each rank)")
    per_epoch = (n // config.world_size) // config.batch_size
    epoch, i = divmod(step, per_epoch)
    shard = data.shard_indices(n, rank, config.world_size, epoch=epoch, seed=config.seed,
                               drop_last=True)
    return shard[i * config.batch_size: (i + 1) * config.batch_size]


@torch.no_grad()
def evaluate(model: nn.Module, task: Task) -> dict:
    """``{"val_loss"}`` on the held-out split, plus ``"accuracy"`` for classification."""
    ds = task.dataset
    out = model(ds.X_val)
    values = {"val_loss": task.loss_fn(out, ds.y_val).item()}
    if ds.num_classes:
        values["accuracy"] = (out.argmax(1) == ds.y_val).float().mean().item()
    return values


def _optimizer(config: SyncSGDConfig, params) -> torch.optim.SGD:
    """SGD with momentum (Sutskever et al. 2013); :func:`_set_lr` sets each step's rate."""
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)


def _set_lr(opt: torch.optim.Optimizer, config: SyncSGDConfig, step: int) -> float:
    lr = lr_at(config, step)
    for g in opt.param_groups:
        g["lr"] = lr
    return lr
