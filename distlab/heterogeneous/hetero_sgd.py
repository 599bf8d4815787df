"""Heterogeneity-aware data parallelism: unequal batch shares, example-weighted averaging.

On a cluster of ranks of different speeds, synchronous data parallelism with equal shares
runs at the pace of the slowest rank: every step the fast ranks wait in the all-reduce.
Giving rank r a share ``b_r`` of the global batch ``B`` in proportion to its speed
(:func:`~distlab.heterogeneous.speeds.proportional_batches`) balances the compute, so the
step time drops from ``max_r (B/p) / s_r`` to about ``B / sum_r s_r`` (the load balancing
of heterogeneity-aware training; Jia et al. 2018, "Improving the Performance of Distributed
TensorFlow with Heterogeneous Devices"; Park et al. 2020, "HetPipe", section 4).

**Why the average must be weighted by examples.** Rank r computes ``g_r``, the gradient of
its ``b_r`` examples' mean loss. The gradient of the global batch's mean loss is::

    g = (1/B) sum_i grad l_i = sum_r (b_r / B) g_r

which is the plain average ``(1/p) sum_r g_r`` only when every ``b_r = B/p``. So each rank
scales its gradient by ``p b_r / B`` and then calls the one gradient averaging,
:func:`distlab.data_parallel.ddp.average_gradients` (which divides the sum by ``p``). With
``example_weighted=False`` the plain average over-weights the examples of the small shares
(a slow rank's few examples count as much as a fast rank's many): the run no longer equals
single-process SGD, which the tests show.

The global batch of each step is the workload's own (:meth:`Workload.batches`, the same on
every rank from the seed, nothing sent), and rank r takes the contiguous slice
``[b_0 + ... + b_{r-1}, ... + b_r)`` of it: disjoint shares whose union is the global batch,
so :func:`reference` is plain single-process training on the workload.

A rank's speed is injected (:func:`~distlab.heterogeneous.speeds.compute_delay`: a rank of
speed s with b examples sleeps ``step_time * b / (s * B/p)``), because on one machine every
process runs on the same cores.

Communication per step (alpha-beta, n gradient bytes, p ranks): one all-reduce of the
gradients, ``2(p-1) alpha + 2(p-1)/p n beta``, plus one all-reduce of the scalar loss,
``2(p-1) alpha``: the same as equal shares; only the compute is rebalanced.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch.distributed as dist
from torch import nn

from distlab import comm, launcher
from distlab.checks import is_int, is_number, require
from distlab.data_parallel.ddp import average_gradients, broadcast_module
from distlab.heterogeneous.speeds import compute_delay, equal_batches, proportional_batches
from distlab.launcher import MAX_WORLD_SIZE, Run
from distlab.metrics import report
from distlab.problems.workloads import Workload

MODELS = ("linear", "mlp")
"""The workloads trained here: rows ``(X, y)`` whose global batch splits by examples."""


@dataclass(frozen=True)
class HeteroSGDConfig:
    """Synchronous data parallelism on ranks of different speeds."""

    workload: Workload = field(default_factory=lambda: Workload(
        model="mlp", hidden=16, depth=1, batch_size=64, lr=0.1, num_steps=20))
    """What is trained (``model`` "linear" or "mlp"); ``batch_size`` is the global batch."""
    world_size: int = 2
    """Number of ranks (processes)."""
    speeds: tuple = ()
    """Relative speed of each rank (examples per unit time), ``world_size`` numbers > 0;
    () = all equal."""
    proportional: bool = True
    """Shares in proportion to the speeds; False = equal shares whatever the speeds."""
    example_weighted: bool = True
    """Weight rank r's gradient by ``b_r / B`` (exact); False = the plain average (wrong
    when the shares differ: kept to show why)."""
    step_time: float = 0.0
    """Injected seconds of compute of a speed-1 rank on ``batch_size / world_size`` examples."""

    def __post_init__(self):
        require(self, "workload", isinstance(self.workload, Workload)
                and self.workload.model in MODELS,
                f"a distlab.problems.workloads.Workload with model in {MODELS}")
        require(self, "world_size",
                is_int(self.world_size) and 1 <= self.world_size <= MAX_WORLD_SIZE,
                f"an int in 1..{MAX_WORLD_SIZE}")
        require(self, "speeds", isinstance(self.speeds, tuple)
                and len(self.speeds) in (0, self.world_size)
                and all(is_number(s) and s > 0 for s in self.speeds),
                f"() or a tuple of world_size={self.world_size} numbers > 0")
        require(self, "workload", self.workload.batch_size >= self.world_size,
                f"a batch_size >= world_size={self.world_size} (every rank gets an example)")
        require(self, "proportional", isinstance(self.proportional, bool), "True or False")
        require(self, "example_weighted", isinstance(self.example_weighted, bool),
                "True or False")
        require(self, "step_time", is_number(self.step_time) and 0 <= self.step_time <= 10,
                "0..10 s")

    @property
    def rank_speeds(self) -> tuple:
        """Every rank's speed (1.0 each when ``speeds`` is ())."""
        return self.speeds or (1.0,) * self.world_size

    @property
    def shares(self) -> tuple[int, ...]:
        """``b_r``: the examples of every step's global batch that each rank takes."""
        B = self.workload.batch_size
        if self.proportional:
            return proportional_batches(self.rank_speeds, B)
        return equal_batches(self.world_size, B)


def train(config: HeteroSGDConfig, group=None) -> dict:
    """Data-parallel SGD with this rank's share ``config.shares[rank]``; call it on every rank.

    Each step this rank computes the gradient of its share's mean loss, sleeps its injected
    compute time, scales the gradient by ``p b_r / B`` (when ``example_weighted``), averages
    with :func:`~distlab.data_parallel.ddp.average_gradients` and steps the workload's
    optimizer. Reports, each step, ``loss`` (the global batch's, the same on every rank),
    ``batch`` (b_r), and cumulative ``compute_time`` (forward, backward, the injected delay)
    and ``wait_time`` (in the all-reduce: mostly waiting for the slowest rank).

    Returns:
        ``{"params"}`` the final parameters as one vector, ``"losses"`` the global batch's
        loss at each step, ``"batch"`` b_r, and per step ``"compute_times"`` and
        ``"wait_times"`` (seconds).
    """
    p, rank = dist.get_world_size(group), dist.get_rank(group)
    if p != config.world_size:
        raise ValueError(f"config.world_size={config.world_size} but the group has {p} ranks")
    workload = config.workload.loaded()
    shares, B = config.shares, workload.batch_size
    lo, b = sum(shares[:rank]), shares[rank]
    delay = compute_delay(config.rank_speeds[rank], b, config.step_time, B / p)
    weight = p * b / B if config.example_weighted else 1.0
    model = workload.build_model()
    broadcast_module(model, group)   # the same start everywhere (already so from the seed)
    opt = workload.optimizer(model.parameters())
    losses, compute_times, wait_times = [], [], []
    for step, (X, y) in enumerate(workload.batches()):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = workload.loss(model(X[lo:lo + b]), y[lo:lo + b])   # mean over this share
        loss.backward()
        time.sleep(delay)                     # the rank's speed, injected
        t1 = time.perf_counter()
        for prm in model.parameters():
            if prm.grad is not None:
                prm.grad.mul_(weight)         # p b_r / B: the average is then example-weighted
        average_gradients(model.parameters(), group=group)
        global_loss = (loss.detach() * (b / B)).reshape(1)   # sum_r (b_r/B) loss_r
        comm.all_reduce(global_loss, group=group)
        t2 = time.perf_counter()
        opt.step()
        compute_times.append(t1 - t0)
        wait_times.append(t2 - t1)
        losses.append(global_loss.item())
        report(step=step, loss=losses[-1], batch=b, compute_time=sum(compute_times),
               wait_time=sum(wait_times))
    return {"params": nn.utils.parameters_to_vector(model.parameters()).detach(),
            "losses": losses, "batch": b, "compute_times": compute_times,
            "wait_times": wait_times}


def reference(config: HeteroSGDConfig) -> dict:
    """Single-process SGD on the same global batches: what :func:`train` must equal.

    Whatever the shares, the union of a step's shares is the workload's global batch, so
    this is plain training on the workload. Returns ``{"params", "losses"}``.
    """
    workload = config.workload.loaded()
    model = workload.build_model()
    opt = workload.optimizer(model.parameters())
    losses = []
    for X, y in workload.batches():
        opt.zero_grad()
        loss = workload.loss(model(X), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"params": nn.utils.parameters_to_vector(model.parameters()).detach(),
            "losses": losses}


def start(config: HeteroSGDConfig, **launch) -> Run:
    """Start :func:`train` on ``config.world_size`` processes; return the :class:`Run` at once."""
    if not isinstance(config, HeteroSGDConfig):
        raise TypeError(f"config must be a HeteroSGDConfig, got {type(config).__name__}")
    config = replace(config, workload=config.workload.loaded())   # the data travels with it
    return launcher.start(train, config.world_size, config, **launch)


def run(config: HeteroSGDConfig, **launch) -> list[dict]:
    """:func:`start` and wait: the per-rank results of :func:`train`, in rank order."""
    return start(config, **launch).result()


def imbalance(results: list[dict]) -> float:
    """max / min over ranks of the total compute time: 1 when the load is balanced.

    With equal shares it is about the ratio of the fastest to the slowest speed.
    """
    totals = [sum(r["compute_times"]) for r in results]
    return max(totals) / min(totals)
