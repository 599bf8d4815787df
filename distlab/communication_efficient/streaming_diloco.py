"""Streaming DiLoCo: DiLoCo's all-reduce cut into fragments, staggered, overlapped, quantized.

**Streaming DiLoCo** (Douillard et al. 2025, "Streaming DiLoCo with overlapping
communication", arXiv 2501.18512) changes three things in
:mod:`~distlab.communication_efficient.diloco`:

1. **Fragments** (section 2.2): the parameters are split, by layer and in order, into F
   fragments of about equal size (:func:`fragments`). Fragment f is synchronized every H
   inner steps too, but with an offset of f·H/F steps (after the inner steps t with
   ``(t + f·H/F) % H == 0``), so at most one fragment is on the wire at a time: the
   **peak** bandwidth falls by about F (by n / the largest fragment), the total stays.
2. **Overlap** (section 2.3): a fragment's all-reduce is started after inner step t and
   waited for only after inner step t + τ: the workers keep training meanwhile. When it
   lands, the outer Nesterov step updates the global fragment θ_f and each worker merges
   it into its local copy, ``θ_f,r <- α·θ_f,r + (1 − α)·θ_f`` (α = ``mixing``; 0 replaces
   it, as DiLoCo does). τ = 0 is no overlap.
3. **Quantized pseudo-gradients** (section 2.4; the paper: 4-bit E3M0 floats): here a
   *uniform* quantization to ``bits`` with one scale per fragment and sync, the largest
   ``|Δ|`` over ranks (a max all-reduce of one number), so that the all-reduce sums integer
   levels: exact in any order, which makes the run equal its one-process replay on any
   number of ranks. ``bits`` 8: levels -127..127 sent as float16 (integers up to 2048 are
   exact in float16: 16 ranks at most), half of float32's bytes; ``bits`` 4: levels -7..7
   sent as int8 (18 ranks at most), a quarter (the paper packs two 4-bit values a byte,
   an eighth, but packed values cannot be summed by an all-reduce); ``bits`` 32: float32,
   no quantization.

With F = 1, τ = 0, α = 0 and ``bits`` 32 this is DiLoCo, step for step.

Communication (alpha-beta model, n parameters, p ranks, b bytes per sent value): per H inner
steps, F all-reduces of about bn/F bytes each, one every H/F steps,
``2(p-1) alpha + 2(p-1)/p·(b·n/F) beta`` apiece (plus a max all-reduce of 4 bytes when
quantized); the peak per step is that of the largest fragment.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from distlab import comm, launcher
from distlab.checks import is_int, is_number, require
from distlab.communication_efficient.diloco import (DiLoCoConfig, Worker, assign_grads,
                                                    history_row, inner_step,
                                                    outer_optimizer, table)
from distlab.communication_efficient.local_training import (evaluate, flat, one_thread,
                                                            problem, rank_and_size,
                                                            sample_batches, with_data)
from distlab.metrics import report
from distlab.problems.workloads import Workload

WORKLOAD = Workload(model="mlp", hidden=32, depth=3, batch_size=32, lr=0.01,
                    optimizer_name="adamw", num_steps=200)
"""A digits MLP of four layers (2080, 1056, 1056 and 330 parameters), trained by AdamW."""

WIRE = {32: (torch.float32, None, launcher.MAX_WORLD_SIZE),
        8: (torch.float16, 127, 16), 4: (torch.int8, 7, 18)}
"""``bits: (dtype sent, largest level, most ranks whose sum of levels stays exact)``."""


@dataclass(frozen=True)
class StreamingDiLoCoConfig(DiLoCoConfig):
    """Streaming DiLoCo of a workload: DiLoCo's fields (``inner_steps`` H: steps between two
    synchronizations of a fragment), and fragment f synchronized with an offset of f·H/F."""
    workload: Workload = field(default_factory=lambda: WORKLOAD)
    """What is trained (an ``"mlp"`` workload: :data:`WORKLOAD` by default) and its inner
    optimizer; ``world_size`` is at most 16 with ``bits`` 8, 18 with 4."""
    num_fragments: int = 2
    """F: fragments, 1 to the model's layers; it divides ``inner_steps``."""
    overlap_steps: int = 1
    """τ: inner steps a fragment's all-reduce overlaps, 0 to H/F - 1 (0: no overlap)."""
    bits: int = 8
    """Pseudo-gradient precision on the wire: 32 (float32), 8 or 4 (see the module)."""
    mixing: float = 0.0
    """α: how much of its own fragment a worker keeps when the global one lands, [0, 1)."""

    def __post_init__(self):
        super().__post_init__()
        H, F = self.inner_steps, self.num_fragments
        layers = len(_layers(self.workload.build_model()))
        require(self, "num_fragments", is_int(F) and 1 <= F <= layers and H % F == 0,
                f"integers 1..{layers} (the model's layers) dividing inner_steps={H}")
        require(self, "overlap_steps", is_int(self.overlap_steps)
                and 0 <= self.overlap_steps < H // F, f"integers 0..{H // F - 1} (below H/F)")
        require(self, "bits", is_int(self.bits) and self.bits in WIRE, f"one of {tuple(WIRE)}")
        require(self, "world_size", self.world_size <= WIRE[self.bits][2],
                f"at most {WIRE[self.bits][2]} with bits={self.bits} (the sum of levels "
                "must stay exact)")
        require(self, "mixing", is_number(self.mixing) and 0 <= self.mixing < 1, "[0, 1)")


def train(config: StreamingDiLoCoConfig, group=None, *, record=report) -> dict:
    """The worker: streaming DiLoCo on this rank; call it on every rank of ``group``.

    Records what :func:`distlab.communication_efficient.diloco.train` records, with
    ``outer_step`` counting fragment outer steps; returns the same dict (``history`` rows
    also name the ``fragment``)."""
    rank, p = rank_and_size(config, group)
    workload = config.workload
    data, shards, model = problem(config, p, config.classes_per_rank, launcher.device())
    global_model = workload.build_model().to(data.X.device)
    local = fragments(model, config.num_fragments)               # this worker's θ_f,r
    outer_frags = fragments(global_model, config.num_fragments)  # the global θ_f
    inner = workload.optimizer(model.parameters())
    outer = outer_optimizer(config, list(global_model.parameters()))
    batches = sample_batches(shards[rank], workload.batch_size // p,
                             seed=workload.seed * 1000 + rank + 1)
    start = comm.ledger().totals()["bytes_sent"]
    history = [history_row(0, 0, evaluate(global_model, data, workload.loss), 0)]
    pending, bytes_per_step, sent, done = deque(), [], 0, 0

    def land(step):       # the averaged Δ_f is in: the outer step, then every worker merges
        nonlocal done
        _, f, wait = pending.popleft()
        _outer_step(outer, outer_frags[f], wait())
        _merge(local[f], outer_frags[f], config.mixing)
        done += 1
        values = evaluate(global_model, data, workload.loss)
        return values, history_row(step, done, values, None) | {"fragment": f}

    for step in range(1, workload.num_steps + 1):
        inner_step(model, inner, data, next(batches), workload.loss)
        for f in syncing(config, step):
            delta = flat(outer_frags[f]) - flat(local[f])                   # Δ_f,r: (n_f,)
            pending.append((step + config.overlap_steps, f,
                            _all_reduce_mean(delta, config, group)))
        landed = []
        while pending and pending[0][0] <= step:
            landed.append(land(step))
        now = comm.ledger().totals()["bytes_sent"] - start
        bytes_per_step.append(now - sent)
        sent = now
        history += [row | {"bytes_sent": sent} for _, row in landed]
        values = landed[-1][0] if landed and rank == 0 else {}
        record(step=step, bytes_sent=sent, outer_step=done, **values)
    while pending:        # the last fragments' all-reduces, still in flight
        history.append(land(workload.num_steps)[1])
        history[-1]["bytes_sent"] = comm.ledger().totals()["bytes_sent"] - start
        bytes_per_step[-1] += history[-1]["bytes_sent"] - sent    # counted with the last step
        sent = history[-1]["bytes_sent"]
    return {**evaluate(global_model, data, workload.loss),
            "params": flat(global_model.parameters()).tolist(), "history": history,
            "bytes_per_step": bytes_per_step}


def reference(config: StreamingDiLoCoConfig) -> dict:
    """One process plays every worker, with the same schedule and the same quantization;
    returns what :func:`train` returns on rank 0, ``bytes_per_step`` aside."""
    workload, p = config.workload, config.world_size
    with one_thread():
        data, shards, global_model = problem(config, p, config.classes_per_rank)
        outer_frags = fragments(global_model, config.num_fragments)
        outer = outer_optimizer(config, list(global_model.parameters()))
        workers = [Worker.build(workload, s, r, p) for r, s in enumerate(shards)]
        local = [fragments(w.model, config.num_fragments) for w in workers]
        history = [history_row(0, 0, evaluate(global_model, data, workload.loss), 0)]
        pending, done = deque(), 0

        def land():
            nonlocal done
            _, f, mean = pending.popleft()
            _outer_step(outer, outer_frags[f], mean())
            for frags in local:
                _merge(frags[f], outer_frags[f], config.mixing)
            done += 1
            return history_row(step, done, evaluate(global_model, data, workload.loss),
                               None) | {"fragment": f}

        for step in range(1, workload.num_steps + 1):
            for w in workers:
                w.step(data, workload.loss)
            for f in syncing(config, step):
                deltas = torch.stack([flat(outer_frags[f]) - flat(fr[f]) for fr in local])
                pending.append((step + config.overlap_steps, f, _mean(deltas, config)))
            while pending and pending[0][0] <= step:
                history.append(land())
        while pending:
            history.append(land())
        return {**evaluate(global_model, data, workload.loss),
                "params": flat(global_model.parameters()).tolist(), "history": history}


def start(config: StreamingDiLoCoConfig, **launch) -> launcher.Run:
    """Start :func:`train` on ``config.world_size`` processes and return the
    :class:`~distlab.Run` at once; ``launch`` goes to :func:`distlab.launcher.start`."""
    return launcher.start(train, config.world_size, with_data(config), **launch)


def run(config: StreamingDiLoCoConfig, **launch) -> list[dict]:
    """:func:`start` and wait: every rank's result of :func:`train`, in rank order."""
    return start(config, **launch).result()


def fragments(model: torch.nn.Module, count: int) -> list[list[torch.nn.Parameter]]:
    """``count`` fragments of the model's parameters: whole layers, in order, each layer
    going to the fragment its middle parameter falls in (so the sizes come out about
    equal); no fragment is empty."""
    layers = _layers(model)
    sizes = [sum(w.numel() for w in layer) for layer in layers]
    total, before, f, out = sum(sizes), 0, -1, [[] for _ in range(count)]
    for i, (layer, size) in enumerate(zip(layers, sizes)):
        middle = int(count * (before + size / 2) / total)   # where the layer's middle falls
        f = max(f, min(middle, f + 1, count - 1))          # in order, none skipped
        f = max(f, count - (len(layers) - i))              # a layer left for each later one
        out[f] += layer
        before += size
    return out


def syncing(config, step: int) -> list[int]:
    """The fragments whose all-reduce starts after inner step ``step``: f when
    ``(step + f·H/F) % H == 0``."""
    H, F = config.inner_steps, config.num_fragments
    return [f for f in range(F) if (step + f * H // F) % H == 0]


# -- helpers --------------------------------------------------------------------------------

def _layers(model) -> list[list[torch.nn.Parameter]]:
    """The parameters grouped by the module that owns them, in registration order."""
    groups: dict[str, list] = {}
    for name, w in model.named_parameters():
        groups.setdefault(name.rpartition(".")[0], []).append(w)
    return list(groups.values())


def _all_reduce_mean(delta: torch.Tensor, config, group):
    """Start the all-reduce of this rank's Δ_f (quantized); return a function that waits
    for it and gives the mean over ranks. Cost: one all-reduce of Δ_f at ``bits`` (and one
    of 4 bytes for the shared scale when quantized)."""
    p, (dtype, levels, _) = dist.get_world_size(group), WIRE[config.bits]
    if levels is None:
        payload = delta.clone()
        work = comm.all_reduce(payload, group=group, async_op=True)
        return lambda: (work.wait(), payload / p)[1]
    top = delta.abs().max().reshape(1)
    comm.all_reduce(top, op=dist.ReduceOp.MAX, group=group)    # the same scale everywhere
    scale = _scale(top[0], levels)
    payload = _levels(delta, scale, levels).to(dtype)
    work = comm.all_reduce(payload, group=group, async_op=True)
    return lambda: (work.wait(), payload.to(torch.float32) * scale / p)[1]


def _mean(deltas: torch.Tensor, config):
    """The reference's :func:`_all_reduce_mean` on the stacked ``(p, n_f)`` Δs."""
    p, (dtype, levels, _) = len(deltas), WIRE[config.bits]
    if levels is None:
        mean = deltas.sum(0) / p
    else:
        scale = _scale(deltas.abs().max(), levels)
        total = torch.stack([_levels(d, scale, levels) for d in deltas]).sum(0)  # exact
        mean = total.to(dtype).to(torch.float32) * scale / p
    return lambda: mean


def _scale(top: torch.Tensor, levels: int) -> torch.Tensor:
    return top / levels if top > 0 else torch.ones_like(top)


def _levels(delta, scale, levels) -> torch.Tensor:
    return torch.round(delta / scale).clamp(-levels, levels)


def _outer_step(outer: torch.optim.SGD, frag, mean: torch.Tensor) -> None:
    """The outer step of one fragment: the others' gradients are None, so SGD skips them
    (their momentum stays)."""
    outer.zero_grad(set_to_none=True)
    assign_grads(frag, mean)
    outer.step()


@torch.no_grad()
def _merge(local_frag, global_frag, mixing: float) -> None:
    for w, g in zip(local_frag, global_frag):
        w.mul_(mixing).add_(g, alpha=1 - mixing)


__all__ = ["StreamingDiLoCoConfig", "WORKLOAD", "WIRE", "train", "reference", "start", "run",
           "fragments", "syncing", "table"]
