"""First steps (lab 00): the smallest complete distributed training run.

Synchronous data-parallel gradient descent on linear regression, the worked example of the
course. Each of the N ranks holds a disjoint shard of the data
(:func:`distlab.problems.data.shard_indices`), computes the *summed* squared error and its gradient
on that shard, and one all-reduce per step adds the shards' contributions:

    g = (1 / n) * sum_r sum_{i in shard r} grad (w^T x_i + b - y_i)^2

Dividing by the global example count ``n`` (not by N) makes every rank's step exactly the
step of single-process full-batch gradient descent, whatever the split. :func:`reference`
is that single process; lab 00 checks the two against each other. Lab 02 builds the same
idea into real data-parallel training (minibatches, DDP-style hooks, buckets).

The all-reduce is distlab's own ring (:func:`distlab.communication.collectives.ring_all_reduce`,
built from ``comm.isend`` / ``comm.irecv``), so ``bytes_sent`` counts the bytes that really
left each rank. With ``all_reduce="gloo"`` it is torch's built-in one, whose traffic nobody
sees: the run then reports the ledger's ``model_bytes`` (the ring formula) instead.

Communication cost per step (alpha-beta model, ring all-reduce of the d + 2 floats of the
gradient and the loss, 4 bytes each, on N ranks; Thakur, Rabenseifner and Gropp 2005):
``2 (N - 1) alpha + 2 (N - 1) / N * 4 (d + 2) beta``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from distlab import comm
from distlab.communication.collectives import ring_all_reduce
from distlab.checks import is_int, is_number, require
from distlab.problems.data import linear_regression, shard_indices
from distlab.launcher import MAX_WORLD_SIZE, Run, start as _start
from distlab.metrics import report
from distlab.problems.models import linear

ALL_REDUCES = ("ring", "gloo")


@dataclass(frozen=True)
class FirstRunConfig:
    """Settings of the lab 00 training run."""
    world_size: int = 2
    """Processes (ranks), 1 to 64."""
    num_steps: int = 60
    """Gradient steps, 1 to 10,000."""
    lr: float = 0.1
    """Learning rate, in (0, 1]: above 1 gradient descent on this problem diverges."""
    num_examples: int = 1024
    """Training examples in all (split across the ranks), 1 to 1,000,000."""
    num_features: int = 16
    """Features per example, 1 to 10,000."""
    seed: int = 0
    """Seed of the data and of the initial weights."""
    all_reduce: str = "ring"
    """``"ring"``: distlab's ring, bytes counted from its sends; ``"gloo"``: torch's built-in."""

    def __post_init__(self):
        for name, lo, hi in [("world_size", 1, MAX_WORLD_SIZE), ("num_steps", 1, 10_000), ("num_examples", 1, 1_000_000),
                             ("num_features", 1, 10_000)]:
            v = getattr(self, name)
            require(self, name, is_int(v) and lo <= v <= hi, f"integers {lo}..{hi}")
        require(self, "lr", is_number(self.lr) and 0 < self.lr <= 1, "(0, 1]")
        require(self, "all_reduce", self.all_reduce in ALL_REDUCES, f"one of {ALL_REDUCES}")


def _data(config: FirstRunConfig):
    return linear_regression(n=config.num_examples, d=config.num_features, seed=config.seed)


def train(config: FirstRunConfig, group=None) -> list[float]:
    """The worker: gradient descent on this rank's shard, gradients summed by all-reduce.

    Reports ``step``, ``loss`` (full-batch mean squared error before the step), ``comm_time``
    and ``bytes_sent`` (counted from the ring's sends; ``model_bytes`` for gloo, booked by
    formula), all cumulative, every step. Returns the final parameters, flattened.
    """
    import torch.distributed as dist
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    data = _data(config)
    shard = shard_indices(len(data.X), rank, world_size, seed=config.seed)
    X, y = data.X[shard], data.y[shard]                       # (n / N, d), (n / N, 1)
    model = linear(config.num_features, seed=config.seed)
    params = list(model.parameters())
    for step in range(config.num_steps):
        loss_sum = ((model(X) - y) ** 2).sum()                # summed, not averaged: see above
        grads = torch.autograd.grad(loss_sum, params)
        # One message per step: the gradient and the loss travel together.
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss_sum.detach().reshape(1)])
        if config.all_reduce == "ring":                        # sum over ranks
            ring_all_reduce(flat, group, check=False)
        else:
            comm.all_reduce(flat, group=group)
        flat /= config.num_examples
        with torch.no_grad():
            offset = 0
            for p in params:
                p -= config.lr * flat[offset: offset + p.numel()].view_as(p)
                offset += p.numel()
        report(step=step, loss=flat[-1].item(), **_traffic())
    return torch.cat([p.detach().reshape(-1) for p in params]).tolist()


def _traffic() -> dict:
    """This rank's cumulative traffic: bytes counted from real sends, or model bytes."""
    ops, comm_time = comm.ledger().by_op(), comm.ledger().totals()["comm_time"]
    if "all_reduce" in ops:      # the built-in collective: the ledger booked the formula
        return {"model_bytes": ops["all_reduce"]["bytes_sent"], "comm_time": comm_time}
    return {"bytes_sent": ops.get("send", {}).get("bytes_sent", 0), "comm_time": comm_time}


def reference(config: FirstRunConfig) -> tuple[list[float], list[float]]:
    """Single-process full-batch gradient descent: (loss per step, final parameters)."""
    data = _data(config)
    model = linear(config.num_features, seed=config.seed)
    params = list(model.parameters())
    losses = []
    for _ in range(config.num_steps):
        loss = ((model(data.X) - data.y) ** 2).mean()
        grads = torch.autograd.grad(loss, params)
        losses.append(loss.item())
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= config.lr * g
    return losses, torch.cat([p.detach().reshape(-1) for p in params]).tolist()


def start(config: FirstRunConfig, **launch) -> Run:
    """Start :func:`train` on ``config.world_size`` processes without blocking."""
    launch.setdefault("timeout", 120)
    return _start(train, config.world_size, config, **launch)


def run(config: FirstRunConfig, **launch) -> list[list[float]]:
    """:func:`start`, then wait: every rank's final parameters."""
    return start(config, **launch).result()
