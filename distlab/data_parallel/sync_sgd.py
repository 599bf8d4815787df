"""Synchronous data-parallel SGD on N real processes: the training loop the labs share.

What is trained is the config's :class:`~distlab.problems.workloads.Workload` (``"linear"``:
least squares; ``"mlp"``: the digits). **How the global batch is split:** each step's global
batch has ``workload.batch_size`` examples and every one of the ``p`` ranks takes
``B = workload.batch_size / p`` of them (``p`` must divide it) from its own disjoint shard of
the data (:func:`batch_indices`, as ``DistributedSampler`` with ``drop_last``). Each rank
computes the gradient of its ``B`` examples' **mean** loss, averages the gradients with a
wrapper of :mod:`distlab.data_parallel.ddp`, and takes the same SGD step. With equal shares
the averaged gradient is exactly the gradient of the mean loss over the global batch of
``p·B`` examples, so the run equals single-process SGD on that global batch
(:func:`reference`), to float32 rounding::

    (1/p) sum_r (1/B) sum_{i in S_r} grad l_i  =  (1/(pB)) sum_{i in S_1 u ... u S_p} grad l_i

Summing instead of averaging, or using a sum loss, multiplies the step by ``p``: the linear
regression then diverges as ranks are added.

Large batches: weak scaling keeps ``B`` per rank and multiplies the global batch by ``p``.
The linear scaling rule (``lr_scaling``) multiplies the learning rate by ``p`` too; a
gradual warmup over ``warmup_steps`` (0: none) climbs to it from the rate tuned for one
rank's ``B`` (Goyal et al. 2017, sections 2.1 and 2.2); see :func:`lr_at`.

The optimizer is the workload's (:meth:`~distlab.problems.workloads.Workload.optimizer`:
``optimizer_name`` "sgd" with ``momentum``, "adam" or "adamw", and ``weight_decay``), the
same on every rank and in :func:`reference`; ``SyncSGDConfig.momentum``, when given, is
the SGD momentum of the run in place of the workload's (:func:`run_workload`).

Communication per step: one all-reduce of the n gradient bytes, 2(p-1)/p·n·beta plus
latency terms that depend on the variant (see :mod:`distlab.data_parallel.ddp`).

The verbs of every algorithm in distlab: :func:`train` runs on each rank, :func:`reference`
is the single-process run it must equal, :func:`start` launches it and returns a
:class:`~distlab.Run`, :func:`run` waits for the result.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torch import nn

from distlab import comm
from distlab import launcher
from distlab.checks import is_int, is_number, require, require_arg
from distlab.data_parallel import ddp as dp
from distlab.launcher import MAX_WORLD_SIZE, Run, device
from distlab.metrics import report
from distlab.problems import data
from distlab.problems.workloads import Workload

MODELS = ("linear", "mlp")
"""The workloads this loop trains: rows of a data set with a held-out split."""


@dataclass(frozen=True)
class SyncSGDConfig:
    """Synchronous data-parallel SGD: what to train, on how many ranks, and how."""

    workload: Workload = field(default_factory=lambda: Workload(
        model="linear", batch_size=64, lr=0.1, num_steps=100))
    """What is trained (``model`` "linear" or "mlp"), ``lr`` (the rate of one rank's share,
    scaled by ``world_size`` when ``lr_scaling``), ``num_steps``, ``seed``, and the global
    ``batch_size``, split equally over the ranks."""
    world_size: int = 2
    """Number of ranks (processes); it divides ``workload.batch_size``."""
    variant: str = "bucketed"
    """Gradient synchronization: a key of :data:`distlab.data_parallel.ddp.VARIANTS`."""
    bucket_size_mb: float = 25.0
    """Bucket size of the ``"bucketed"`` variant, in MiB."""
    lr_scaling: bool = False
    """Linear scaling rule (Goyal et al. 2017, section 2.1): the rate ``world_size * lr``."""
    warmup_steps: int = 10
    """Gradual warmup (section 2.2), a knob of its own: with ``lr_scaling``, the rate climbs
    from ``lr`` to ``world_size * lr`` over this many steps; 0 turns the warmup off (the
    scaled rate from the first step)."""
    momentum: float | None = None
    """SGD momentum (Sutskever et al. 2013) in [0, 1), in place of ``workload.momentum``;
    None: the workload's own. Only SGD has one: with "adam" or "adamw" it must be None or 0."""
    eval_every: int = 10
    """Steps between held-out evaluations (rank 0 reports ``val_loss`` and ``accuracy``)."""
    timeline_steps: int = 0
    """Record compute and communication intervals of steps 1..timeline_steps (0: none)."""

    def __post_init__(self):
        require(self, "workload", isinstance(self.workload, Workload)
                and self.workload.model in MODELS,
                f"a distlab.problems.workloads.Workload with model in {MODELS}")
        require(self, "world_size",
                is_int(self.world_size) and 1 <= self.world_size <= MAX_WORLD_SIZE,
                f"an int in 1..{MAX_WORLD_SIZE}")
        w, p = self.workload, self.world_size
        require(self, "world_size", w.batch_size % p == 0,
                f"a divisor of workload.batch_size={w.batch_size} (each rank takes "
                "batch_size / world_size examples of every step's global batch)")
        shard = len(w.loaded().dataset.y) // p
        require(self, "workload", w.batch_size // p <= shard,
                f"a batch_size of at most {p * shard} (each rank's shard of "
                f"{w.model!r} has {shard} examples on {p} ranks)")
        require(self, "variant", self.variant in dp.VARIANTS, f"one of {list(dp.VARIANTS)}")
        require(self, "bucket_size_mb", is_number(self.bucket_size_mb) and self.bucket_size_mb > 0,
                "a number > 0 (MiB)")
        require(self, "lr_scaling", isinstance(self.lr_scaling, bool), "True or False")
        require(self, "warmup_steps", is_int(self.warmup_steps) and self.warmup_steps >= 0,
                "an int >= 0")
        m = self.momentum
        require(self, "momentum", m is None or (is_number(m) and 0 <= m < 1
                                                and (m == 0 or w.optimizer_name == "sgd")),
                f"None or a number in [0, 1) (not 0 only with optimizer_name 'sgd'; the "
                f"workload's is {w.optimizer_name!r})")
        require(self, "eval_every", is_int(self.eval_every) and self.eval_every >= 1,
                "an int >= 1")
        steps = w.num_steps
        require(self, "timeline_steps",
                is_int(self.timeline_steps) and 0 <= self.timeline_steps < steps,
                f"an int in 0..{steps - 1} (below workload.num_steps)")


def train(config: SyncSGDConfig, group=None) -> dict:
    """Synchronous data-parallel SGD on this rank; call it on every rank of ``group``.

    This rank trains on its ``workload.batch_size / world_size`` examples of every step's
    global batch. Reports, each step, ``loss`` (this rank's share: the mean over ranks is
    the global batch's loss), ``lr``, and cumulative ``bytes_sent``, ``comm_time`` and
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
    workload = run_workload(config).loaded()
    dev = device()   # this rank's GPU under NCCL (torchrun on a GPU node), else the CPU
    ds = _on(workload.dataset, dev)
    comm.ledger().reset()
    model = dp.wrap(workload.build_model().to(dev), config.variant, group=group,
                    bucket_size_mb=config.bucket_size_mb)
    opt = workload.optimizer(model.parameters())
    compute_time, losses, timeline = 0.0, [], []
    t_start = time.time()
    for step in range(workload.num_steps):
        lr = _set_lr(opt, config, step)
        recording = 1 <= step <= config.timeline_steps
        model.events = [] if recording else None
        idx = batch_indices(config, rank, step, len(ds.y)).to(dev)

        t0 = time.time()
        opt.zero_grad()
        loss = workload.loss(model(ds.X[idx]), ds.y[idx])   # the mean over this rank's share
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
        if rank == 0 and (step % config.eval_every == 0 or step == workload.num_steps - 1):
            values.update(evaluate(model.module, workload, ds))   # no collective: rank 0 alone
        report(step=step, **values)
    return {"params": nn.utils.parameters_to_vector(model.module.parameters()).detach().cpu(),
            "losses": losses, "timeline": timeline, "wall_time": time.time() - t_start,
            "final": values}


def reference(config: SyncSGDConfig) -> dict:
    """Single-process SGD on the global batch: what :func:`train` must equal.

    The batch of each step is the union of every rank's share, the loss its mean, and the
    learning rate schedule the same; no process group is needed.

    Returns:
        ``{"params"}`` the final parameters as one vector, ``"losses"`` the global batch's
        loss at each step, and ``"final"`` the held-out values after the last step.
    """
    workload = run_workload(config).loaded()
    ds, model = workload.dataset, workload.build_model()
    opt = workload.optimizer(model.parameters())
    losses = []
    for step in range(workload.num_steps):
        _set_lr(opt, config, step)
        idx = torch.cat([batch_indices(config, r, step, len(ds.y))
                         for r in range(config.world_size)])   # (workload.batch_size,)
        opt.zero_grad()
        loss = workload.loss(model(ds.X[idx]), ds.y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"params": nn.utils.parameters_to_vector(model.parameters()).detach(),
            "losses": losses, "final": evaluate(model, workload, ds)}


def start(config: SyncSGDConfig, **launch) -> Run:
    """Start :func:`train` on ``config.world_size`` processes; return the :class:`Run` at once.

    The workload's data is loaded here, once, and travels to every rank with the config.
    ``launch`` goes to :func:`distlab.start` (``timeout``, ``on_metrics``, ``on_output``,
    ...). ``.result()`` gives the per-rank results of :func:`train`.
    """
    if not isinstance(config, SyncSGDConfig):
        raise TypeError(f"config must be a SyncSGDConfig, got {type(config).__name__}")
    config = replace(config, workload=config.workload.loaded())
    return launcher.start(train, config.world_size, config, **launch)


def run(config: SyncSGDConfig, **launch) -> list[dict]:
    """:func:`start` and wait: the per-rank results of :func:`train`, in rank order."""
    return start(config, **launch).result()


def run_workload(config: SyncSGDConfig) -> Workload:
    """The workload this run trains and steps the optimizer of: ``config.workload``, with
    ``config.momentum`` as its momentum when that is given (not None)."""
    if config.momentum is None:
        return config.workload
    return replace(config.workload, momentum=config.momentum)


def lr_at(config: SyncSGDConfig, step: int) -> float:
    """The learning rate of ``step``.

    Without ``lr_scaling``: ``workload.lr``. With it, the linear scaling rule (Goyal et al.
    2017, section 2.1: "when the minibatch size is multiplied by k, multiply the learning
    rate by k", here k = ``world_size``: the global batch is ``world_size`` times one rank's
    share, for which ``lr`` was tuned), reached by gradual warmup (section 2.2): from ``lr``
    at step 0, up by a constant amount each step, to ``k * lr`` at ``warmup_steps``; with
    ``warmup_steps=0``, ``k * lr`` from step 0.
    """
    require_arg("step", step, is_int(step) and step >= 0, "an int >= 0")
    lr = config.workload.lr
    if not config.lr_scaling:
        return lr
    k = config.world_size
    if step < config.warmup_steps:
        return lr * (1 + (k - 1) * step / config.warmup_steps)
    return lr * k


def batch_indices(config: SyncSGDConfig, rank: int, step: int, n: int) -> torch.Tensor:
    """Row indices of ``rank``'s share of the global batch of ``step``, out of ``n`` examples.

    Each epoch, ranks get equal disjoint shards (``drop_last``, so the global batch is
    always ``workload.batch_size``), reshuffled from ``workload.seed + epoch``; a rank walks
    its shard in slices of ``workload.batch_size / world_size``, dropping the last partial one.
    """
    require_arg("rank", rank, is_int(rank) and 0 <= rank < config.world_size,
                f"an int in 0..{config.world_size - 1}")
    require_arg("step", step, is_int(step) and step >= 0, "an int >= 0")
    batch = config.workload.batch_size
    share = batch // config.world_size
    require_arg("n", n, is_int(n) and n >= batch,
                f"an int >= {batch} (one share of {share} for each rank)")
    per_epoch = (n // config.world_size) // share
    epoch, i = divmod(step, per_epoch)
    shard = data.shard_indices(n, rank, config.world_size, epoch=epoch,
                               seed=config.workload.seed, drop_last=True)
    return shard[i * share: (i + 1) * share]


@torch.no_grad()
def evaluate(model: nn.Module, workload: Workload, ds: data.Dataset) -> dict:
    """``{"val_loss"}`` on the held-out split ``ds.X_val, ds.y_val``, plus ``"accuracy"`` for
    classification."""
    out = model(ds.X_val)
    values = {"val_loss": workload.loss(out, ds.y_val).item()}
    if ds.num_classes:
        values["accuracy"] = (out.argmax(1) == ds.y_val).float().mean().item()
    return values


def _on(ds: data.Dataset, dev: torch.device) -> data.Dataset:
    """The data set on this rank's device (the same object on the CPU)."""
    if dev.type == "cpu":
        return ds
    return data.Dataset(ds.X.to(dev), ds.y.to(dev), ds.X_val.to(dev), ds.y_val.to(dev),
                        ds.num_classes)


def _set_lr(opt: torch.optim.Optimizer, config: SyncSGDConfig, step: int) -> float:
    lr = lr_at(config, step)
    for g in opt.param_groups:
        g["lr"] = lr
    return lr
