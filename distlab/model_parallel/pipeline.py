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
so one step equals one full-batch step of the unsplit model. That holds for layers that
treat examples independently; BatchNorm normalizes over each microbatch instead of the
batch, so a stage holding one is refused unless ``m = 1``.

Cost (alpha-beta): per microbatch, each stage boundary sends the activation (mb x width
values) forward and its gradient back, each after a small header that carries its dtype
and shape: 2(p - 1) m messages of alpha + n beta per step.
Point to point uses ``isend`` for sends and blocking ``recv`` for receives: sends never
wait, so neither schedule can deadlock. (``batch_isend_irecv`` would hang on gloo.)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torch import nn

from distlab import comm
from distlab.checks import is_int, is_number, require, require_arg
from distlab.launcher import device
from distlab.metrics import report
from distlab.model_parallel.timeline import ActivationMeter, Timeline
from distlab.problems.workloads import Workload, train_reference

SCHEDULES = ("gpipe", "1f1b")
# What a stage may hand to the next one; a message's header names it by its index here.
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64)
HEADER = 8          # int64s in a message header: dtype index, ndim, then up to 6 sizes


@dataclass(frozen=True)
class PipelineConfig:
    """How a workload is pipelined; validated (split included) before launch."""
    workload: Workload = field(default_factory=Workload)
    """What is trained: the model cut into stages, its batches, loss and optimizer."""
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
        require(self, "workload", isinstance(self.workload, Workload)
                and self.workload.model in ("mlp", "transformer"),
                "a distlab.problems.workloads.Workload of model 'mlp' or 'transformer' (a "
                "sequence of layers to cut into stages; 'linear' is one layer)")
        for name in ("num_stages", "num_microbatches"):
            v = getattr(self, name)
            require(self, name, is_int(v) and 1 <= v <= 64, "an int in 1..64")
        require(self, "schedule", self.schedule in SCHEDULES, f"one of {SCHEDULES}")
        require(self, "compute_delay",
                is_number(self.compute_delay) and 0 <= self.compute_delay <= 1, "[0, 1] seconds")
        require(self, "num_microbatches", self.num_microbatches <= self.workload.batch_size,
                f"at most batch_size={self.workload.batch_size}: every microbatch needs an "
                "example")
        partition(len(self.workload.build_model()), self.num_stages)

    @property
    def world_size(self) -> int:
        """One rank per stage."""
        return self.num_stages


def train(config: PipelineConfig, group=None) -> dict:
    """Worker: pipelined training of ``config.workload`` on the ``num_stages`` ranks of
    ``group`` (default: the world); stage ``s`` is the group's rank ``s``.

    Returns this rank's ``losses`` (last stage only), timeline ``events``, peak stashed
    microbatches and activation bytes, and its communication ``by_op``.
    """
    stage_index, workload = dist.get_rank(group), config.workload
    if dist.get_world_size(group) != config.num_stages:
        raise ValueError(f"num_stages={config.num_stages} needs a group of as many ranks; "
                         f"this one has {dist.get_world_size(group)}")
    model = workload.build_model()
    layers = partition(len(model), config.num_stages)[stage_index]
    dev = device()                    # the CPU on gloo, this rank's GPU on NCCL
    stage = PipelineStage(nn.Sequential(*list(model)[layers.start: layers.stop]).to(dev),
                          stage_index, config, group)
    params = [p for p in stage.layers.parameters() if p.requires_grad]
    optimizer = workload.optimizer(params) if params else None   # a stage of ReLUs has none
    comm.barrier(group)               # start every rank's clock together
    stage.timeline.t0 = time.perf_counter()
    comm.ledger().reset()
    losses = []
    for step, (X, y) in enumerate(workload.batches()):
        # Line the stages up, so that each step's timeline starts together as in the papers'
        # figures (without it the last stage starts waiting while the first still finishes
        # the previous step, and the picture of one step shows the idle time of two).
        comm.barrier(group)
        loss = stage.train_step(X.to(dev), y.to(dev), workload.loss)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()
        if loss is not None:
            losses.append(loss)
            report(step=step, loss=loss, **comm.ledger().totals())
    return {"rank": dist.get_rank(), "layers": list(layers), "losses": losses,
            "events": stage.timeline.events, "peak_activations": stage.meter.peak_count,
            "peak_activation_bytes": stage.meter.peak_bytes, "config": config,
            "by_op": comm.ledger().by_op(), **comm.ledger().totals()}


def reference(config: PipelineConfig) -> list[float]:
    """The unsplit model trained in one process: the losses the last stage must report."""
    return train_reference(config.workload)


def start(config: PipelineConfig, **launch_kwargs):
    """:func:`distlab.start` :func:`train` on ``num_stages`` ranks, the data loaded once here;
    ``launch_kwargs`` go to the launcher (``timeout``, ``on_metrics``, ``on_output``, ...)."""
    from distlab.launcher import start as _start
    config = replace(config, workload=config.workload.loaded())
    return _start(train, config.world_size, config, **launch_kwargs)


def run(config: PipelineConfig, **launch_kwargs) -> list[dict]:
    """Like :func:`start`, but wait and return every rank's result."""
    return start(config, **launch_kwargs).result()


def sweep(configs: list[PipelineConfig], group=None) -> list[dict]:
    """Worker: :func:`train` for several configs in one launch (same number of stages)."""
    return [train(c, group) for c in configs]


def bubble_fraction(num_stages: int, num_microbatches: int) -> float:
    """The ideal bubble ``(p - 1) / (m + p - 1)`` (Narayanan et al. 2021, eq. 1)."""
    _require_ints(num_stages=num_stages, num_microbatches=num_microbatches)
    return (num_stages - 1) / (num_microbatches + num_stages - 1)


def partition(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous, balanced layer ranges; with a remainder the first stages get one more."""
    _require_ints(num_layers=num_layers, num_stages=num_stages)
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
    if name not in SCHEDULES:
        raise ValueError(f"name={name!r} is not a schedule; allowed one of {SCHEDULES}")
    _require_ints(num_stages=num_stages, num_microbatches=num_microbatches)
    _require_ints(low=0, high=num_stages - 1, stage=stage)
    m = num_microbatches
    if name == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    warmup = min(num_stages - stage - 1, m)
    ops = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):              # steady state: one forward, one backward
        ops += [("F", warmup + i), ("B", i)]
    return ops + [("B", i) for i in range(m - warmup, m)]   # cool-down


def _require_ints(low: int = 1, high: int | None = None, **values) -> None:
    """Raise ValueError naming the first of ``values`` that is not an int in [low, high]."""
    for name, v in values.items():
        if not (is_int(v) and v >= low and (high is None or v <= high)):
            allowed = f"an int >= {low}" if high is None else f"an int in {low}..{high}"
            require_arg(name, v, False, allowed)


class PipelineStage:
    """One stage: its layers, its neighbours, and the schedule that drives it.

    Activations may be any dtype of ``DTYPES`` (the header says which); a gradient
    goes back for every floating-point activation. A stage may have no parameters, or
    only frozen ones.

    Args:
        layers: this stage's slice of the model.
        stage: this stage's index, its rank in ``group``.
        config: the schedule, ``num_stages`` and ``num_microbatches``.
        group: the pipeline's process group (default: the world).
    """

    def __init__(self, layers: nn.Module, stage: int, config: PipelineConfig, group=None):
        _require_ints(low=0, high=config.num_stages - 1, stage=stage)
        batch_norms = [type(m).__name__ for m in layers.modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if batch_norms and config.num_microbatches > 1:
            raise ValueError(
                f"stage {stage} holds {batch_norms[0]}, which normalizes over each of the "
                f"num_microbatches={config.num_microbatches} microbatches, not over the "
                "batch: the pipeline would not equal the unsplit model; use "
                "num_microbatches=1, or a per-example norm (LayerNorm, GroupNorm)")
        self.layers, self.stage, self.config, self.group = layers, stage, config, group
        num_stages = config.num_stages
        peer = lambda s: dist.get_global_rank(group, s) if group is not None else s
        self.prev = peer(stage - 1) if stage > 0 else None
        self.next = peer(stage + 1) if stage < num_stages - 1 else None
        self.timeline = Timeline(dist.get_rank())
        self.meter = ActivationMeter(list(layers.parameters()))
        self._pending = []   # isend handles and their tensors, kept alive until done

    def train_step(self, X, y, loss_fn):
        """Forward and backward of one batch by ``config.schedule``; gradients accumulate.

        Every stage is given the batch (the first reads ``X``, the last ``y``); receive
        buffers go on its device. Returns the batch's loss on the last stage, None elsewhere.
        """
        c = self.config
        xs, ys = X.tensor_split(c.num_microbatches), y.tensor_split(c.num_microbatches)
        inputs, outputs, total = {}, {}, 0.0
        for op, i in schedule(c.schedule, c.num_stages, c.num_microbatches, self.stage):
            if op == "F":
                x = xs[i] if self.prev is None else self._recv(self.prev, i, X.device)
                if x.is_floating_point() and self.prev is not None:
                    x.requires_grad_()       # its gradient goes back to the previous stage
                with self.timeline.span("forward", i), self.meter.forward(i):
                    out = self.layers(x)
                    if self.next is None:    # this microbatch's share of the batch's mean
                        out = loss_fn(out, ys[i]) * (len(ys[i]) / len(y))
                        total += out.item()
                    time.sleep(c.compute_delay)
                self.meter.forward_done()
                inputs[i], outputs[i] = x, out
                if self.next is not None:
                    self._send(out, self.next, i)
            else:
                out = outputs.pop(i)
                grad = None
                if self.next is not None and out.is_floating_point():
                    grad = self._recv(self.next, i, X.device)
                with self.timeline.span("backward", i):
                    if out.requires_grad:    # False: nothing before it is trainable
                        out.backward(grad)
                    time.sleep(2 * c.compute_delay)
                self.meter.backward_done(i)
                x = inputs.pop(i)
                if self.prev is not None and x.is_floating_point():
                    # An input the layers did not use has no gradient: it is zero.
                    self._send(x.grad if x.grad is not None else torch.zeros_like(x),
                               self.prev, i)
        with self.timeline.span("send", -1):      # flush: every send has been received
            for work, _ in self._pending:
                work.wait()
        self._pending.clear()
        self.timeline.step += 1
        return total if self.next is None else None

    def _send(self, t: torch.Tensor, dst: int, microbatch: int):
        if t.dtype not in DTYPES or t.dim() > HEADER - 2:
            raise ValueError(f"stage {self.stage} would send a {t.dtype} tensor of shape "
                             f"{tuple(t.shape)}; a stage boundary carries one of {DTYPES} "
                             f"with at most {HEADER - 2} dimensions")
        with self.timeline.span("send", microbatch):
            sizes = [DTYPES.index(t.dtype), t.dim(), *t.shape]
            header = torch.tensor(sizes + [0] * (HEADER - len(sizes)), device=t.device)
            t = t.detach().contiguous()
            self._pending += [(comm.isend(header, dst, self.group), header),
                              (comm.isend(t, dst, self.group), t)]

    def _recv(self, src: int, microbatch: int, device: torch.device) -> torch.Tensor:
        # The header arrives when the peer has its tensor ready: waiting for it is idle
        # time (the bubble); the payload that follows is the transfer itself.
        header = torch.empty(HEADER, dtype=torch.long, device=device)
        with self.timeline.span("idle", microbatch):
            comm.recv(header, src, self.group)
        dtype, ndim, *sizes = header.tolist()
        with self.timeline.span("recv", microbatch):
            t = torch.empty(sizes[:ndim], dtype=DTYPES[dtype], device=device)
            comm.recv(t, src, self.group)
        return t
