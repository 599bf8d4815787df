"""Pipeline schedules as data: each stage's order of work, and the bubble it predicts.

A schedule is, for every stage (rank) ``s`` of ``p``, a list of :class:`Op` s: ``("F", i, c)``
runs the forward of microbatch ``i`` through the rank's model chunk ``c``, ``("B", i, c)``
its backward, ``("W", i, c)`` (zero bubble only) its weight gradients.
:class:`distlab.model_parallel.pipeline.PipelineStage` executes these lists; the lab prints
them and :func:`simulate` draws them as a Gantt chart with ideal timings.

* ``"gpipe"`` (Huang et al. 2019, section 2.2): all ``m`` forwards, then all backwards.
* ``"1f1b"`` (PipeDream-Flush; Narayanan et al. 2021, section 2.2.1, figure 4 top):
  ``p - s - 1`` warm-up forwards, then one forward and one backward in turn.
* ``"interleaved"`` (Narayanan et al. 2021, section 2.2.2, figure 4 bottom): each rank holds
  ``v`` chunks of the layers, chunk ``c`` of rank ``s`` being virtual stage ``c·p + s``, so a
  microbatch passes every rank ``v`` times. Megatron-LM's order: ``(p - s - 1)·2 + (v - 1)·p``
  warm-up forwards, then 1F1B over the ``v·m`` virtual microbatches, taken in groups of ``p``
  microbatches per chunk (so ``m`` must be a multiple of ``p``). Each chunk computes for
  ``1/v`` of a stage's time, and the bubble shrinks ``v`` times; the price: ``v`` times the
  messages, and more activations in flight on the first stages.
* ``"zb-h1"`` (Qi et al. 2024, "Zero Bubble Pipeline Parallelism", ICLR, section 3 and
  figure 3 top): the backward split into B (the gradient of the stage's input, which the
  previous stage waits for) and W (the weight gradients, which nobody waits for). 1F1B's
  order of F and B, but stage ``s`` runs the W of microbatch ``j`` only ``s`` iterations
  after its B (fewer warm-up forwards, later W), so every stage holds at most ``p``
  microbatches, 1F1B's peak (stage 0's); the deferred W passes fill the cool-down bubble.

The bubble, for equal stages, in units of the ideal (bubble-free) step time:
``(p - 1)/m`` for GPipe and 1F1B (Narayanan et al. eq. 1), ``(p - 1)/(v·m)`` interleaved
(section 2.2.2), and ``(p - 1)(T_F + T_B - T_W) / (m (T_F + T_B + T_W))`` for ZB-H1 (Qi et
al. section 3.1), that is ``(p - 1)/(3m)`` at ``T_F = T_B = T_W``. The timeline measures it
as a share of the whole step instead, ``b/(1 + b)`` for a bubble ``b`` in ideal-time units:
:func:`bubble_formula` gives that share.

Cost (alpha-beta) per step: ``2(p·v - 1)·m`` messages of one microbatch's activation (or its
gradient) each (v = 1 but for ``"interleaved"``); splitting B from W sends nothing more.
"""
from __future__ import annotations

from typing import NamedTuple

import pandas as pd
from torch import nn

from distlab.checks import is_int, require_arg
from distlab.model_parallel.timeline import exposed_communication, measured_bubble

ALL_SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
"""Every schedule :class:`distlab.model_parallel.pipeline.PipelineStage` runs."""
SPLIT_BACKWARD = ("zb-h1",)
"""Schedules whose ``"B"`` is the input gradient only, the weight gradients a ``"W"``."""
# Durations of a whole stage's work on one microbatch, in units of its forward, that the
# formulas and the simulation assume (and that compute_delay sleeps): F : B : W = 1 : 1 : 1,
# an unsplit backward being B + W.
TIMES = {"F": 1.0, "B": 1.0, "W": 1.0}


class Op(NamedTuple):
    """One unit of a stage's work."""
    kind: str
    """``"F"`` forward, ``"B"`` backward (input gradient only under a split schedule), ``"W"``
    the weight gradients."""
    microbatch: int
    """Which microbatch, 0..m-1."""
    chunk: int = 0
    """Which of the rank's model chunks (``"interleaved"``; 0 otherwise)."""


def ops(name: str, num_stages: int, num_microbatches: int, stage: int,
        virtual_stages: int = 1) -> list[Op]:
    """The order of work of ``stage`` under schedule ``name``; ``virtual_stages`` (v) is
    the number of chunks per rank, used by ``"interleaved"`` only."""
    require_arg("name", name, name in ALL_SCHEDULES, f"one of {ALL_SCHEDULES}")
    require_ints(num_stages=num_stages, num_microbatches=num_microbatches,
                  virtual_stages=virtual_stages)
    require_ints(low=0, high=num_stages - 1, stage=stage)
    p, m, s = num_stages, num_microbatches, stage
    if name == "gpipe":
        return [Op("F", i) for i in range(m)] + [Op("B", i) for i in range(m)]
    if name == "1f1b":
        return _one_f_one_b(min(p - s - 1, m), m, lambda kind, k: Op(kind, k))
    if name == "zb-h1":
        return _zb_h1(p, m, s)
    require_arg("num_microbatches", m, m % p == 0,
                f"a multiple of num_stages={p} under schedule 'interleaved' (it sends the "
                "microbatches round the ranks in groups of p)")
    v = virtual_stages

    def virtual(kind, k):   # the k-th forward (or backward) of this rank: which mb, chunk
        group, within = divmod(k, p * v)
        chunk = within // p
        return Op(kind, group * p + within % p, chunk if kind == "F" else v - 1 - chunk)
    warmup = min((p - s - 1) * 2 + (v - 1) * p, m * v)
    return _one_f_one_b(warmup, m * v, virtual)


def bubble_formula(name: str, num_stages: int, num_microbatches: int,
                   virtual_stages: int = 1) -> float:
    """The predicted share of the step a stage idles, ``b / (1 + b)`` for the paper's bubble
    ``b`` in units of the ideal time (module docstring), at F : B : W = 1 : 1 : 1: the number
    :func:`distlab.model_parallel.timeline.measured_bubble` measures."""
    require_arg("name", name, name in ALL_SCHEDULES, f"one of {ALL_SCHEDULES}")
    require_ints(num_stages=num_stages, num_microbatches=num_microbatches,
                  virtual_stages=virtual_stages)
    p, m = num_stages, num_microbatches
    f, b, w = TIMES["F"], TIMES["B"], TIMES["W"]
    ideal = m * (f + b + w)
    idle = {"gpipe": (p - 1) * (f + b + w), "1f1b": (p - 1) * (f + b + w),
            "interleaved": (p - 1) * (f + b + w) / virtual_stages,
            "zb-h1": (p - 1) * (f + b - w)}[name]
    return idle / (ideal + idle)


def peak_in_flight(work: list[Op]) -> int:
    """Most (microbatch, chunk) pairs whose activations a stage holds at once: from their
    forward until their last backward pass (W where there is one, else B)."""
    last = "W" if any(op.kind == "W" for op in work) else "B"
    live = peak = 0
    for op in work:
        live += (op.kind == "F") - (op.kind == last)
        peak = max(peak, live)
    return peak


def simulate(name: str, num_stages: int, num_microbatches: int,
             virtual_stages: int = 1) -> list[dict]:
    """The schedule run with ideal timings (``TIMES``, a chunk taking ``1/v`` of a stage,
    messages free): per rank ``{"rank", "events"}`` as the workers return them, so
    :func:`distlab.model_parallel.timeline.measured_bubble` and the lab's Gantt chart read
    it. Raises RuntimeError if the orders deadlock (a rank waits for work that waits on it).
    """
    p, v = num_stages, virtual_stages if name == "interleaved" else 1
    orders = [ops(name, p, num_microbatches, s, v) for s in range(p)]
    duration = dict(TIMES)
    if name not in SPLIT_BACKWARD:
        duration["B"] = TIMES["B"] + TIMES["W"]
    done: dict[tuple, float] = {}         # (kind, microbatch, virtual stage) -> end time
    clock, nxt = [0.0] * p, [0] * p
    events = [[] for _ in range(p)]
    last_virtual = p * v - 1
    while any(nxt[s] < len(orders[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            while nxt[s] < len(orders[s]):
                op = orders[s][nxt[s]]
                k = op.chunk * p + s                        # the virtual stage
                need = {"F": ("F", op.microbatch, k - 1) if k > 0 else None,
                        "B": ("B", op.microbatch, k + 1) if k < last_virtual
                        else ("F", op.microbatch, k),
                        "W": ("B", op.microbatch, k)}[op.kind]
                if need is not None and need not in done:
                    break
                start = max(clock[s], done.get(need, 0.0))
                clock[s] = done[(op.kind, op.microbatch, k)] = start + duration[op.kind] / v
                events[s].append(dict(rank=s, step=0, kind="forward" if op.kind == "F"
                                      else "backward", op=op.kind, microbatch=op.microbatch,
                                      chunk=op.chunk, start=start, end=clock[s]))
                nxt[s] += 1
                progressed = True
        if not progressed:
            stuck = {s: orders[s][nxt[s]] for s in range(p) if nxt[s] < len(orders[s])}
            raise RuntimeError(f"schedule {name!r} deadlocks: the ranks wait on {stuck}")
    return [{"rank": s, "events": events[s]} for s in range(p)]


def partition(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous, balanced layer ranges; with a remainder the first stages get one more."""
    require_ints(num_layers=num_layers, num_stages=num_stages)
    if num_stages > num_layers:
        raise ValueError(f"num_stages={num_stages} is more than the model's {num_layers} "
                         f"layers: every stage needs at least one; use num_stages <= "
                         f"{num_layers}")
    size, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for s in range(num_stages):
        bounds.append(bounds[-1] + size + (s < extra))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def stage_layers(model: nn.Sequential, num_stages: int, stage: int,
                 virtual_stages: int = 1) -> list[nn.Sequential]:
    """The chunks of ``model`` that ``stage`` holds: of its layers cut into ``p·v`` balanced
    pieces (:func:`partition`), the virtual stages ``stage, stage + p, ...``."""
    require_ints(low=0, high=num_stages - 1, stage=stage)
    pieces = partition(len(model), num_stages * virtual_stages)[stage::num_stages]
    return [nn.Sequential(*list(model)[r.start: r.stop]) for r in pieces]


def compare_schedules(runs: list[list[dict]]) -> pd.DataFrame:
    """One row per run and stage: the schedule, its measured bubble (the last step's) beside
    :func:`bubble_formula`, the exposed communication, and the peak stashed (microbatch,
    chunk) pairs measured beside :func:`peak_in_flight`'s count (and their bytes).

    ``runs``: for each run, every rank's result of
    :func:`distlab.model_parallel.pipeline.train` (e.g. from one launch of ``pipeline.sweep``).
    """
    rows = []
    for results in runs:
        c = results[0]["config"]
        p, m, v = c.num_stages, c.num_microbatches, c.chunks
        bubble, exposed = measured_bubble(results), exposed_communication(results)
        for r in results:
            rows.append(dict(
                schedule=c.schedule, num_stages=p, num_microbatches=m, virtual_stages=v,
                stage=r["rank"], measured_bubble=bubble,
                formula_bubble=bubble_formula(c.schedule, p, m, v),
                exposed_communication=exposed, peak_activations=r["peak_activations"],
                predicted_peak_activations=peak_in_flight(ops(c.schedule, p, m, r["rank"], v)),
                peak_activation_bytes=r["peak_activation_bytes"]))
    return pd.DataFrame(rows)


def _one_f_one_b(warmup: int, total: int, op) -> list[Op]:
    """``warmup`` forwards, then one forward and one backward in turn, then the remaining
    backwards; ``op(kind, k)`` names the k-th forward or backward."""
    order = [op("F", k) for k in range(warmup)]
    for k in range(total - warmup):                  # steady state
        order += [op("F", warmup + k), op("B", k)]
    return order + [op("B", k) for k in range(total - warmup, total)]   # cool-down


def _zb_h1(p: int, m: int, s: int) -> list[Op]:
    """1F1B's F and B, each W ``s`` iterations after its B (the rest after the last B)."""
    order, pending = [], []
    for op in _one_f_one_b(min(p - s - 1, m), m, lambda kind, k: Op(kind, k)):
        order.append(op)
        if op.kind == "B":
            pending.append(Op("W", op.microbatch))
            if len(pending) > s:             # this W has waited its s iterations
                order.append(pending.pop(0))
    return order + pending


def require_ints(low: int = 1, high: int | None = None, **values) -> None:
    """Raise ValueError naming the first of ``values`` that is not an int in [low, high]."""
    for name, v in values.items():
        if not (is_int(v) and v >= low and (high is None or v <= high)):
            allowed = f"an int >= {low}" if high is None else f"an int in {low}..{high}"
            require_arg(name, v, False, allowed)
