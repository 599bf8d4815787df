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

Two more, whose orders :mod:`distlab.model_parallel.schedules` gives (with their bubbles):
**interleaved 1F1B** (``v = virtual_stages`` chunks of layers per rank, chunk c of rank s
being virtual stage c·p + s; Narayanan et al. 2021, section 2.2.2) and **ZB-H1** (Qi et al.
2024: the backward split into B, the input's gradient, sent back at once, and W, the
weight gradients, deferred into the cool-down; section 3).

With equal forward and backward times the pipeline idles at its start and end for a
fraction ``(p - 1) / (m + p - 1)`` of the time (the *bubble*, Narayanan et al. eq. 1):
more microbatches, smaller bubble.

Gradients accumulate over the microbatches (each loss scaled by its share of the batch),
so one step equals one full-batch step of the unsplit model. That holds for layers that
treat examples independently; BatchNorm normalizes over each microbatch instead of the
batch, so a stage holding one is refused unless ``m = 1``.

Cost (alpha-beta): per microbatch, each stage boundary sends the activation (mb x width
values) forward and its gradient back, each after a small header that carries its dtype
and shape: 2(p - 1) m transfers per step (2(p v - 1) m interleaved), each two messages: a
header of alpha + 64 beta and the tensor of alpha + n beta.
Sends are ``isend`` s, receives blocking ``recv`` s, each tagged with its microbatch, virtual
stage and direction: sends never wait and no message is taken for another, so no schedule
whose order of work respects its dependencies can deadlock.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torch import nn

from distlab import comm
from distlab.checks import is_int, is_number, require
from distlab.launcher import device
from distlab.metrics import report
from distlab.model_parallel.schedules import (ALL_SCHEDULES, SPLIT_BACKWARD, bubble_formula,
                                              ops, partition, require_ints, stage_layers)
from distlab.model_parallel.timeline import ActivationMeter, Timeline
from distlab.problems.workloads import Workload, train_reference

SCHEDULES = ("gpipe", "1f1b")
"""The two classic schedules (lab 05 sweeps them); every schedule: ``ALL_SCHEDULES``."""
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
    """``"gpipe"`` (all forward, all backward), ``"1f1b"`` (one forward, one backward),
    ``"interleaved"`` (1F1B over ``virtual_stages`` chunks per rank) or ``"zb-h1"`` (1F1B
    with the backward split into B and a deferred W)."""
    compute_delay: float = 0.0
    """Seconds each forward sleeps (backward: twice that; under ``"zb-h1"`` its B and its W
    once each, so F : B : W = 1 : 1 : 1; under ``"interleaved"`` a chunk sleeps 1/v of
    it): a stand-in for a bigger model's compute, so on a small shared machine the
    schedule, not the noise, shapes the timeline."""
    virtual_stages: int = 1
    """Model chunks per rank (v), for ``"interleaved"`` only: the layers are cut into p·v
    chunks, rank s holding chunks s, s + p, ...; other schedules hold one."""

    def __post_init__(self):
        require(self, "workload", isinstance(self.workload, Workload)
                and self.workload.model in ("mlp", "transformer"),
                "a distlab.problems.workloads.Workload of model 'mlp' or 'transformer' (a "
                "sequence of layers to cut into stages; 'linear' is one layer)")
        for name in ("num_stages", "num_microbatches"):
            v = getattr(self, name)
            require(self, name, is_int(v) and 1 <= v <= 64, "an int in 1..64")
        require(self, "schedule", self.schedule in ALL_SCHEDULES, f"one of {ALL_SCHEDULES}")
        require(self, "virtual_stages", is_int(self.virtual_stages)
                and 1 <= self.virtual_stages <= 8, "an int in 1..8")
        require(self, "compute_delay",
                is_number(self.compute_delay) and 0 <= self.compute_delay <= 1, "[0, 1] seconds")
        require(self, "num_microbatches", self.num_microbatches <= self.workload.batch_size,
                f"at most batch_size={self.workload.batch_size}: every microbatch needs an "
                "example")
        if self.schedule == "interleaved":
            require(self, "num_microbatches", self.num_microbatches % self.num_stages == 0,
                    f"a multiple of num_stages={self.num_stages} under schedule "
                    "'interleaved' (Megatron-LM's order sends microbatches round the ranks "
                    "in groups of p)")
        num_layers, p = len(self.workload.build_model()), self.num_stages
        require(self, "virtual_stages", p * self.chunks <= num_layers or self.chunks == 1,
                f"at most {num_layers // p} on {p} stages (every chunk needs one of the "
                f"model's {num_layers} layers)")
        partition(num_layers, p)

    @property
    def world_size(self) -> int:
        """One rank per stage."""
        return self.num_stages

    @property
    def chunks(self) -> int:
        """Model chunks per rank: ``virtual_stages`` under ``"interleaved"``, else 1."""
        return self.virtual_stages if self.schedule == "interleaved" else 1


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
    p = config.num_stages             # this rank's virtual stages are s, s + p, ...
    layers = [i for r in partition(len(model), p * config.chunks)[stage_index::p] for i in r]
    dev = device()                    # the CPU on gloo, this rank's GPU on NCCL
    stage = PipelineStage(stage_layers(model.to(dev), p, stage_index, config.chunks),
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
    return {"rank": dist.get_rank(), "layers": layers, "losses": losses,
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
    return bubble_formula("1f1b", num_stages, num_microbatches)


def schedule(name: str, num_stages: int, num_microbatches: int, stage: int) -> list[tuple]:
    """The order of work on ``stage``: ``[("F", i) or ("B", i), ...]`` (and ``("W", i)`` under
    ``"zb-h1"``); with chunks: :func:`distlab.model_parallel.schedules.ops`."""
    if name not in ALL_SCHEDULES:
        raise ValueError(f"name={name!r} is not a schedule; allowed one of {ALL_SCHEDULES}")
    return [(op.kind, op.microbatch) for op in ops(name, num_stages, num_microbatches, stage)]


class PipelineStage:
    """One stage: its layers, its neighbours, and the schedule that drives it.

    Activations may be any dtype of ``DTYPES`` (the header says which); a gradient
    goes back for every floating-point activation. A stage may have no parameters, or
    only frozen ones.

    Args:
        layers: this stage's slice of the model, or a list of its chunks (one, or under
            ``"interleaved"`` ``virtual_stages``: chunk c is virtual stage c·p + stage).
        stage: this stage's index, its rank in ``group``.
        config: the schedule, ``num_stages``, ``num_microbatches`` (and ``virtual_stages``).
        group: the pipeline's process group (default: the world).
    """

    def __init__(self, layers, stage: int, config: PipelineConfig, group=None):
        require_ints(low=0, high=config.num_stages - 1, stage=stage)
        chunks = list(layers) if isinstance(layers, (list, tuple, nn.ModuleList)) else [layers]
        if len(chunks) != config.chunks or not all(isinstance(c, nn.Module) for c in chunks):
            raise ValueError(f"schedule={config.schedule!r} with virtual_stages="
                             f"{config.virtual_stages} needs {config.chunks} module(s) per "
                             f"stage, one per chunk; stage {stage} was given {layers!r:.80}")
        batch_norms = [type(m).__name__ for c in chunks for m in c.modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if batch_norms and config.num_microbatches > 1:
            raise ValueError(
                f"stage {stage} holds {batch_norms[0]}, which normalizes over each of the "
                f"num_microbatches={config.num_microbatches} microbatches, not over the "
                "batch: the pipeline would not equal the unsplit model; use "
                "num_microbatches=1, or a per-example norm (LayerNorm, GroupNorm)")
        self.layers = chunks[0] if len(chunks) == 1 else nn.ModuleList(chunks)
        self.chunks, self.stage, self.config, self.group = chunks, stage, config, group
        p = config.num_stages
        self.last = p * len(chunks) - 1                # the last virtual stage's index
        peer = lambda s: dist.get_global_rank(group, s) if group is not None else s
        # Chunk c is virtual stage k = c·p + stage; its neighbours are virtual stages k ± 1.
        self.prev = [peer((c * p + stage - 1) % p) if c * p + stage > 0 else None
                     for c in range(len(chunks))]
        self.next = [peer((c * p + stage + 1) % p) if c * p + stage < self.last else None
                     for c in range(len(chunks))]
        self.timeline = Timeline(dist.get_rank())
        self.meter = ActivationMeter(list(self.layers.parameters()))
        self._pending = []   # isend handles and their tensors, kept alive until done

    def train_step(self, X, y, loss_fn):
        """Forward and backward of one batch by ``config.schedule``; gradients accumulate.

        Every stage is given the batch (the first reads ``X``, the last ``y``); receive
        buffers go on its device. Returns the batch's loss on the last stage, None elsewhere.
        """
        c = self.config
        xs, ys = X.tensor_split(c.num_microbatches), y.tensor_split(c.num_microbatches)
        split = c.schedule in SPLIT_BACKWARD
        # Sleeps: a chunk is 1/v of the stage; an unsplit backward is B + W.
        delay = {"F": c.compute_delay / c.chunks, "B": c.compute_delay * (1 + (not split))
                 / c.chunks, "W": c.compute_delay}
        inputs, outputs, out_grads, total = {}, {}, {}, 0.0
        for kind, i, chunk in ops(c.schedule, c.num_stages, c.num_microbatches, self.stage,
                                  c.chunks):
            k, key = chunk * c.num_stages + self.stage, (i, chunk)   # virtual stage
            prev, nxt = self.prev[chunk], self.next[chunk]
            if kind == "F":
                x = xs[i] if prev is None else self._recv(prev, i, X.device, _tag(i, k, 0))
                if x.is_floating_point() and prev is not None:
                    x.requires_grad_()       # its gradient goes back to the previous stage
                with self.timeline.span("forward", i, op="F", chunk=chunk), \
                        self.meter.forward(key):
                    out = self.chunks[chunk](x)
                    if nxt is None:          # this microbatch's share of the batch's mean
                        out = loss_fn(out, ys[i]) * (len(ys[i]) / len(y))
                        total += out.item()
                    time.sleep(delay["F"])
                self.meter.forward_done()
                inputs[key], outputs[key] = x, out
                if nxt is not None:
                    self._send(out, nxt, i, _tag(i, k + 1, 0))
            elif kind == "B":
                out, x, grad = outputs[key], inputs[key], None
                if nxt is not None and out.is_floating_point():
                    grad = self._recv(nxt, i, X.device, _tag(i, k, 1))
                with self.timeline.span("backward", i, op="B", chunk=chunk):
                    x_grad = _input_grad(out, x, grad, whole=not split)
                    time.sleep(delay["B"])
                if split:                    # W needs the graph and the output's gradient
                    out_grads[key] = grad
                else:
                    self._release(key, inputs, outputs)
                if prev is not None and x.is_floating_point():
                    # An input the layers did not use has no gradient: it is zero.
                    self._send(x_grad if x_grad is not None else torch.zeros_like(x),
                               prev, i, _tag(i, k - 1, 1))
            else:                            # W: the weight gradients B left for later
                out, grad = outputs[key], out_grads.pop(key)
                params = [q for q in self.chunks[chunk].parameters() if q.requires_grad]
                with self.timeline.span("backward", i, op="W", chunk=chunk):
                    if out.requires_grad and params:
                        torch.autograd.backward(out, grad, inputs=params)   # accumulates
                    time.sleep(delay["W"])
                self._release(key, inputs, outputs)
        with self.timeline.span("send", -1):      # flush: every send has been received
            for work, _ in self._pending:
                work.wait()
        self._pending.clear()
        self.timeline.step += 1
        return total if self.next[-1] is None else None

    def _release(self, key, inputs, outputs):
        """The microbatch's last backward pass is done: its activations may go."""
        del inputs[key], outputs[key]
        self.meter.backward_done(key)

    def _send(self, t: torch.Tensor, dst: int, microbatch: int, tag: int = 0):
        if t.dtype not in DTYPES or t.dim() > HEADER - 2:
            raise ValueError(f"stage {self.stage} would send a {t.dtype} tensor of shape "
                             f"{tuple(t.shape)}; a stage boundary carries one of {DTYPES} "
                             f"with at most {HEADER - 2} dimensions")
        with self.timeline.span("send", microbatch):
            sizes = [DTYPES.index(t.dtype), t.dim(), *t.shape]
            header = torch.tensor(sizes + [0] * (HEADER - len(sizes)), device=t.device)
            t = t.detach().contiguous()
            self._pending += [(comm.isend(header, dst, self.group, tag), header),
                              (comm.isend(t, dst, self.group, tag), t)]

    def _recv(self, src: int, microbatch: int, device: torch.device,
              tag: int = 0) -> torch.Tensor:
        # The header arrives when the peer has its tensor ready: waiting for it is idle
        # time (the bubble); the payload that follows is the transfer itself.
        header = torch.empty(HEADER, dtype=torch.long, device=device)
        with self.timeline.span("idle", microbatch):
            comm.recv(header, src, self.group, tag)
        dtype, ndim, *sizes = header.tolist()
        with self.timeline.span("recv", microbatch):
            t = torch.empty(sizes[:ndim], dtype=DTYPES[dtype], device=device)
            comm.recv(t, src, self.group, tag)
        return t


def _tag(microbatch: int, virtual_stage: int, direction: int) -> int:
    """The message tag of microbatch's activation (direction 0) into, or gradient (1) out of
    ``virtual_stage``: unique within a step (at most 64 microbatches, 512 virtual stages)."""
    return (microbatch * 512 + virtual_stage) * 2 + direction


def _input_grad(out, x, grad, whole: bool):
    """The backward of ``out`` (with output gradient ``grad``): the whole of it (``whole``;
    weight gradients accumulate in ``.grad``), or only its gradient with respect to ``x``
    (B of a split backward: the graph is kept for W). Returns the input's gradient or None."""
    if not out.requires_grad:                # nothing before it is trainable
        return None
    if whole:
        out.backward(grad)
        return x.grad
    if not x.requires_grad:                  # the first stage: B has nothing to compute
        return None
    return torch.autograd.grad(out, x, grad, retain_graph=True, allow_unused=True)[0]
