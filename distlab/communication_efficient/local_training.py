"""What local SGD and federated averaging share: workers that train on their own shard of
the digits between two averages.

A config (:class:`~distlab.communication_efficient.local_sgd.LocalSGDConfig`,
:class:`~distlab.communication_efficient.fedavg.FedAvgConfig`) composes a
:class:`~distlab.problems.workloads.Workload` for the model, the data and the loss; what is
here is theirs alone: the shards (IID or label-skewed), the minibatches each rank or client
draws from its own shard, the evaluation of the averaged model, the traffic meter that puts
the ledger's bytes on a simulated network, and the model as one flat vector (what is
averaged). Nothing here communicates.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
import torch.distributed as dist

from distlab import comm
from distlab.checks import is_int, is_number, require, require_arg
from distlab.communication import alpha_beta
from distlab.problems.data import label_skewed_shards, shard_indices
from distlab.problems.workloads import Workload

SHARDS = ("iid", "label_skewed")
WORKLOAD = Workload(model="mlp", hidden=32, depth=1, batch_size=32, lr=0.2, num_steps=200)
"""Lab 06's workload: an MLP with one hidden layer of 32 on the digits, SGD at lr 0.2, 200
local steps, a global batch of 32 (16 examples per rank on local SGD's default 2 ranks)."""


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


def check_workload(config) -> None:
    """Refuse a workload these algorithms cannot train: they need the digits classifier
    (``"mlp"``: label-skewed shards and accuracy need classes)."""
    workload, field_ = config.workload, f"{type(config).__name__}.workload"
    require(config, "workload", isinstance(workload, Workload),
            "a distlab.problems.workloads.Workload")
    require_arg(f"{field_}.model", workload.model, workload.model == "mlp",
                "'mlp' (the digits classifier: label-skewed shards and accuracy need classes)")


def check_batch(config, parts: int, name: str) -> None:
    """Refuse a global batch that does not split into ``parts`` (``config.name``) equal
    batches."""
    batch_size = config.workload.batch_size
    require_arg(f"{type(config).__name__}.workload.batch_size", batch_size,
                batch_size % parts == 0, f"a multiple of {name}={parts} (the global batch is "
                f"split into {name} equal batches)")


def check_split(config, count: str, classes: str) -> None:
    """Refuse a label-skewed split the digits cannot give (more shards than a label has
    examples), naming the field ``count``."""
    if config.shards != "label_skewed":
        return
    workload = config.workload
    try:
        label_skewed_shards(workload.loaded().dataset.y, getattr(config, count),
                            getattr(config, classes), workload.seed)
    except ValueError as e:
        require(config, count, False, f"a split of the digits' labels ({e})")


def rank_and_size(config, group) -> tuple[int, int]:
    """This rank and the group's size, which must be ``config.world_size``."""
    rank, p = dist.get_rank(group), dist.get_world_size(group)
    if p != config.world_size:
        raise ValueError(f"config.world_size={config.world_size} but the group has {p} ranks")
    return rank, p


def with_data(config):
    """``config`` with its workload's data loaded, once, here: it travels to the workers."""
    return replace(config, workload=config.workload.loaded())


def problem(config, count: int, classes: int, device=None):
    """``(data, shards, model)``: the workload's digits and model, and ``count`` shards of
    ``config.shards`` (with ``classes`` labels each when label-skewed), all seeded by the
    workload's ``seed``; data, shards and model on ``device`` (None: the CPU; a worker
    passes its rank's device, a GPU under NCCL)."""
    workload = config.workload
    data = workload.loaded().dataset
    shards = split(data, config.shards, count, classes, workload.seed)
    model = workload.build_model()
    if device is not None:
        data = replace(data, X=data.X.to(device), y=data.y.to(device),
                       X_val=data.X_val.to(device), y_val=data.y_val.to(device))
        shards, model = [s.to(device) for s in shards], model.to(device)
    return data, shards, model


def split(data, shards: str, count: int, classes: int, seed: int) -> list[torch.Tensor]:
    """``count`` shards of the training set: ``"iid"`` or ``"label_skewed"`` with ``classes``
    labels each (:func:`distlab.problems.data.label_skewed_shards`, which checks both)."""
    require_arg("shards", shards, shards in SHARDS, f"one of {SHARDS}")
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
def evaluate(model, data, loss_fn) -> dict:
    """``loss`` (by ``loss_fn``, the workload's) on the whole training set and ``accuracy``
    on the held-out set."""
    loss = loss_fn(model(data.X), data.y).item()
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
