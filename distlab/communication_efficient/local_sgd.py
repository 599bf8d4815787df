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

import contextlib
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from distlab import comm, launcher
from distlab.checks import is_int, is_number, require, require_arg
from distlab.communication import alpha_beta
from distlab.communication_efficient.compression import (METHODS, all_reduce_compressed,
                                                         make_compressor)
from distlab.communication_efficient.optimizers import LAMB, OneBitAdam
from distlab.data_parallel.ddp import average_gradients
from distlab.metrics import report
from distlab.problems.data import digits, label_skewed_shards, shard_indices
from distlab.problems.models import mlp

OPTIMIZERS = ("sgd", "adam", "lamb", "onebit_adam")
SHARDS = ("iid", "label_skewed")


@dataclass(frozen=True)
class LocalSGDConfig:
    """Local SGD (or synchronous training when ``period`` = 1) of an MLP on the digits."""
    world_size: int = 2
    """Processes (ranks), each with its own shard, 1 to 64."""
    num_steps: int = 200
    """Local steps per rank, 1 to 100,000."""
    period: int = 1
    """H: local steps between two averages, 1 to 10,000 (1: synchronous SGD)."""
    lr: float = 0.2
    """Learning rate, in (0, 10]."""
    batch_size: int = 16
    """Examples per rank per step, 1 to 4,096."""
    shards: str = "iid"
    """``"iid"`` (random shards) or ``"label_skewed"`` (each rank sees few classes)."""
    classes_per_rank: int = 2
    """Labels per rank for ``"label_skewed"`` shards, 1 to 10."""
    compression: str = "none"
    """How updates are compressed: one of
    :data:`distlab.communication_efficient.compression.METHODS`."""
    ratio: float = 0.01
    """Fraction of coordinates top-k and random-k keep, in (0, 1]."""
    error_feedback: bool = True
    """Keep a residual of what compression did not send (recommended)."""
    optimizer: str = "sgd"
    """``"sgd"`` (local SGD), or with ``period`` = 1: ``"adam"``, ``"lamb"``, ``"onebit_adam"``."""
    warmup_steps: int = 20
    """1-bit Adam's full-precision warm-up, 1 to 100,000 steps."""
    hidden: int = 32
    """Width of the MLP's hidden layer, 1 to 4,096."""
    bandwidth: float = 1e6
    """Simulated network bandwidth in bytes/s, in (0, 1e12]."""
    latency: float = 1e-4
    """Simulated per-message latency alpha in seconds, in [0, 10]."""
    seed: int = 0
    """Seed of the data split, the model and the minibatches, 0 to 2^31."""

    def __post_init__(self):
        validate(self, ints=[("world_size", 1, launcher.MAX_WORLD_SIZE),
                             ("num_steps", 1, 100_000), ("period", 1, 10_000),
                             ("batch_size", 1, 4096), ("classes_per_rank", 1, 10),
                             ("warmup_steps", 1, 100_000), ("hidden", 1, 4096),
                             ("seed", 0, 2 ** 31)],
                 floats=[("lr", 0, 10), ("ratio", 0, 1), ("bandwidth", 0, 1e12)],
                 choices=[("shards", SHARDS), ("compression", METHODS),
                          ("optimizer", OPTIMIZERS), ("error_feedback", (True, False))])
        if self.optimizer != "sgd" and (self.period != 1 or self.compression != "none"):
            raise ValueError(f"LocalSGDConfig.optimizer={self.optimizer!r} averages gradients "
                             f"every step: it needs period=1 (got {self.period}) and "
                             f"compression='none' (got {self.compression!r})")
        check_split(self, "world_size", "classes_per_rank")


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
    data, shards, model = problem(config, p, config.classes_per_rank, launcher.device())
    shard, params = shards[rank], list(model.parameters())
    optimizer = _optimizer(config, params, group)
    compressor = make_compressor(config.compression, config.ratio, config.seed)
    anchor = flat(params)                                     # the last averaged model x
    residual = (torch.zeros_like(anchor) if config.error_feedback
                and config.compression != "none" else None)
    meter = TrafficMeter(config.latency, config.bandwidth, p)
    batches = sample_batches(shard, config.batch_size, seed=config.seed * 1000 + rank + 1)

    def log(step, divergence):
        values = {**meter.values(), "divergence": divergence}
        if rank == 0:
            values.update(evaluate(model, data))
        record(step=step, **values)

    log(0, 0.0)
    for step in range(1, config.num_steps + 1):
        t0, comm0 = time.perf_counter(), comm.ledger().totals()["comm_time"]
        idx = next(batches)
        optimizer.zero_grad()
        F.cross_entropy(model(data.X[idx]), data.y[idx]).backward()
        if config.optimizer in ("adam", "lamb"):              # 1-bit Adam communicates itself
            average_gradients(params, group)
        optimizer.step()
        # compute only: the optimizers' gradient all-reduce is communication
        meter.compute_time += (time.perf_counter() - t0
                               - (comm.ledger().totals()["comm_time"] - comm0))
        if config.optimizer != "sgd":
            log(step, 0.0)
        elif step % config.period == 0 or step == config.num_steps:
            x = flat(params)
            anchor += all_reduce_compressed(x - anchor, compressor, residual, group)
            assign(params, anchor)
            log(step, (x - anchor).pow(2).sum().item())
    return {**evaluate(model, data), "params": flat(params).tolist()}


def reference(config: LocalSGDConfig) -> tuple[list[float], list[float]]:
    """Single-process synchronous training on the union of the ranks' minibatches.

    One model; at every step the ``world_size`` minibatches the ranks would draw are
    concatenated and the optimizer steps on their mean loss. Local SGD with ``period`` = 1
    and no compression must match it, and so must Adam, LAMB, and 1-bit Adam during its
    warm-up. Returns (loss after each step, from step 0; final parameters).
    """
    with one_thread():
        data, shards, model = problem(config, config.world_size, config.classes_per_rank)
        params = list(model.parameters())
        optimizer = _optimizer(config, params, reference=True)
        streams = [sample_batches(s, config.batch_size, seed=config.seed * 1000 + r + 1)
                   for r, s in enumerate(shards)]
        losses = [evaluate(model, data)["loss"]]
        for _ in range(config.num_steps):
            idx = torch.cat([next(s) for s in streams])       # (world_size * batch_size,)
            optimizer.zero_grad()
            F.cross_entropy(model(data.X[idx]), data.y[idx]).backward()
            optimizer.step()
            losses.append(evaluate(model, data)["loss"])
        return losses, flat(params).tolist()


def start(config: LocalSGDConfig, **launch) -> launcher.Run:
    """Start :func:`train` on ``config.world_size`` processes and return the
    :class:`~distlab.Run` at once; ``launch`` goes to :func:`distlab.launcher.start`."""
    return launcher.start(train, config.world_size, config, **launch)


def run(config: LocalSGDConfig, **launch) -> list[dict]:
    """:func:`start` and wait: every rank's result of :func:`train`, in rank order."""
    return start(config, **launch).result()


# -- pieces local SGD and federated averaging share ---------------------------------------

def validate(config, ints=(), floats=(), choices=()):
    """Check the fields named in tables: ``(name, lo, hi)`` ints in lo..hi, floats in (lo, hi],
    ``(name, allowed)`` choices; and ``latency`` in [0, 10] seconds."""
    for name, lo, hi in ints:
        v = getattr(config, name)
        require(config, name, is_int(v) and lo <= v <= hi, f"integers {lo}..{hi}")
    for name, lo, hi in floats:
        v = getattr(config, name)
        require(config, name, is_number(v) and lo < v <= hi, f"({lo:g}, {hi:g}]")
    for name, allowed in choices:
        v = getattr(config, name)                 # by type too: 1 is not the choice True
        require(config, name, any(type(v) is type(a) and v == a for a in allowed),
                f"one of {allowed}")
    require(config, "latency", is_number(config.latency) and 0 <= config.latency <= 10,
            "[0, 10] seconds")


def check_split(config, count: str, classes: str) -> None:
    """Refuse a label-skewed split the digits cannot give (more shards than a label has
    examples), naming the field ``count``."""
    if config.shards != "label_skewed":
        return
    try:
        label_skewed_shards(digits(seed=config.seed).y, getattr(config, count),
                            getattr(config, classes), config.seed)
    except ValueError as e:
        require(config, count, False, f"a split of the digits' labels ({e})")


def rank_and_size(config, group) -> tuple[int, int]:
    """This rank and the group's size, which must be ``config.world_size``."""
    rank, p = dist.get_rank(group), dist.get_world_size(group)
    if p != config.world_size:
        raise ValueError(f"config.world_size={config.world_size} but the group has {p} ranks")
    return rank, p


def problem(config, count: int, classes: int, device=None):
    """``(data, shards, model)``: the digits, ``count`` shards of ``config.shards`` (with
    ``classes`` labels each when label-skewed), and the MLP, all seeded by ``config.seed``;
    data, shards and model on ``device`` (None: the CPU; a worker passes its rank's device,
    a GPU under NCCL)."""
    data = digits(seed=config.seed)
    shards = split(data, config.shards, count, classes, config.seed)
    model = mlp(data.num_features, config.hidden, data.num_classes, depth=1, seed=config.seed)
    if device is not None:
        data = replace(data, X=data.X.to(device), y=data.y.to(device),
                       X_val=data.X_val.to(device), y_val=data.y_val.to(device))
        shards, model = [s.to(device) for s in shards], model.to(device)
    return data, shards, model


def split(data, shards: str, count: int, classes: int, seed: int) -> list[torch.Tensor]:
    """``count`` shards of the training set: ``"iid"`` or ``"label_skewed"`` with ``classes``
    labels each (:func:`distlab.problems.data.label_skewed_shards`, which checks both)."""
    if shards not in SHARDS:
        raise ValueError(f"shards={shards!r} is out of range; allowed one of {SHARDS}")
    if shards == "iid":
        return [shard_indices(len(data.y), r, count, seed=seed) for r in range(count)]
    return label_skewed_shards(data.y, count, classes, seed)


def sample_batches(shard: torch.Tensor, batch_size: int, seed: int):
    """Minibatches of ``shard`` drawn with replacement, reproducibly from ``seed`` (drawn on
    the CPU, so every device draws the same)."""
    require_arg("batch_size", batch_size, is_int(batch_size) and batch_size >= 1, "integers >= 1")
    if not len(shard):
        raise ValueError("shard is empty: there is nothing to draw minibatches from")
    g = torch.Generator().manual_seed(seed)
    while True:
        yield shard[torch.randint(len(shard), (batch_size,), generator=g).to(shard.device)]


@torch.no_grad()
def evaluate(model, data) -> dict:
    """``loss`` on the whole training set and ``accuracy`` on the held-out set."""
    loss = F.cross_entropy(model(data.X), data.y).item()
    accuracy = (model(data.X_val).argmax(1) == data.y_val).float().mean().item()
    return {"loss": loss, "accuracy": accuracy}


class TrafficMeter:
    """This rank's traffic since construction (the ledger belongs to the process), its
    compute time, and both on the simulated network."""

    def __init__(self, latency: float, bandwidth: float, world_size: int):
        self.latency, self.bandwidth, self.world_size = latency, bandwidth, world_size
        require(self, "latency", is_number(latency) and latency >= 0, "seconds >= 0")
        require(self, "bandwidth", is_number(bandwidth) and bandwidth > 0, "bytes/s > 0")
        require(self, "world_size", is_int(world_size) and world_size >= 1, "integers >= 1")
        self.start = comm.ledger().by_op()
        self.compute_time = 0.0

    def values(self) -> dict:
        now = comm.ledger().by_op()
        for op, s in self.start.items():
            for k in ("calls", "bytes_sent", "bytes_recv", "comm_time"):
                now[op][k] -= s[k]
        sim = alpha_beta.ledger_time(now, self.world_size, self.latency, 1 / self.bandwidth)
        return {"bytes_sent": sum(s["bytes_sent"] for s in now.values()),
                "comm_time": sum(s["comm_time"] for s in now.values()),
                "compute_time": self.compute_time, "sim_time": self.compute_time + sim}


def flat(params) -> torch.Tensor:
    """The parameters end to end, detached: ``(n,)``."""
    return torch.cat([w.detach().reshape(-1) for w in params])


@torch.no_grad()
def assign(params, vec: torch.Tensor) -> None:
    """Copy the flat ``vec`` into the parameters (copies: ``vec`` stays this caller's own)."""
    for w, part in zip(params, vec.split([w.numel() for w in params])):
        w.copy_(part.view_as(w))


@contextlib.contextmanager
def one_thread():
    """Run a single-process reference on one thread: on tensors this small, more threads
    only add contention (50 times slower on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _optimizer(config: LocalSGDConfig, params, group=None,
               reference: bool = False) -> torch.optim.Optimizer:
    if config.optimizer == "onebit_adam":
        if reference:     # the warm-up only: Adam, with OneBitAdam's eps
            return torch.optim.Adam(params, lr=config.lr, eps=1e-3)
        return OneBitAdam(params, lr=config.lr, group=group, warmup_steps=config.warmup_steps)
    return {"sgd": torch.optim.SGD, "adam": torch.optim.Adam,
            "lamb": LAMB}[config.optimizer](params, lr=config.lr)


__all__ = ["LocalSGDConfig", "train", "reference", "start", "run", "evaluate", "OPTIMIZERS",
           "SHARDS"]
