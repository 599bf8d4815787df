"""What a pipeline stage records while it works, and how to read it afterwards.

:class:`Timeline` notes when each rank computes, sends, receives and idles;
:class:`ActivationMeter` counts the bytes autograd keeps for backward. From every rank's
events, :func:`measured_bubble` gives the fraction of the step the pipeline sat idle, to
set beside the ideal ``(p - 1) / (m + p - 1)`` of
:func:`distlab.model_parallel.pipeline.bubble_fraction`, and :func:`exposed_communication`
the fraction it spent moving activations and gradients. A compute span also names its pass
(``op``: "F", "B", or under a split backward "W", recorded as kind ``"backward"``) and its
model ``chunk``; :func:`distlab.model_parallel.schedules.compare_schedules` sets each
schedule's measured bubble beside its own formula.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from distlab.checks import is_int, require_arg


class Timeline:
    """This rank's record of what it did when: forward, backward, send, recv, idle."""

    def __init__(self, rank: int):
        self.rank, self.events, self.t0, self.step = rank, [], time.perf_counter(), 0

    @contextmanager
    def span(self, kind: str, microbatch: int, **fields):
        """Record the time spent in the ``with`` block as one event; ``fields`` (a compute
        span's ``op``, "F", "B" or "W", and model ``chunk``) go into it too."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.events.append(dict(rank=self.rank, step=self.step, kind=kind,
                                    microbatch=microbatch, start=start - self.t0,
                                    end=time.perf_counter() - self.t0, **fields))


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


def measured_bubble(results: list[dict], step: int = -1) -> float:
    """Fraction of rank-time not spent in forward or backward during ``step``.

    ``1 - (sum of compute) / (p x makespan)``: it counts every kind of waiting, so on a real
    machine it is at least the ideal bubble. ``step`` counts from 0, or back from -1.
    """
    return 1 - _share(results, step, ("forward", "backward"))


def exposed_communication(results: list[dict], step: int = -1) -> float:
    """Fraction of rank-time spent sending and receiving payloads during ``step``.

    A stage does one thing at a time, so no compute hides these spans: all of it is exposed
    on the timeline. Waiting for a neighbour's header is ``idle`` (the bubble), not this.
    """
    return _share(results, step, ("send", "recv"))


def _share(results: list[dict], step: int, kinds: tuple) -> float:
    """The events of ``kinds`` in ``step``, summed over ranks, over p x the step's makespan."""
    events = [e for r in results for e in r["events"]]
    step = step_index(step, max(e["step"] for e in events) + 1)
    events = [e for e in events if e["step"] == step]
    makespan = max(e["end"] for e in events) - min(e["start"] for e in events)
    spent = sum(e["end"] - e["start"] for e in events if e["kind"] in kinds)
    return spent / (len(results) * makespan)


def step_index(step: int, num_steps: int) -> int:
    """``step`` (from 0, or back from -1 like a list index) as an index in 0..num_steps-1."""
    require_arg("step", step, is_int(step) and -num_steps <= step < num_steps,
                f"an int in {-num_steps}..{num_steps - 1} (the run recorded {num_steps} steps)")
    return step % num_steps
