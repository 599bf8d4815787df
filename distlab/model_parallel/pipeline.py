"""Pipeline parallelism: the model cut into stages, microbatches flowing through them.

Rank ``s`` holds a contiguous slice of the layers (stage ``s``). A batch is cut into ``m``
microbatches; activations go forward from stage s to s+1 and their gradients come back,
point to point. Two schedules decide the order of work on each rank:

* **GPipe** (Huang et al. 2019, section 2.2): all ``m`` forwards, then all ``m`` backwards.
  Every stage keeps the activations of all ``m`` microbatches until their backward.
* **1F1B** (PipeDream-Flush; Narayanan et al. 2021, section 2.2.1, figure 4): stage s runs
  ``p - s - 1`` warm-up forwards, then alternates one forward, one backward, then drains.
  Same bubble, but at most ``p - s`` microbatches are in flight: activation memory is
  bounded by the number of stages instead of the number of microbatches.

With equal forward and backward times the pipeline idles at its start and end for a
fraction ``(p - 1) / (m + p - 1)`` of the time (the *bubble*, Narayanan et al. eq. 1):
more microbatches, smaller bubble.

Gradients accumulate over the microbatches (each loss scaled by its share of the batch),
so one step equals one full-batch step of the unsplit model.

Cost (alpha-beta): per microbatch, each stage boundary sends the activation (mb x width
floats) forward and its gradient back: 2(p - 1) m messages of alpha + n beta per step.
Point to point uses ``isend`` for sends and blocking ``recv`` for receives: sends never
wait, so neither schedule can deadlock. (``batch_isend_irecv`` would hang on gloo.)
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from distlab import comm
from distlab.checks import is_int, is_number, require
from distlab.launcher import device
from distlab.metrics import report
from distlab.problems.workloads import Workload

SCHEDULES = ("gpipe", "1f1b")
HEADER = 8          # int64s in a message header: ndim, then the shape


@dataclass(frozen=True)
class PipelineConfig:
    """How the model is pipelined; validated before launch."""
    num_stages: int = 2
    """Pipeline stages, one rank each."""
    num_microbatches: int = 4
    """Microbatches each batch is cut into (m)."""
    schedule: str = "1f1b"
    """``"gpipe"`` (all forward, all backward) or ``"1f1b"`` (one forward, one backward)."""
    compute_delay: float = 0.0
    """Seconds each forward sleeps (backward: twice that): a stand-in for a bigger model's
    compute, so on a small shared machine the schedule, not the noise, shapes the timeline."""

    def __post_init__(self):
        for name in ("num_stages", "num_microbatches"):
            v = getattr(self, name)
            require(self, name, is_int(v) and 1 <= v <= 64, "an int in 1..64")
        require(self, "schedule", self.schedule in SCHEDULES, f"one of {SCHEDULES}")
        require(self, "compute_delay",
                is_number(self.compute_delay) and 0 <= self.compute_delay <= 1, "[0, 1] seconds")


def bubble_fraction(num_stages: int, num_microbatches: int) -> float:
    """The ideal bubble ``(p - 1) / (m + p - 1)`` (Narayanan et al. 2021, eq. 1)."""
    return (num_stages - 1) / (num_microbatches + num_stages - 1)


def partition(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous, balanced layer ranges; with a remainder the first stages get one more."""
    if num_stages > num_layers:
        raise ValueError(f"num_stages={num_stages} is more than the model's {num_layers} "
                         f"layers: every stage needs at least one; use num_stages <= "
                         f"{num_layers}")
    size, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for s in range(num_stages):
        bounds.append(bounds[-1] + size + (s < extra))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def schedule(name: str, num_stages: int, num_microbatches: int, stage: int) -> list[tuple]:
    """The order of work on ``stage``: ``[("F", i) or ("B", i), ...]``."""
    m = num_microbatches
    if name == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    warmup = min(num_stages - stage - 1, m)
    ops = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):              # steady state: one forward, one backward
        ops += [("F", warmup + i), ("B", i)]
    return ops + [("B", i) for i in range(m - warmup, m)]   # cool-down


class Timeline:
    """This rank's record of what it did when: forward, backward, send, recv, idle."""

    def __init__(self, rank: int):
        self.rank, self.events, self.t0, self.step = rank, [], time.perf_counter(), 0

    @contextmanager
    def span(self, kind: str, microbatch: int):
        """Record the time spent in the ``with`` block as one event."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.events.append(dict(rank=self.rank, step=self.step, kind=kind,
                                    microbatch=microbatch, start=start - self.t0,
                                    end=time.perf_counter() - self.t0))


class ActivationMeter:
    """Bytes autograd saves for backward, per microbatch in flight, and their peak.

    A ``saved_tensors_hooks`` pair sees every tensor the forward pass stashes; parameters
    are not activations and are left out, and a tensor saved twice is counted once.
    """

    def __init__(self, params):
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self.live: dict[int, int] = {}
        self.peak_count = self.peak_bytes = 0

    def forward(self, microbatch: int):
        seen, live = set(), self.live
        live[microbatch] = 0

        def pack(t):
            key = (t.data_ptr(), t.numel())
            if t.untyped_storage().data_ptr() not in self.param_ptrs and key not in seen:
                seen.add(key)
                live[microbatch] += t.numel() * t.element_size()
            return t
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def forward_done(self):
        self.peak_count = max(self.peak_count, len(self.live))
        self.peak_bytes = max(self.peak_bytes, sum(self.live.values()))

    def backward_done(self, microbatch: int):
        del self.live[microbatch]


class PipelineStage:
    """One stage: its layers, its neighbours, and the schedule that drives it.

    Args:
        layers: this stage's slice of the model.
        stage: this stage's index; ``num_stages``: how many there are.
        group: the pipeline's process group; stage ``s`` is its rank ``s``.
    """

    def __init__(self, layers: nn.Module, stage: int, num_stages: int, group=None):
        self.layers, self.stage, self.num_stages, self.group = layers, stage, num_stages, group
        peer = lambda s: dist.get_global_rank(group, s) if group is not None else s
        self.prev = peer(stage - 1) if stage > 0 else None
        self.next = peer(stage + 1) if stage < num_stages - 1 else None
        self.device = device()       # receive buffers: the CPU on gloo, the GPU on NCCL
        self.timeline = Timeline(dist.get_rank())
        self.meter = ActivationMeter(list(layers.parameters()))
        self._pending = []   # isend handles and their tensors, kept alive until done

    def _send(self, t: torch.Tensor, dst: int, microbatch: int):
        with self.timeline.span("send", microbatch):
            header = torch.zeros(HEADER, dtype=torch.long, device=self.device)
            header[0], header[1: 1 + t.dim()] = t.dim(), torch.tensor(t.shape)
            t = t.detach().contiguous()
            self._pending += [(comm.isend(header, dst, self.group), header),
                              (comm.isend(t, dst, self.group), t)]

    def _recv(self, src: int, microbatch: int) -> torch.Tensor:
        # The header arrives when the peer has its tensor ready: waiting for it is idle
        # time (the bubble); the payload that follows is the transfer itself.
        header = torch.empty(HEADER, dtype=torch.long, device=self.device)
        with self.timeline.span("idle", microbatch):
            comm.recv(header, src, self.group)
        with self.timeline.span("recv", microbatch):
            t = torch.empty(header[1: 1 + header[0]].tolist(), device=self.device)
            comm.recv(t, src, self.group)
        return t

    def train_step(self, X, y, loss_fn, config: PipelineConfig):
        """Forward and backward of one batch by ``config.schedule``; gradients accumulate.

        Returns the batch's loss on the last stage, None elsewhere.
        """
        m = config.num_microbatches
        xs, ys = X.tensor_split(m), y.tensor_split(m)
        inputs, outputs, total = {}, {}, 0.0
        for op, i in schedule(config.schedule, self.num_stages, m, self.stage):
            if op == "F":
                x = xs[i] if self.prev is None else self._recv(self.prev, i).requires_grad_()
                with self.timeline.span("forward", i), self.meter.forward(i):
                    out = self.layers(x)
                    if self.next is None:    # this microbatch's share of the batch's mean
                        out = loss_fn(out, ys[i]) * (len(ys[i]) / len(y))
                        total += out.item()
                    time.sleep(config.compute_delay)
                self.meter.forward_done()
                inputs[i], outputs[i] = x, out
                if self.next is not None:
                    self._send(out, self.next, i)
            else:
                grad = None if self.next is None else self._recv(self.next, i)
                with self.timeline.span("backward", i):
                    outputs.pop(i).backward(grad)
                    time.sleep(2 * config.compute_delay)
                self.meter.backward_done(i)
                x = inputs.pop(i)
                if self.prev is not None:
                    self._send(x.grad, self.prev, i)
        with self.timeline.span("send", -1):      # flush: every send has been received
            for work, _ in self._pending:
                work.wait()
        self._pending.clear()
        self.timeline.step += 1
        return total if self.next is None else None


def check(config: PipelineConfig, workload: Workload) -> None:
    """Refuse, before launch, a pipeline that cannot run this workload."""
    partition(len(workload.build_model()), config.num_stages)
    if workload.batch_size < config.num_microbatches:
        raise ValueError(f"num_microbatches={config.num_microbatches} is more than "
                         f"batch_size={workload.batch_size}: every microbatch needs an example")


def train(config: PipelineConfig, workload: Workload) -> dict:
    """Worker: pipelined training of ``workload`` (launch on ``config.num_stages`` ranks).

    Returns this rank's ``losses`` (last stage only), timeline ``events``, peak stashed
    microbatches and activation bytes, and its communication ``by_op``.
    """
    rank = dist.get_rank()
    model = workload.build_model()
    layers = partition(len(model), config.num_stages)[rank]
    dev = device()                    # the CPU on gloo, this rank's GPU on NCCL
    stage = PipelineStage(nn.Sequential(*list(model)[layers.start: layers.stop]).to(dev),
                          rank, config.num_stages)
    params = list(stage.layers.parameters())     # a stage of ReLUs alone has none
    optimizer = workload.optimizer(params) if params else None
    comm.barrier()                    # start every rank's clock together
    stage.timeline.t0 = time.perf_counter()
    comm.ledger().reset()
    losses = []
    for step, (X, y) in enumerate(workload.batches()):
        # Line the stages up, so that each step's timeline starts together as in the papers'
        # figures (without it the last stage starts waiting while the first still finishes
        # the previous step, and the picture of one step shows the idle time of two).
        comm.barrier()
        loss = stage.train_step(X.to(dev), y.to(dev), workload.loss, config)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()
        if loss is not None:
            losses.append(loss)
            report(step=step, loss=loss, **comm.ledger().totals())
    return {"rank": rank, "layers": list(layers), "losses": losses,
            "events": stage.timeline.events, "peak_activations": stage.meter.peak_count,
            "peak_activation_bytes": stage.meter.peak_bytes, "config": config,
            "by_op": comm.ledger().by_op(), **comm.ledger().totals()}


def sweep(configs: list[PipelineConfig], workload: Workload) -> list[dict]:
    """Worker: :func:`train` for several configs in one launch (same number of stages)."""
    return [train(c, workload) for c in configs]


def start(config: PipelineConfig, workload: Workload, **launch_kwargs):
    """Check the split, then :func:`distlab.start` :func:`train` on ``num_stages`` ranks."""
    from distlab.launcher import start as _start
    check(config, workload)
    return _start(train, config.num_stages, config, workload.loaded(), **launch_kwargs)


def run(config: PipelineConfig, workload: Workload, **launch_kwargs) -> list[dict]:
    """Like :func:`start`, but wait and return every rank's result."""
    return start(config, workload, **launch_kwargs).result()


# ----------------------------------------------------------------------------------------
# Reading the timelines.
# ----------------------------------------------------------------------------------------

def measured_bubble(results: list[dict], step: int = -1) -> float:
    """Fraction of rank-time not spent in forward or backward during ``step``.

    ``1 - (sum of compute) / (p x makespan)``: it counts every kind of waiting, so on a real
    machine it is at least the ideal :func:`bubble_fraction`.
    """
    events = [e for r in results for e in r["events"]]
    step = step % (max(e["step"] for e in events) + 1)
    events = [e for e in events if e["step"] == step]
    makespan = max(e["end"] for e in events) - min(e["start"] for e in events)
    busy = sum(e["end"] - e["start"] for e in events if e["kind"] in ("forward", "backward"))
    return 1 - busy / (len(results) * makespan)


def summary(runs: list[list[dict]]):
    """One row per run and rank: schedule, m, measured and ideal bubble, peak activations."""
    import pandas as pd
    rows = []
    for results in runs:
        c = results[0]["config"]
        bubble = measured_bubble(results)
        for r in results:
            rows.append(dict(schedule=c.schedule, num_stages=c.num_stages,
                             num_microbatches=c.num_microbatches, rank=r["rank"],
                             measured_bubble=bubble,
                             ideal_bubble=bubble_fraction(c.num_stages, c.num_microbatches),
                             peak_activations=r["peak_activations"],
                             peak_activation_bytes=r["peak_activation_bytes"]))
    return pd.DataFrame(rows)
