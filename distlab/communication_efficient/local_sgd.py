"""Communicate less often: local SGD (periodic model averaging), compressed or not.

**Local SGD** (Stich 2019, "Local SGD converges fast and communicates little", algorithm 1):
every rank takes ``period`` = H SGD steps on its own shard, then the ranks average their
models::

    x_r <- x_r - lr * grad f_r(x_r)                  (H times, no communication)
    x   <- (1/p) sum_r x_r,   x_r <- x                (one all-reduce every H steps)

H = 1 is synchronous data-parallel SGD (averaging models after one step averages the
gradients); larger H divides the traffic by H, at the price of the local models drifting
apart in between ("divergence", reported as ``||x_r - x||^2`` just before each average).
Here the ranks average their *updates* ``x_r - x`` rather than the models, which is the
same thing uncompressed and lets the update be compressed with error feedback
(:mod:`distlab.communication_efficient.compression`; with H = 1 that is compressed SGD,
Karimireddy et al. 2019). With ``optimizer`` Adam, LAMB or 1-bit Adam
(:mod:`distlab.communication_efficient.optimizers`) the ranks instead average gradients at
every step (1-bit Adam does its own communication).

What is trained is the config's :class:`~distlab.problems.workloads.Workload` (an ``"mlp"``
on the digits: its model, data, loss, ``lr``, ``num_steps`` and ``seed``); the shards and
the per-rank batches are local SGD's own: each rank draws ``batch_size / world_size`` of the
workload's global batch from its own shard at every local step.

Communication (alpha-beta model, :mod:`distlab.communication.alpha_beta`; n parameters, p
ranks), per H local steps: one ring all-reduce of 4n bytes,
``2(p-1) alpha + 2(p-1)/p·4n beta``, or the compressed cost of
:func:`distlab.communication_efficient.compression.all_reduce_compressed`. The records'
``sim_time`` puts the ledger's traffic on a simulated network of the config's latency and
bandwidth (:func:`distlab.communication.alpha_beta.ledger_time`; nothing is slowed down for
real). Federated averaging, the same idea with sampled clients, is
:mod:`distlab.communication_efficient.fedavg`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from distlab import comm, launcher
from distlab.communication_efficient.compression import (METHODS, all_reduce_compressed,
                                                         make_compressor)
from distlab.communication_efficient.local_training import (SHARDS, WORKLOAD, TrafficMeter,
                                                            assign, check_batch, check_split,
                                                            check_workload, evaluate, flat,
                                                            one_thread, problem,
                                                            rank_and_size, sample_batches,
                                                            validate, with_data)
from distlab.communication_efficient.optimizers import LAMB, OneBitAdam
from distlab.data_parallel.ddp import average_gradients
from distlab.metrics import report
from distlab.problems.workloads import Workload

OPTIMIZERS = ("sgd", "adam", "lamb", "onebit_adam")


@dataclass(frozen=True)
class LocalSGDConfig:
    """Local SGD (or synchronous training when ``period`` = 1) of a workload on the digits.

    ``workload.num_steps`` counts the local steps of each rank; ``workload.batch_size`` is
    the global batch: each rank draws ``batch_size / world_size`` examples of its own shard
    per local step (it must divide), so that with ``period`` = 1 a step averages gradients
    over exactly ``batch_size`` examples, as :func:`reference` does in one process.
    """
    workload: Workload = field(default_factory=lambda: WORKLOAD)
    """What is trained: an ``"mlp"`` workload (default
    :data:`~distlab.communication_efficient.local_training.WORKLOAD`)."""
    world_size: int = 2
    """Processes (ranks), each with its own shard, 1 to 64."""
    period: int = 1
    """H: local steps between two averages, 1 to 10,000 (1: synchronous SGD)."""
    shards: str = "iid"
    """``"iid"`` (random shards) or ``"label_skewed"`` (each rank sees few classes)."""
    classes_per_rank: int = 2
    """Labels per rank for ``"label_skewed"`` shards, 1 to 10."""
    compression: str = "none"
    """How updates are compressed: one of
    ``distlab.communication_efficient.compression.METHODS``."""
    ratio: float = 0.01
    """Fraction of coordinates top-k and random-k keep, in (0, 1]."""
    error_feedback: bool = True
    """Keep a residual of what compression did not send (recommended)."""
    optimizer: str = "sgd"
    """``"sgd"`` (local SGD), or with ``period`` = 1: ``"adam"``, ``"lamb"``, ``"onebit_adam"``."""
    warmup_steps: int = 20
    """1-bit Adam's full-precision warm-up, 1 to 100,000 steps."""
    bandwidth: float = 1e6
    """Simulated network bandwidth in bytes/s, in (0, 1e12]."""
    latency: float = 1e-4
    """Simulated per-message latency alpha in seconds, in [0, 10]."""

    def __post_init__(self):
        validate(self, ints=[("world_size", 1, launcher.MAX_WORLD_SIZE),
                             ("period", 1, 10_000), ("classes_per_rank", 1, 10),
                             ("warmup_steps", 1, 100_000)],
                 floats=[("ratio", 0, 1), ("bandwidth", 0, 1e12)],
                 choices=[("shards", SHARDS), ("compression", METHODS),
                          ("optimizer", OPTIMIZERS), ("error_feedback", (True, False))])
        if self.optimizer != "sgd" and (self.period != 1 or self.compression != "none"):
            raise ValueError(f"LocalSGDConfig.optimizer={self.optimizer!r} averages gradients "
                             f"every step: it needs period=1 (got {self.period}) and "
                             f"compression='none' (got {self.compression!r})")
        check_workload(self)
        check_split(self, "world_size", "classes_per_rank")
        check_batch(self, self.world_size, "world_size")


def train(config: LocalSGDConfig, group=None, *, record=report) -> dict:
    """The worker: local SGD with period H (optionally compressed), or data-parallel Adam,
    LAMB or 1-bit Adam when ``config.optimizer`` says so.

    After every average it records ``step``, ``bytes_sent``, ``comm_time``,
    ``compute_time``, ``sim_time`` (compute plus simulated communication), ``divergence``
    (``||x_r - x||^2``, every rank) and, on rank 0, ``loss`` and ``accuracy`` of the averaged
    model; ``record`` is where records go (default :func:`distlab.metrics.report`).

    Returns:
        ``{"loss", "accuracy", "params"}``: the final (averaged) model's training loss and
        held-out accuracy, and its parameters flattened, the same on every rank.
    """
    rank, p = rank_and_size(config, group)
    workload = config.workload
    data, shards, model = problem(config, p, config.classes_per_rank, launcher.device())
    shard, params = shards[rank], list(model.parameters())
    optimizer = _optimizer(config, params, group)
    compressor = make_compressor(config.compression, config.ratio, workload.seed)
    anchor = flat(params)                                     # the last averaged model x
    residual = (torch.zeros_like(anchor) if config.error_feedback
                and config.compression != "none" else None)
    meter = TrafficMeter(config.latency, config.bandwidth, p)
    batches = sample_batches(shard, workload.batch_size // p, seed=workload.seed * 1000 + rank + 1)

    def log(step, divergence):
        values = {**meter.values(), "divergence": divergence}
        if rank == 0:
            values.update(evaluate(model, data, workload.loss))
        record(step=step, **values)

    log(0, 0.0)
    for step in range(1, workload.num_steps + 1):
        t0, comm0 = time.perf_counter(), comm.ledger().totals()["comm_time"]
        idx = next(batches)                                   # (batch_size / world_size,)
        optimizer.zero_grad()
        workload.loss(model(data.X[idx]), data.y[idx]).backward()
        if config.optimizer in ("adam", "lamb"):              # 1-bit Adam communicates itself
            average_gradients(params, group)
        optimizer.step()
        # compute only: the optimizers' gradient all-reduce is communication
        meter.compute_time += (time.perf_counter() - t0
                               - (comm.ledger().totals()["comm_time"] - comm0))
        if config.optimizer != "sgd":
            log(step, 0.0)
        elif step % config.period == 0 or step == workload.num_steps:
            x = flat(params)
            anchor += all_reduce_compressed(x - anchor, compressor, residual, group)
            assign(params, anchor)
            log(step, (x - anchor).pow(2).sum().item())
    return {**evaluate(model, data, workload.loss), "params": flat(params).tolist()}


def reference(config: LocalSGDConfig) -> tuple[list[float], list[float]]:
    """Single-process synchronous training on the union of the ranks' minibatches.

    One model; at every step the ``world_size`` minibatches the ranks would draw are
    concatenated and the optimizer steps on their mean loss. Local SGD with ``period`` = 1
    and no compression must match it, and so must Adam, LAMB, and 1-bit Adam during its
    warm-up. Returns (loss after each step, from step 0; final parameters).
    """
    workload = config.workload
    with one_thread():
        data, shards, model = problem(config, config.world_size, config.classes_per_rank)
        params = list(model.parameters())
        optimizer = _optimizer(config, params, reference=True)
        streams = [sample_batches(s, workload.batch_size // config.world_size,
                                  seed=workload.seed * 1000 + r + 1)
                   for r, s in enumerate(shards)]
        losses = [evaluate(model, data, workload.loss)["loss"]]
        for _ in range(workload.num_steps):
            idx = torch.cat([next(s) for s in streams])       # (batch_size,)
            optimizer.zero_grad()
            workload.loss(model(data.X[idx]), data.y[idx]).backward()
            optimizer.step()
            losses.append(evaluate(model, data, workload.loss)["loss"])
        return losses, flat(params).tolist()


def start(config: LocalSGDConfig, **launch) -> launcher.Run:
    """Start :func:`train` on ``config.world_size`` processes and return the
    :class:`~distlab.Run` at once; ``launch`` goes to :func:`distlab.launcher.start`."""
    return launcher.start(train, config.world_size, with_data(config), **launch)


def run(config: LocalSGDConfig, **launch) -> list[dict]:
    """:func:`start` and wait: every rank's result of :func:`train`, in rank order."""
    return start(config, **launch).result()


def _optimizer(config: LocalSGDConfig, params, group=None,
               reference: bool = False) -> torch.optim.Optimizer:
    lr = config.workload.lr
    if config.optimizer == "sgd":
        return config.workload.optimizer(params)
    if config.optimizer == "onebit_adam":
        if reference:     # the warm-up only: Adam, with OneBitAdam's eps
            return torch.optim.Adam(params, lr=lr, eps=1e-3)
        return OneBitAdam(params, lr=lr, group=group, warmup_steps=config.warmup_steps)
    return {"adam": torch.optim.Adam, "lamb": LAMB}[config.optimizer](params, lr=lr)


__all__ = ["LocalSGDConfig", "WORKLOAD", "train", "reference", "start", "run", "evaluate",
           "OPTIMIZERS", "SHARDS"]
