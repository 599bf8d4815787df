"""Gradient accumulation: k micro-batches per optimizer step, one all-reduce per step.

A global batch of B examples on N ranks gives each rank B/N. Split into k micro-batches of
B/(N·k), each forward and backward keeps the activations of B/(N·k) examples only, and the
gradients add up in ``p.grad``: scaling each micro-batch's mean loss by 1/k makes the sum
the gradient of the rank's mean loss, so the step equals the large batch's (Goyal et al.
2017, section 2; the activations are what shrinks, the model states do not).

Inside the data-parallel wrappers' ``no_sync()`` (:mod:`distlab.data_parallel.ddp`, as
PyTorch's DDP, Li et al. 2020, section 3.2.4) the first k-1 backward passes communicate
nothing; the last one all-reduces the accumulated gradients once. Per optimizer step that is
one all-reduce, 2(N-1)·alpha + 2(N-1)/N·n·beta for n bytes of gradients, whatever k: per
example, k times fewer bytes than synchronizing every micro-batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from distlab import comm, launcher
from distlab.checks import is_int, require
from distlab.data_parallel.ddp import VARIANTS, wrap
from distlab.metrics import report
from distlab.problems.workloads import Workload


@dataclass(frozen=True)
class AccumulationConfig:
    """Data-parallel training of a workload with k micro-batches per optimizer step."""
    accumulation_steps: int = 4
    """k: micro-batches per optimizer step; the all-reduce runs after the last."""
    variant: str = "bucketed"
    """the DDP wrapper of :mod:`distlab.data_parallel.ddp` ("naive" ... "bucketed")."""
    world_size: int = 2
    """ranks; each takes ``workload.batch_size / world_size`` examples per step."""
    workload: Workload = field(default_factory=lambda: Workload(batch_size=32, num_steps=4))
    """what is trained; ``batch_size`` is the global batch of one optimizer step."""

    def __post_init__(self):
        require(self, "accumulation_steps",
                is_int(self.accumulation_steps) and self.accumulation_steps >= 1, "an int >= 1")
        require(self, "variant", self.variant in VARIANTS, f"one of {sorted(VARIANTS)}")
        require(self, "world_size", is_int(self.world_size)
                and 1 <= self.world_size <= launcher.MAX_WORLD_SIZE,
                f"an int in 1..{launcher.MAX_WORLD_SIZE}")
        require(self, "workload", isinstance(self.workload, Workload), "a Workload")
        require(self, "accumulation_steps",
                self.workload.batch_size % (self.world_size * self.accumulation_steps) == 0,
                f"with world_size={self.world_size}, a k that divides workload.batch_size="
                f"{self.workload.batch_size} into equal micro-batches on every rank")


def train(config: AccumulationConfig, group=None) -> dict:
    """Train on every rank; report loss and bytes sent per step.

    Returns ``{"params": flat final parameters, "bytes_sent": this rank's total,
    "examples": examples this rank computed, "bytes_per_example"}``.
    """
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    wl, k = config.workload, config.accumulation_steps
    model = wrap(wl.build_model(), config.variant, group)
    opt = wl.optimizer(model.parameters())
    comm.ledger().reset()
    examples = 0
    for step, (X, y) in enumerate(wl.batches()):
        # This rank's rows, then k micro-batches: (B, ...) -> (B/N, ...) -> k x (B/(N·k), ...)
        X, y = X.chunk(world_size)[rank], y.chunk(world_size)[rank]
        micro = list(zip(X.chunk(k), y.chunk(k)))
        total = 0.0
        for i, (xm, ym) in enumerate(micro):
            last = i == k - 1
            # The last micro-batch's backward all-reduces; the others accumulate locally.
            with contextlib.nullcontext() if last else model.no_sync():
                loss = wl.loss(model(xm), ym) / k     # the sum of k of these: the mean loss
                loss.backward()
            total += loss.item()
            examples += len(xm)
        model.finish_gradient_synchronization()
        opt.step()
        opt.zero_grad()
        report(step=step, loss=total, **comm.ledger().totals())
    sent = comm.ledger().totals()["bytes_sent"]
    return {"params": _flat(model.module), "bytes_sent": sent, "examples": examples,
            "bytes_per_example": sent / examples}


def reference(config: AccumulationConfig) -> torch.Tensor:
    """One process, the whole global batch per step, the same optimizer: flat final params."""
    wl = config.workload
    net = wl.build_model()
    opt = wl.optimizer(net.parameters())
    for X, y in wl.batches():
        opt.zero_grad()
        wl.loss(net(X), y).backward()
        opt.step()
    return _flat(net)


def start(config: AccumulationConfig, **launch) -> launcher.Run:
    """Start :func:`train` on ``config.world_size`` processes; return the Run at once."""
    config = replace(config, workload=config.workload.loaded())   # data loaded once, here
    return launcher.start(train, config.world_size, config, **launch)


def run(config: AccumulationConfig, **launch) -> list[dict]:
    """:func:`start` and wait: every rank's result of :func:`train`, in rank order."""
    return start(config, **launch).result()


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])   # (num_params,)
