"""PyTorch's own pipeline schedules, ``torch.distributed.pipelining``, on distlab's stages.

PyTorch ships the schedules :mod:`distlab.model_parallel.schedules` builds by hand: a
``torch.distributed.pipelining.PipelineStage`` wraps one chunk of the model, and a schedule
object drives a rank's stages through ``m`` microbatches in ``step``:
``ScheduleGPipe`` and ``Schedule1F1B`` (one stage per rank), ``ScheduleInterleaved1F1B``
(Narayanan et al. 2021, section 2.2.2), ``ScheduleInterleavedZeroBubble`` (the zero-bubble
split of Qi et al. 2024 over interleaved chunks) and ``ScheduleZBVZeroBubble`` (ZB-V, Qi et
al. 2024 section 6: two chunks per rank laid out in a V, rank r holding virtual stages r and
2p - 1 - r). Here they train the same :class:`~distlab.problems.workloads.Workload`, cut by
the same :func:`~distlab.model_parallel.schedules.partition`, and their losses equal
distlab's (and so the unsplit model's): see ``tests/model_parallel/test_torch_pipelining.py``.

:data:`TORCH_SCHEDULES` says which of them run on gloo on CPU, as tried here (torch
2.13): each attempt was launched with a short timeout, so a hang would have shown as one.

Cost (alpha-beta): the messages of the distlab schedule of the same shape (one activation
and one gradient per microbatch and virtual-stage boundary); PyTorch posts its receives
before it needs them (``irecv``), so a transfer may overlap the compute before it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch.distributed as dist

from distlab.checks import is_int, require
from distlab.launcher import device
from distlab.model_parallel.schedules import partition, stage_layers
from distlab.problems.workloads import Workload, train_reference

TORCH_SCHEDULES = {
    "ScheduleGPipe": dict(
        distlab="gpipe", chunks=1, runs_on_gloo=True,
        note="runs: every receive of a step is a plain irecv, every send an isend"),
    "Schedule1F1B": dict(
        distlab="1f1b", chunks=1, runs_on_gloo=True,
        note="runs: torch 2.13 batches sends and receives only when they mix, and 1F1B "
             "with one stage per rank never mixes them towards one peer"),
    "ScheduleInterleaved1F1B": dict(
        distlab="interleaved", chunks=2, runs_on_gloo=True,
        note="runs (two chunks per rank, rank r holding virtual stages r and r + p)"),
    "ScheduleInterleavedZeroBubble": dict(
        distlab="zb-h1", chunks=2, runs_on_gloo=True,
        note="runs (interleaved chunks, backward split into input and weight gradients)"),
    "ScheduleZBVZeroBubble": dict(
        distlab="zb-h1", chunks=2, runs_on_gloo=True,
        note="runs (rank r holds virtual stages r and 2p - 1 - r: the loss is on rank 0)"),
    "ScheduleLoopedBFS": dict(
        distlab=None, chunks=2, runs_on_gloo=True,
        note="runs (looped chunks, breadth first: GPipe's order over the virtual stages)"),
    "ScheduleDualPipeV": dict(
        distlab=None, chunks=2, runs_on_gloo=True,
        note="runs (DeepSeek-V3's DualPipe on ZB-V's layout of the chunks)"),
}
"""PyTorch's schedule classes, tried on gloo: the distlab schedule each one corresponds to,
its model chunks per rank, whether it ran (losses equal to distlab's) and what was seen."""


@dataclass(frozen=True)
class TorchPipelineConfig:
    """A workload trained by one of PyTorch's pipeline schedules."""
    workload: Workload = field(default_factory=lambda: Workload("mlp", batch_size=16))
    """What is trained: the model cut into ``num_stages`` x chunks stages."""
    num_stages: int = 2
    """Ranks; each holds one stage, or two chunks (see :data:`TORCH_SCHEDULES`)."""
    num_microbatches: int = 4
    """Microbatches per batch; must divide ``batch_size`` (PyTorch averages their losses)."""
    schedule: str = "Schedule1F1B"
    """A key of :data:`TORCH_SCHEDULES`."""

    def __post_init__(self):
        require(self, "workload", isinstance(self.workload, Workload)
                and self.workload.model in ("mlp", "transformer"),
                "a Workload of model 'mlp' or 'transformer' (layers to cut into stages)")
        require(self, "schedule", self.schedule in TORCH_SCHEDULES,
                f"one of {tuple(TORCH_SCHEDULES)}")
        require(self, "num_stages", is_int(self.num_stages) and 1 <= self.num_stages <= 8,
                "an int in 1..8")
        require(self, "num_microbatches", is_int(self.num_microbatches)
                and self.num_microbatches >= 1
                and self.workload.batch_size % self.num_microbatches == 0
                and self.num_microbatches % self.num_stages == 0,
                f"an int dividing batch_size={self.workload.batch_size} (equal microbatches: "
                f"the mean of their losses is the batch's) and a multiple of num_stages="
                f"{self.num_stages} (the interleaved schedules' rounds)")
        partition(len(self.workload.build_model()), self.num_stages * self.chunks)

    @property
    def chunks(self) -> int:
        """Model chunks per rank."""
        return TORCH_SCHEDULES[self.schedule]["chunks"]


def train(config: TorchPipelineConfig, group=None) -> dict:
    """Worker: ``config.workload`` trained by PyTorch's ``config.schedule`` on the ranks of
    ``group`` (default: the world). Returns this rank's ``stages`` (virtual stage indices)
    and ``losses`` (the rank holding the last stage; [] elsewhere)."""
    from torch.distributed import pipelining    # imported by the worker that uses it

    rank, p, v = dist.get_rank(group), config.num_stages, config.chunks
    if dist.get_world_size(group) != p:
        raise ValueError(f"num_stages={p} needs a group of as many ranks; this one has "
                         f"{dist.get_world_size(group)}")
    workload, dev = config.workload, device()
    model = workload.build_model().to(dev)
    indices = stage_indices(config.schedule, p, rank)
    pieces = [stage_layers(model, p * v, k)[0] for k in indices]
    stages = [pipelining.PipelineStage(piece, k, p * v, dev, group=group)
              for piece, k in zip(pieces, indices)]
    schedule_class = getattr(pipelining, config.schedule)
    schedule = schedule_class(stages if v > 1 else stages[0], config.num_microbatches,
                              loss_fn=workload.loss)
    params = [q for piece in pieces for q in piece.parameters() if q.requires_grad]
    optimizer = workload.optimizer(params) if params else None   # chunks of ReLUs have none
    holds_first, holds_last = 0 in indices, p * v - 1 in indices
    losses = []
    for X, y in workload.batches():
        per_microbatch = []
        targets = dict(target=y.to(dev), losses=per_microbatch) if holds_last else {}
        schedule.step(*([X.to(dev)] if holds_first else []), **targets)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()
        if holds_last:           # equal microbatches: the batch's loss is their mean
            losses.append(sum(t.detach().item() for t in per_microbatch) / len(per_microbatch))
    return {"rank": dist.get_rank(), "stages": indices, "losses": losses, "config": config}


def reference(config: TorchPipelineConfig) -> list[float]:
    """The unsplit model trained in one process: the losses the run must report."""
    return train_reference(config.workload)


def start(config: TorchPipelineConfig, **launch_kwargs):
    """:func:`distlab.start` :func:`train` on ``num_stages`` ranks, the data loaded once here."""
    from distlab.launcher import start as _start
    config = replace(config, workload=config.workload.loaded())
    return _start(train, config.num_stages, config, **launch_kwargs)


def run(config: TorchPipelineConfig, **launch_kwargs) -> list[dict]:
    """Like :func:`start`, but wait and return every rank's result."""
    return start(config, **launch_kwargs).result()


def stage_indices(schedule: str, num_stages: int, rank: int) -> list[int]:
    """The virtual stages ``rank`` holds under PyTorch's ``schedule``: its own index, or two
    chunks, looped (r, r + p) or in a V (r, 2p - 1 - r: ZB-V, DualPipeV)."""
    if TORCH_SCHEDULES[schedule]["chunks"] == 1:
        return [rank]
    if schedule in ("ScheduleZBVZeroBubble", "ScheduleDualPipeV"):
        return [rank, 2 * num_stages - 1 - rank]
    return [rank, rank + num_stages]
